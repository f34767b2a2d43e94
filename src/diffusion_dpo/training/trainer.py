"""The Trainer: sets a run up (`setup`), then trains to `train.max_steps`: per optimizer step, accumulated
micro-batches through the method (`step`), clipping, the update or its skip, bookkeeping (`loop`), checkpoints,
grids and final/ (`outputs`). accelerate runs it on one process, several (DDP) or sharded (FSDP, DeepSpeed).

Run: `diffusion-dpo train --config configs/sd15_pickapic.yaml --data.path DIR --output_dir runs/x`
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from diffusion_dpo.config import Config, check_config, flat_config
from diffusion_dpo.errors import UserError, is_local_path
from diffusion_dpo.models import Family, describe, load_components, weight_dtype_of
from diffusion_dpo.models.lora import with_saved_alpha
from diffusion_dpo.pinning import pin_once
from diffusion_dpo.processes import check_shared, decide_once
import diffusion_dpo.training.checkpoint as ckpt
import diffusion_dpo.training.setup as setup
from diffusion_dpo.training.ema import WeightAverage
from diffusion_dpo.training.loop import (MetricsCallback, MetricsLog, StreamBatches, advance_position,
                                         apply_update, check_stream_layout, continue_layout, layout_of,
                                         micro_batches, progress_bar, reduce_metrics, stream_layout)
from diffusion_dpo.training.losses import LossSpec, get_loss
from diffusion_dpo.training.model_card import RunFacts
from diffusion_dpo.training.optim import StepInBackward, make_lr_scheduler, make_optimizer
from diffusion_dpo.training.outputs import (Checkpoints, Weights, grid_path, prepare_output_dir, write_final,
                                            write_grid)
from diffusion_dpo.training.step import PreferenceStep, StepOutput
from diffusion_dpo.training.trackers import init_kwargs, parse_report_to


class Trainer:
    """Holds the models, optimizer and data for one run; `run()` trains to `train.max_steps`.

    `cfg` is checked as a YAML config is (`config.check_config`). `dataset`: the pairs as an in-memory
    `datasets.Dataset` (Pick-a-Pic or prompt/chosen/rejected schema) instead of `data.path`. `callback` is called on
    the main process after every optimizer step with that step's metrics (the line written to metrics.jsonl)."""

    def __init__(self, cfg: Config, dataset: Optional[Any] = None, callback: Optional[MetricsCallback] = None):
        from accelerate.utils import set_seed

        cfg = check_config(cfg, data_in_memory=dataset is not None)
        if cfg.train.push_to_hub:  # a push that cannot happen fails now, not after hours of training
            from diffusion_dpo.push import check_can_push

            check_can_push(cfg.train.push_to_hub)
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.trackers = parse_report_to(cfg.train.report_to)  # one not installed fails here, in one line
        self.accelerator = acc = setup.make_accelerator(cfg.train, self.output_dir, self.trackers)
        self.sharded = setup.check_engine(acc, cfg)
        self.weight_dtype = weight_dtype_of(cfg.train.mixed_precision)
        self.loss_spec: LossSpec = get_loss(cfg.loss.name)
        self.lora = cfg.lora.rank > 0
        self.world = acc.num_processes

        # Data first: a bad data set fails in seconds, before any model is loaded.
        # Decided once, by the main process, for all: a process that saw another output_dir would resume elsewhere.
        self.resume_from = decide_once(acc, self._decide_resume)
        # hub sources resolved to commits once (a resume reuses the run's own): every download reads those
        self.pins = pin_once(cfg, self.output_dir if self.resume_from is not None else None)
        if Path(cfg.model.pretrained).expanduser().exists() or is_local_path(cfg.model.pretrained):
            describe(cfg.model)  # a local model path mistake or an unsupported family fails before the data scan
        self.data = setup.open_data(acc, cfg, dataset, self.loss_spec)
        setup.check_items(self.data, cfg.loss.name, self.loss_spec, cfg.data, self.world)
        self.num_pairs, self.images_per_item = self.data.num_items, self.data.images_per_item

        # Seed python/numpy/torch before building anything random (LoRA's A matrices are drawn at init):
        # two runs with the same train.seed start from the same weights.
        set_seed(cfg.train.seed)
        # With a cache, the VAE and text encoders are never loaded (only the VAE's config is read).
        # LoRA's frozen base loads straight in the compute dtype: a 20B/32B transformer in fp32 would not fit first
        self.components: Family = load_components(cfg.model, self.weight_dtype, acc.device,
                                                  encoders=self.data.cache is None, flow=cfg.flow,
                                                  denoiser_dtype=self.weight_dtype if cfg.lora.rank else torch.float32)
        self.latent_shape = self.components.latent_shape(cfg.data.resolution)  # a resolution it cannot take fails now
        # lora.init_from's adapters continue at the scale they were trained with
        cfg = self.cfg = replace(cfg, lora=with_saved_alpha(cfg.lora, self.components.denoiser_role))
        model = self.components.denoiser
        params, init_state = setup.trainable_parameters(self.components, cfg.lora, self.weight_dtype)
        precomputed = self.data.reference_table is not None
        self.reference = setup.make_reference(cfg, self.components, self.loss_spec, precomputed, self.weight_dtype,
                                              acc.device, init_state)
        setup.apply_speed_options(model, self.reference, cfg.train)
        if self.sharded and self.reference is not None and self.reference.copy is not None:
            size = sum(p.numel() * p.element_size() for p in self.reference.copy.parameters()) / 2**30
            acc.print(f"the frozen reference is a whole copy on every GPU ({size:.1f} GiB, not sharded); "
                      "cache.reference precomputed holds none (docs/multi-gpu.md)")

        self.pairs_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps * self.world
        self.lr = cfg.optim.lr * self.pairs_per_step if cfg.optim.scale_lr else cfg.optim.lr
        self.optimizer = make_optimizer(cfg.optim, params, self.lr)
        # With the step in the backward pass the gradients are gone by the time the loop would clip them; the
        # optimizer reports their norm instead.
        self.in_backward = self.optimizer if isinstance(self.optimizer, StepInBackward) else None
        self.lr_scheduler = make_lr_scheduler(cfg.optim, self.optimizer, cfg.train.max_steps)
        self.denoiser, self.optimizer = acc.prepare(model, self.optimizer)
        if acc.gradient_accumulation_steps != cfg.train.gradient_accumulation_steps:  # a DeepSpeed file overrode it
            raise UserError(f"the accelerate config sets gradient_accumulation_steps {acc.gradient_accumulation_steps}"
                            f" but train.gradient_accumulation_steps is {cfg.train.gradient_accumulation_steps}; remove "
                            "it from the accelerate/DeepSpeed config (configs/accelerate/ leave it out)")
        self.params = params
        self.average = WeightAverage(params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        self.dataset = self.data.dataset(cfg.data, self.components.tokenizer, cfg.train.seed, acc.process_index)
        streamed = self.data.stream is not None
        self.sampler = None if streamed else self.data.sampler(cfg.data, cfg.train.seed)
        self.layout = layout_of(self.world, cfg.data.batch_size, cfg.train.gradient_accumulation_steps)
        self.stream_layout = stream_layout(self.world, cfg.data) if streamed else None
        self.state = ckpt.TrainState(layout=dict(self.layout), stream=self.stream_layout)
        self.stream: Optional[StreamBatches] = None  # data.streaming: made in run() (with a resumed state)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.metrics = MetricsLog(acc, self.metrics_path, callback)
        self.method = PreferenceStep(acc, self.components, self.loss_spec, cfg.loss, self.reference, precomputed,
                                     cached=self.data.cache is not None, latent_shape=self.latent_shape,
                                     images_per_item=self.images_per_item, resolution=cfg.data.resolution,
                                     seed=cfg.train.seed, weight_dtype=self.weight_dtype,
                                     channels_last=cfg.train.channels_last)
        self.weights = Weights(acc, self.denoiser, self.components, self.lora, cfg.model, self.average)
        self.checkpoints = Checkpoints(acc, self.output_dir, self.weights, self.optimizer, self.lr_scheduler,
                                       self.sharded, cfg.train.checkpoints_total_limit,
                                       loader_state=(lambda: self.stream.state_dict()) if streamed else None)

    def _decide_resume(self) -> Optional[Path]:
        """The checkpoint to continue from (None: a new run), after checking output_dir may be written."""
        cfg = self.cfg
        resume_from = ckpt.resolve_resume(cfg.train.resume, self.output_dir, cfg.train.trust_sharded_resume)
        if cfg.train.resume == "latest" and resume_from is None:
            print(f"train.resume latest: no checkpoint in {self.output_dir}, starting a new run")
        ckpt.check_output_dir(self.output_dir, resuming=resume_from is not None, overwrite=cfg.overwrite,
                              resume_asked=bool(cfg.train.resume))
        return resume_from

    def step(self, batch: dict[str, Any], micro_step: int) -> StepOutput:
        """Loss and metrics for one micro-batch of B pairs (`training.step`)."""
        return self.method(self.denoiser, batch, micro_step)

    def batches(self):
        """(epoch, micro-batch) of this process, forever, from the state's position (`loop.micro_batches`)."""
        acc = self.accelerator
        if self.stream is not None:
            return self.stream
        return micro_batches(self.dataset, self.sampler, self.cfg.data, self.state, acc.process_index, self.world,
                             pin_memory=acc.device.type == "cuda")

    def run(self) -> Path:
        """Train to `train.max_steps` (resuming if asked), writing metrics, checkpoints, grids and final/."""
        cfg, acc = self.cfg, self.accelerator
        prepare_output_dir(acc, cfg, self.output_dir, self.resume_from is not None, self.pins)
        check_shared(acc, {"output_dir": self.output_dir, **({"cache.dir": Path(cfg.cache.dir).expanduser()}
                                                             if cfg.cache.dir else {})})
        loader_state = None
        if self.resume_from is not None:
            self.state = self.checkpoints.load(self.resume_from)
            check_stream_layout(self.state, self.stream_layout, self.resume_from)
            if self.stream_layout is not None:
                loader_state = ckpt.read_loader_state(self.resume_from, acc.process_index)
            continue_layout(self.state, self.layout, acc.print)
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
        if self.stream_layout is not None:
            self.stream = StreamBatches(self.dataset, cfg.data, acc.device.type == "cuda", loader_state)
        self.metrics.truncate(self.state.step)
        if acc.is_main_process:
            acc.init_trackers(cfg.train.tracker_project, config=flat_config(cfg),
                              init_kwargs=init_kwargs(self.trackers or [],
                                                      cfg.train.run_name or self.output_dir.resolve().name))
        accum = cfg.train.gradient_accumulation_steps
        progress = progress_bar(cfg.train.max_steps, self.state.step, acc.is_main_process)
        batches = self.batches()
        # pairs passed over as bad when met are counted
        lazy = (cfg.data.image_check == "lazy" and self.data.cache is None) or cfg.data.streaming
        t0 = time.perf_counter()
        while self.state.step < cfg.train.max_steps:
            sums: dict[str, Tensor] = {}
            skipped = 0  # data.image_check lazy: pairs this process passed over for a broken image
            for k in range(accum):
                epoch, batch = next(batches)
                skipped += int(batch.pop("bad_pairs_skipped").sum()) if "bad_pairs_skipped" in batch else 0
                micro_step = self.state.step * accum + k
                with acc.accumulate(self.denoiser):  # no gradient all-reduce before the last micro-step
                    out = self.step(batch, micro_step)
                    acc.backward(out.loss)  # divided by the accumulation steps inside
                for key, v in out.metrics.items():
                    sums[key] = sums.get(key, 0) + v / accum
                advance_position(self.state, epoch, cfg.data.batch_size * self.world)
            if self.in_backward is not None:
                grad_norm = self.in_backward.grad_norm().to(acc.device)
            else:
                grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or float("inf"))
            record = reduce_metrics(acc, sums, grad_norm, cfg.loss.safeguard,  # the step's one host sync
                                    totals={"bad_pairs_skipped": skipped} if lazy else None)
            if lazy:
                self.state.bad_pairs_skipped += round(record.pop("bad_pairs_skipped"))
            finite = self._check_finite(record, grad_norm)
            record["lr"] = self.lr_scheduler.get_last_lr()[0]  # the rate this update uses
            if not apply_update(self.optimizer, self.lr_scheduler, acc.scaler, finite):
                self.state.skipped_steps += 1
            elif self.average is not None:
                self.average.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            record = self.metrics.write({"step": self.state.step, "epoch": self.state.epoch, **record,
                                         "pairs_per_s": self.pairs_per_step / max(seconds, 1e-9),
                                         "skipped_steps": self.state.skipped_steps,
                                         **({"bad_pairs_skipped": self.state.bad_pairs_skipped} if lazy else {})})
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}", refresh=False)
            progress.update(1)
            self._maybe_checkpoint()
            self._maybe_validate()
        progress.close()
        if self.stream is not None:
            self.stream.close()
        if self.state.bad_pairs_skipped and cfg.data.streaming:
            acc.print(f"data.streaming: {self.state.bad_pairs_skipped} bad rows were skipped (bad_pairs_skipped in "
                      "metrics.jsonl)")
        elif self.state.bad_pairs_skipped:
            acc.print(f"data.image_check lazy: {self.state.bad_pairs_skipped} pairs with an image that does not decode "
                      "were replaced by the next pair (bad_pairs_skipped in metrics.jsonl)")
        final = self._save_final()
        # accelerate's end_training would also destroy the process group, which the caller may still need
        # (iterate trains round after round in one process group); it goes when the process exits
        for tracker in acc.trackers:
            tracker.finish()
        if cfg.train.push_to_hub and acc.is_main_process:
            from diffusion_dpo.push import push_run

            acc.print(f"pushed: {push_run(self.output_dir, cfg.train.push_to_hub, private=cfg.train.hub_private)}")
        return final

    def _check_finite(self, record: dict[str, float], grad_norm: Optional[Tensor]) -> bool:
        """Whether the step may update the weights; a non-finite loss or gradient stops the run (one line) unless
        train.skip_nonfinite. Checked before the update: a NaN/inf must never reach the weights. (Under fp16 the
        gradient scaler already skips steps with inf gradients, so there only the loss is checked; DeepSpeed
        applies the update inside backward(), so there this check can only stop the run after it; an engine that
        clips internally without reporting the norm logs it as NaN: only the loss counts.)"""
        cfg = self.cfg
        norm_known = cfg.train.mixed_precision != "fp16" and grad_norm is not None
        values = [record["loss"]] + ([record["grad_norm"]] if norm_known else [])
        finite = all(math.isfinite(v) for v in values)
        at = f"non-finite loss or gradient at step {self.state.step + 1} (loss {record['loss']}, " \
             f"grad norm {record['grad_norm']})"
        if not finite and self.in_backward is not None:
            raise UserError(f"{at}; with optim.step_in_backward the weights were already updated with it, so resume "
                            "from the last checkpoint with a lower optim.lr")
        if not finite and not cfg.train.skip_nonfinite:
            raise UserError(f"{at}; the weights were not updated. Lower optim.lr, use bf16 instead of fp16, or set "
                            "train.skip_nonfinite=true to skip such steps")
        return finite

    # ------------------------------------------------------------------ outputs
    def _maybe_checkpoint(self) -> None:
        every = self.cfg.train.checkpointing_steps
        if every and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Optional[Path]:
        """Write checkpoint-<step>/ (`outputs.Checkpoints`)."""
        return self.checkpoints.save(self.state)

    def _maybe_validate(self, final: bool = False) -> None:
        v = self.cfg.validation
        if v.every_steps < 0 or not v.prompts:
            return
        step = self.state.step
        if not final and (v.every_steps == 0 or step % v.every_steps != 0 or step == self.cfg.train.max_steps):
            return
        write_grid(self.weights, self.reference, v, self.cfg.flow, self.cfg.data.resolution, self.weight_dtype,
                   self.output_dir, step)

    def _save_final(self) -> Path:
        """final/ (`outputs.write_final`) after the last grid, with the model card's facts."""
        self._maybe_validate(final=True)
        comp, grid = self.components, grid_path(self.output_dir, self.state.step)
        facts = RunFacts(family_title=comp.title, family_tags=comp.card_tags,
                         pipeline_class=comp.pipeline_class.__name__, pairs=self.num_pairs, steps=self.state.step,
                         skipped_steps=self.state.skipped_steps, pairs_per_step=self.pairs_per_step, lr=self.lr,
                         grid=grid if grid.is_file() else None)
        return write_final(self.weights, self.cfg, self.output_dir, facts, self.sharded)


def train(cfg: Config, dataset: Optional[Any] = None, callback: Optional[MetricsCallback] = None) -> Path:
    """Train with `cfg` (optionally on an in-memory `dataset`, calling `callback(metrics)` after every step) and
    return the `final/` directory. See `Trainer`."""
    return Trainer(cfg, dataset=dataset, callback=callback).run()
