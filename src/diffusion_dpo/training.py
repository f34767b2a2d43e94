"""The Diffusion-DPO training loop: accelerate inside, one short `step`, exact bookkeeping.

Per optimizer step, for each micro-batch of B pairs (winner first):
  1. encode both images with the frozen VAE -> latents (2B, C, h, w) as [winners; losers]
     (or, with `cache.dir`, sample them from the cached VAE posteriors: the VAE and text encoders
     are then never loaded; see cache.py);
  2. draw ONE timestep and ONE noise per pair and use them for both images of the pair;
  3. the frozen reference predicts on all 2B noisy latents (no grad): per-sample MSE ref_w, ref_l
     (or, with `cache.reference=precomputed`, they come with the batch: no reference model at all);
  4. the trainable denoiser predicts on the same 2B in one forward: model_w, model_l;
  5. the registry loss (dpo by default) turns the four MSEs into a per-pair loss; backward.
Unpaired feedback (loss kto; `data/unpaired.py`) runs the same recipe on B single images: B latents, one timestep and
noise each, errors (B,) for the model and the reference.
Everything model-specific (prompt encoding, latents, the schedule and target, the denoiser call, what is saved)
is the model family's (models/: SD/SDXL, SD3, FLUX); this loop never asks which family it trains.
Gradients are accumulated over `train.gradient_accumulation_steps` micro-batches, clipped, and
applied. The data order comes from (seed, epoch); each pair's augmentation, timestep, noise and VAE
sample from its own seed (seed, epoch, position), so a resumed run continues exactly and the split of
pairs over processes or accumulation micro-steps does not change what any pair sees.

Run: `diffusion-dpo train --config configs/sd15_pickapic.yaml --data.path DIR --output_dir runs/x`
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from diffusion_dpo import checkpoint as ckpt
from diffusion_dpo.cache import Cache, CachedPairs, build_cache, cached_inputs, read_manifest
from diffusion_dpo.config import Config, check_config, to_yaml
from diffusion_dpo.data.items import PairSampler, PreferenceDataset, collate_packed, keys_per_epoch, unpack_batch
from diffusion_dpo.data.pairs import pairs_from_memory
from diffusion_dpo.ema import WeightAverage
from diffusion_dpo.errors import UserError, is_local_path
from diffusion_dpo.losses import (LossSpec, get_loss, implicit_accuracy, scale_gradient, smooth_labels,
                                 winner_safeguard_scale)
from diffusion_dpo.models import Family, add_lora, cast, describe, load_components, weight_dtype_of
from diffusion_dpo.models.lora import continue_adapters
from diffusion_dpo.models.reference import Reference, build_reference
from diffusion_dpo.optim import StepInBackward, make_lr_scheduler, make_optimizer
from diffusion_dpo.pinning import pin_once, read_pins, write_pins
from diffusion_dpo.randomness import pair_noise, seed_for
from diffusion_dpo.reference import ReferenceTable, WithReference, precompute_reference, reference_path
from diffusion_dpo.data.unpaired import Feedback, load_feedback, split_pairs
from diffusion_dpo.model_card import RunFacts, write_card
from diffusion_dpo.trackers import init_kwargs, log_image, parse_report_to

ENGINE_DIR = ckpt.ENGINE_DIR
METRIC_KEYS = ("loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l")
NOT_ALWAYS_RUN = ("model_mse_l", "ref_mse_l")  # SFT on decided pairs never runs the model on the losers


class ShardedPairSampler(torch.utils.data.Sampler):
    """This process's share of a `PairSampler`: of every global batch (batch_size x processes items),
    process r takes items [r*b, (r+1)*b). An incomplete last global batch is dropped."""

    def __init__(self, base: PairSampler, batch_size: int, rank: int, world: int):
        self.base, self.b, self.rank, self.world = base, batch_size, rank, world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        global_batch = self.b * self.world
        buffer = []
        for key in self.base:
            buffer.append(key)
            if len(buffer) == global_batch:
                yield from buffer[self.rank * self.b:(self.rank + 1) * self.b]
                buffer = []

    def __len__(self) -> int:
        return keys_per_epoch(len(self.base), self.b, self.world) // self.world


@dataclass
class StepOutput:
    loss: Tensor  # scalar, with grad
    metrics: dict[str, Tensor]  # detached scalars (no host sync)


MetricsCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Holds the models, optimizer and data for one run; `run()` trains to `train.max_steps`.

    `cfg` is checked as a YAML config is (`config.check_config`). `dataset`: the pairs as an in-memory
    `datasets.Dataset` (Pick-a-Pic or prompt/chosen/rejected schema) instead of `data.path`. `callback` is called on
    the main process after every optimizer step with that step's metrics (the line written to metrics.jsonl)."""

    def __init__(self, cfg: Config, dataset: Optional[Any] = None, callback: Optional[MetricsCallback] = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        # accelerate keeps one state per process; a second run in the same process (a notebook, the
        # tests) with another precision would be refused. The process group itself is left alone.
        AcceleratorState._reset_state(reset_partial_state=False)
        cfg = check_config(cfg, data_in_memory=dataset is not None)
        check_launcher_precision(cfg.train.mixed_precision)
        if cfg.train.push_to_hub:  # a push that cannot happen fails now, not after hours of training
            from diffusion_dpo.push import check_can_push

            check_can_push(cfg.train.push_to_hub)
        self.cfg = cfg
        self.in_memory, self.callback = dataset, callback
        self.output_dir = Path(cfg.output_dir)
        self.trackers = trackers = parse_report_to(cfg.train.report_to)  # one not installed fails here, in one line
        self.accelerator = Accelerator(
            # without CUDA, say so: only then does accelerate run several CPU processes over gloo
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.mixed_precision, log_with=trackers,
            # accelerate's own accumulation: DDP's no_sync, FSDP, and DeepSpeed's engine (which owns the
            # micro-step boundary and the update) all follow it; the loss is divided by it in backward()
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        acc = self.accelerator
        if cfg.train.mixed_precision == "fp16" and acc.device.type != "cuda":
            raise UserError(f"train.mixed_precision=fp16 needs a CUDA GPU (this run is on {acc.device.type}); "
                            "use bf16 or no")
        self.weight_dtype = weight_dtype_of(cfg.train.mixed_precision)
        from accelerate.utils import DistributedType

        # FSDP and DeepSpeed shard parameters and optimizer states over processes: their checkpoints go
        # through accelerate's save_state/load_state, and final weights are gathered with get_state_dict.
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.sharded and cfg.lora.rank > 0:
            # LoRA's trainable state is a few MB and its frozen base is not sharded by ZeRO-2 anyway; mixed
            # frozen/trainable (and bf16/fp32) parameters in one sharded group is what FSDP handles worst
            raise UserError("lora.rank > 0 under FSDP/DeepSpeed: LoRA needs no sharding; launch it with DDP "
                            "(plain `accelerate launch`, or configs/accelerate/multi_gpu.yaml)")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            _configure_deepspeed(acc.state.deepspeed_plugin.deepspeed_config, cfg)
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.loss_spec: LossSpec = get_loss(cfg.loss.name)
        self.lora = cfg.lora.rank > 0

        # Data first: a bad data set fails in seconds, before any model is loaded.
        self.resume_from = ckpt.resolve_resume(cfg.train.resume, self.output_dir,  # a bad path fails now
                                               cfg.train.trust_sharded_resume)
        if cfg.train.resume == "latest" and self.resume_from is None:
            acc.print(f"train.resume latest: no checkpoint in {self.output_dir}, starting a new run")
        ckpt.check_output_dir(self.output_dir, resuming=self.resume_from is not None, overwrite=cfg.overwrite,
                              resume_asked=bool(cfg.train.resume))
        # hub sources resolved to commits once (a resume reuses the run's own): every download reads those
        self.pins = pin_once(cfg, read_pins(self.output_dir) if self.resume_from is not None else None)
        if Path(cfg.model.pretrained).expanduser().exists() or is_local_path(cfg.model.pretrained):
            describe(cfg.model)  # a local model path mistake or an unsupported family fails before the data scan
        self.world = acc.num_processes
        self.cache: Optional[Cache] = None
        self.ref_table: Optional[ReferenceTable] = None
        pairs = self._open_data()
        num_pairs = self.cache.num_pairs if self.cache is not None else len(pairs)
        self.num_pairs = num_pairs
        self.images_per_item = self.cache.images_per_item if self.cache is not None else pairs.images_per_item
        source = f"data.path '{cfg.data.path or 'in-memory dataset'}'"
        if self.loss_spec.unpaired and self.images_per_item != 1:
            raise UserError(f"loss.name {cfg.loss.name} trains on unpaired items (prompt, image, label) and {source} "
                            "holds pairs; set data.unpaired=true to split each pair into its winner and its loser")
        if not self.loss_spec.unpaired and self.images_per_item != 2:
            raise UserError(f"loss.name {cfg.loss.name} trains on pairs and {source} holds unpaired items"
                            + (" (data.unpaired=true)" if cfg.data.unpaired else "") + "; use loss.name kto")
        if num_pairs < cfg.data.batch_size * self.world:
            raise UserError(f"data.path '{cfg.data.path or 'in-memory dataset'}': {num_pairs} usable pairs is fewer than one batch "
                            f"(data.batch_size {cfg.data.batch_size} x {self.world} processes)")

        # Seed python/numpy/torch before building anything random (LoRA's A matrices are drawn at init):
        # two runs with the same train.seed start from the same weights.
        set_seed(cfg.train.seed)
        # With a cache, the VAE and text encoders are never loaded (only the VAE's config is read).
        self.components: Family = load_components(cfg.model, self.weight_dtype, acc.device,
                                                  encoders=self.cache is None, flow=cfg.flow)
        self.latent_shape = self.components.latent_shape(cfg.data.resolution)  # a resolution it cannot take fails now
        model = self.components.denoiser
        init_state = None
        if self.lora:
            cast(model, self.weight_dtype)  # the frozen base in the compute dtype; LoRA weights stay fp32
            params = add_lora(model, cfg.lora, self.components.default_lora_targets)
            if cfg.lora.init_from:  # continue earlier adapters (iterate's rounds)
                init_state = continue_adapters(model, cfg.lora, self.components.denoiser_role,
                                               self.components.lora_diffusers_naming)
        else:
            params = list(model.parameters())
        # The reference (models/reference.py): the starting weights, adapters off, or model.reference; for a full
        # fine-tune only if the loss needs one and its errors are not precomputed. With precomputed errors LoRA
        # keeps it for the sample grids only.
        # A reference-free loss (mapo, sft) never loads one: LoRA's adapters-off view serves the grids at no cost.
        live = self.loss_spec.needs_reference and self.ref_table is None
        if self.loss_spec.needs_reference and (self.lora or live):
            self.reference = build_reference(model, cfg.model, cfg.lora, self.components, self.weight_dtype,
                                             acc.device, init_state)
        else:
            self.reference = Reference(model, lora=True, dtype=self.weight_dtype) if self.lora else None
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        if cfg.train.channels_last:  # NHWC convolutions: faster tensor-core kernels under bf16/fp16 on GPUs
            model.to(memory_format=torch.channels_last)
            if self.reference is not None and self.reference.copy is not None:
                self.reference.copy.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and unwrap_model stay as they are.
            model.compile()
            if self.reference is not None and self.reference.copy is not None:
                self.reference.copy.compile()

        self.pairs_per_step = cfg.data.batch_size * cfg.train.gradient_accumulation_steps * self.world
        lr = cfg.optim.lr * self.pairs_per_step if cfg.optim.scale_lr else cfg.optim.lr
        if cfg.optim.step_in_backward and (self.world > 1 or self.sharded):
            raise UserError("optim.step_in_backward runs on one process only: each parameter is updated before "
                            "gradients could be averaged over processes; launch a single process or turn it off")
        self.optimizer = make_optimizer(cfg.optim, params, lr)
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
        self.average: Optional[WeightAverage] = None
        if cfg.train.ema_decay > 0:
            if self.sharded:  # each process holds only shards of the weights to average
                raise UserError("train.ema_decay under FSDP/DeepSpeed: the weight average needs unsharded weights; "
                                "launch with DDP (plain `accelerate launch`) or set train.ema_decay 0")
            self.average = WeightAverage(params, cfg.train.ema_decay)

        if self.cache is not None:
            self.dataset = CachedPairs(self.cache, cfg.data.random_flip, cfg.data.proportion_empty_prompts)
            if self.ref_table is not None:
                self.dataset = WithReference(self.dataset, self.ref_table)  # ref_mse comes with each item
        else:
            self.dataset = PreferenceDataset(pairs, cfg.data, self.components.tokenizer)
        self.sampler = PairSampler(num_pairs, seed=cfg.train.seed)
        self.state = ckpt.TrainState()
        self.metrics_path = self.output_dir / "metrics.jsonl"

    def _open_data(self) -> Optional[Feedback]:
        """The validated pairs (on the fly), or the cache and, if asked, the precomputed reference errors; all
        checked before any model loads, so a stale cache or a short reference file fails in seconds."""
        cfg, acc = self.cfg, self.accelerator
        if not cfg.cache.dir:
            # The main process validates (and builds the Arrow cache) first; the others then reuse the cache.
            with acc.main_process_first():
                if self.in_memory is None:
                    pairs = load_feedback(cfg.data)
                else:
                    pairs = pairs_from_memory(self.in_memory, cfg.data)
                    pairs = split_pairs(pairs) if cfg.data.unpaired else pairs
            acc.print(pairs.summary())
            return pairs
        # The main process builds what is missing (cache.auto) first; the others then open it.
        with acc.main_process_first():
            if acc.is_main_process and cfg.cache.auto and read_manifest(Path(cfg.cache.dir).expanduser()) is None:
                build_cache(cfg, acc.device, acc.print)
            self.cache = Cache.open(cfg)  # refuses a cache made with other settings
        acc.print(f"cache {cfg.cache.dir}: {self.cache.manifest['summary']}")
        if cfg.cache.reference == "precomputed" and self.loss_spec.needs_reference:
            with acc.main_process_first():
                if acc.is_main_process and cfg.cache.auto and not reference_path(cfg).is_file():
                    precompute_reference(cfg, acc.device, self.world, acc.print)
                self.ref_table = ReferenceTable.open(cfg, self.cache, self.world, acc.device.type)
        return None

    # ------------------------------------------------------------------ the method
    def step(self, batch: dict[str, Any], micro_step: int) -> StepOutput:
        """Loss and metrics for one micro-batch of B pairs (see the module docstring for the recipe)."""
        acc, comp, cfg = self.accelerator, self.components, self.cfg
        device = acc.device
        # dropout (LoRA dropout) draws from the global generator: seed it per micro-step and process
        torch.manual_seed(seed_for(cfg.train.seed, micro_step, acc.process_index))
        b = batch["label"].shape[0]

        # Each pair's timestep, noise and VAE posterior samples come from its own sample seed (fixed by
        # the data order), so they do not depend on how pairs are split over processes or micro-steps.
        draws = pair_noise(batch["sample_seed"].tolist(), comp.draw_timestep, self.latent_shape, device,
                           images=self.images_per_item)
        latents, cond = self._inputs(batch, draws.posterior)  # (2B, C, h, w) [winners; losers]
        noisy, target = comp.noisy_and_target(latents, draws.noise, draws.timesteps)
        timesteps = draws.timesteps
        label = smooth_labels(batch["label"], cfg.loss.label_smoothing)  # (B,) on the host: no device sync
        # SFT on decided pairs gives the losers weight 0: do not run the model on them at all
        # an unpaired item is one image: its errors arrive as model_w / ref_w, with model_l = ref_l = None
        winners_only = self.images_per_item == 1 or (self.loss_spec.winners_only and bool((label == 1).all()))
        if winners_only and self.images_per_item == 2:
            noisy, target, timesteps, cond = noisy[:b], target[:b], timesteps[:b], comp.first_images(cond, b)
        if cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)

        def mse(model: torch.nn.Module) -> tuple[Tensor, Optional[Tensor]]:
            err = comp.mse(model, noisy, timesteps, cond, target)  # (2B,), or (B,) winners only
            return (err, None) if winners_only else (err[:b], err[b:])

        ref_w = ref_l = None
        if self.ref_table is not None:
            ref = batch["ref_mse"].to(device, non_blocking=True)  # (B, G): no forward
            ref_w, ref_l = ref[:, 0], (ref[:, 1] if ref.shape[1] == 2 else None)
        elif self.loss_spec.needs_reference:
            with torch.no_grad(), acc.autocast(), self.reference.model(acc.unwrap_model(self.denoiser)) as ref:
                ref_w, ref_l = mse(ref)
        loser_scale = None
        with acc.autocast():
            if cfg.loss.safeguard and not winners_only:
                res = comp.residual(self.denoiser, noisy, timesteps, cond, target)  # (2B, C, h, w)
                err = comp.error(res, timesteps)
                loser_scale = winner_safeguard_scale(res[:b], res[b:], comp.loss_weight(timesteps[:b]),
                                                     cfg.loss.safeguard_mu)
                model_w, model_l = err[:b], scale_gradient(err[b:], loser_scale)  # same value, scaled gradient
            else:
                model_w, model_l = mse(self.denoiser)
        extra = {"batch_mean": lambda t: acc.reduce(t, reduction="mean"),
                 "weight_desirable": cfg.loss.kto_weight_desirable,
                 "weight_undesirable": cfg.loss.kto_weight_undesirable} if self.loss_spec.unpaired else {}
        out = self.loss_spec.fn(model_w, model_l, ref_w, ref_l, beta=cfg.loss.beta,
                                label=label.to(device, non_blocking=True), **extra)
        loss = out.loss.mean()
        not_run = torch.full((), float("nan"), device=device)  # losers the model was not run on: logged as null
        loser_ref = ref_l if ref_l is not None else model_l
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": implicit_accuracy(out.inside.detach()).mean(),
            "reward_margin": out.inside.detach().mean(),
            "model_mse_w": model_w.detach().mean(),
            "model_mse_l": model_l.detach().mean() if model_l is not None else not_run,
            "ref_mse_w": (ref_w if ref_w is not None else model_w).detach().mean(),
            "ref_mse_l": loser_ref.detach().mean() if loser_ref is not None else not_run,
        }
        if cfg.loss.safeguard:
            metrics["loser_scale"] = loser_scale if loser_scale is not None else torch.ones((), device=device)
        return StepOutput(loss=loss, metrics=metrics)

    def _inputs(self, batch: dict[str, Any], posterior_eps: Tensor) -> tuple[Tensor, Any]:
        """Latents (2B, C, h, w) as [winners; losers] and their conditioning, from the cache or encoded now."""
        comp, cfg, device = self.components, self.cfg, self.accelerator.device
        if self.cache is not None:
            return cached_inputs(batch, posterior_eps, comp, cfg.data.resolution, device, self.weight_dtype)
        pixels = batch["pixel_values"]  # (B, G, 3, H, W): a pair's winner first (G = 2), or one unpaired image
        pixels = torch.cat(pixels.unbind(1)).to(device, non_blocking=True)  # (GB, 3, H, W)
        latents = comp.encode_images(pixels, posterior_eps).float()
        ids = {key: t.to(device, non_blocking=True) for key, t in batch.items() if key.startswith("input_ids")}
        cond = comp.conditioning(comp.encode_prompt(ids), batch["original_sizes"], batch["crop_top_lefts"],
                                 cfg.data.resolution)
        return latents, cond

    # ------------------------------------------------------------------ the loop
    def _batches(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(epoch, micro-batch) forever, starting at the resumed epoch and position.

        One DataLoader with persistent workers: the sampler runs in this process, so setting its epoch
        before each pass is enough; workers only decode the (pair, seed) keys they are sent."""
        cfg = self.cfg
        sharded = ShardedPairSampler(self.sampler, cfg.data.batch_size, self.accelerator.process_index, self.world)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.data.batch_size, sampler=sharded, collate_fn=collate_packed,
            num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0, drop_last=True,
            pin_memory=self.accelerator.device.type == "cuda")
        epoch, start = self.state.epoch, self.state.position
        while True:
            self.sampler.set_epoch(epoch, start=start * cfg.data.batch_size * self.world)
            for batch in loader:
                yield epoch, unpack_batch(batch)
            epoch, start = epoch + 1, 0

    def run(self) -> Path:
        """Train to `train.max_steps` (resuming if asked), writing metrics, checkpoints, grids and final/."""
        cfg, acc = self.cfg, self.accelerator
        self._prepare_output()
        if self.resume_from is not None:
            self.state = self._load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {self.state.step}")
        self._truncate_metrics(self.state.step)
        if acc.is_main_process:
            acc.init_trackers(cfg.train.tracker_project, config=_flat_config(cfg),
                              init_kwargs=init_kwargs(self.trackers or [],
                                                      cfg.train.run_name or self.output_dir.resolve().name))
        accum = cfg.train.gradient_accumulation_steps
        progress = _progress(cfg.train.max_steps, self.state.step, acc.is_main_process)
        batches = self._batches()
        t0 = time.perf_counter()
        while self.state.step < cfg.train.max_steps:
            sums: dict[str, Tensor] = {}
            for k in range(accum):
                epoch, batch = next(batches)
                micro_step = self.state.step * accum + k
                with acc.accumulate(self.denoiser):  # no gradient all-reduce before the last micro-step
                    out = self.step(batch, micro_step)
                    acc.backward(out.loss)  # divided by the accumulation steps inside
                for key, v in out.metrics.items():
                    sums[key] = sums.get(key, 0) + v / accum
                self._advance_position(epoch)
            if self.in_backward is not None:
                grad_norm = self.in_backward.grad_norm().to(acc.device)
            else:
                grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or float("inf"))
            record = self._reduce(sums, grad_norm)  # the step's one host sync
            # Check before the update: a NaN/inf must never reach the weights. (Under fp16 the gradient
            # scaler already skips steps with inf gradients, so there only the loss is checked. DeepSpeed
            # applies the update inside backward(); there this check can only stop the run after it.)
            # (an engine that clips internally without reporting the norm logs it as NaN: only the loss counts)
            norm_known = cfg.train.mixed_precision != "fp16" and grad_norm is not None
            values = [record["loss"]] + ([record["grad_norm"]] if norm_known else [])
            finite = all(math.isfinite(v) for v in values)
            if not finite and self.in_backward is not None:
                raise UserError(f"non-finite loss or gradient at step {self.state.step + 1} (loss {record['loss']}, "
                                f"grad norm {record['grad_norm']}); with optim.step_in_backward the weights were "
                                "already updated with it, so resume from the last checkpoint with a lower optim.lr")
            if not finite and not cfg.train.skip_nonfinite:
                raise UserError(f"non-finite loss or gradient at step {self.state.step + 1} (loss {record['loss']}, "
                                f"grad norm {record['grad_norm']}); the weights were not updated. Lower optim.lr, "
                                "use bf16 instead of fp16, or set train.skip_nonfinite=true to skip such steps")
            record["lr"] = self.lr_scheduler.get_last_lr()[0]  # the rate this update uses
            if not apply_update(self.optimizer, self.lr_scheduler, acc.scaler, finite):
                self.state.skipped_steps += 1
            elif self.average is not None:
                self.average.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            record = self._write_metrics(record, time.perf_counter() - t0)
            t0 = time.perf_counter()
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}", refresh=False)
            progress.update(1)
            self._maybe_checkpoint()
            self._maybe_validate()
        progress.close()
        final = self._save_final()
        # accelerate's end_training would also destroy the process group, which the caller may still need
        # (iterate trains round after round in one process group); it goes when the process exits
        for tracker in acc.trackers:
            tracker.finish()
        if cfg.train.push_to_hub and acc.is_main_process:
            from diffusion_dpo.push import push_run

            acc.print(f"pushed: {push_run(self.output_dir, cfg.train.push_to_hub, private=cfg.train.hub_private)}")
        return final

    def _advance_position(self, epoch: int) -> None:
        if epoch != self.state.epoch:
            self.state.epoch, self.state.position = epoch, 0
        self.state.position += 1

    # ------------------------------------------------------------------ outputs
    def _prepare_output(self) -> None:
        if self.accelerator.is_main_process:
            try:
                if self.cfg.overwrite and self.resume_from is None:
                    ckpt.clear_run(self.output_dir)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                ckpt.mark_run(self.output_dir)
                write_pins(self.output_dir, self.pins)
                (self.output_dir / "config.yaml").write_text(to_yaml(self.cfg))
            except OSError as exc:
                raise UserError(f"output_dir '{self.output_dir}': {exc.strerror or exc}") from None
        self.accelerator.wait_for_everyone()

    def _truncate_metrics(self, step: int) -> None:
        """Keep metrics.jsonl consistent with the resumed step (drop lines a crashed run wrote after it)."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        if step == 0:
            self.metrics_path.unlink()
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def _reduce(self, sums: dict[str, Tensor], grad_norm: Tensor) -> dict[str, float]:
        """The step's metrics averaged over processes, as floats (one host sync per optimizer step)."""
        acc = self.accelerator
        if grad_norm is None:  # an engine that clips internally and does not report the norm
            grad_norm = float("nan")
        keys = METRIC_KEYS + (("loser_scale",) if self.cfg.loss.safeguard else ())
        stacked = torch.stack([sums[k].float() for k in keys]
                              + [torch.as_tensor(grad_norm, device=acc.device).float()])
        values = acc.reduce(stacked, reduction="mean").tolist()
        return {**dict(zip(keys, values[:-1])), "grad_norm": values[-1]}

    def _write_metrics(self, record: dict[str, float], seconds: float) -> dict[str, Any]:
        """Append the step's line to metrics.jsonl and the trackers (main process)."""
        acc = self.accelerator
        record = {"step": self.state.step, "epoch": self.state.epoch, **record,
                  "pairs_per_s": self.pairs_per_step / max(seconds, 1e-9), "skipped_steps": self.state.skipped_steps}
        for key in NOT_ALWAYS_RUN:  # null, not NaN, when the step did not compute it (SFT skips the losers)
            if isinstance(record.get(key), float) and math.isnan(record[key]):
                record[key] = None
        if acc.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")  # one write per line: a kill leaves at most one partial line
            acc.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=self.state.step)
            if self.callback is not None:
                self.callback(dict(record))
        return record

    def _write_weights(self, directory: Path) -> None:
        model = self.accelerator.unwrap_model(self.denoiser)
        if self.lora:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            self.components.save_lora(model, directory)
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(state, directory / "lora_peft.safetensors")
        else:
            model.save_pretrained(directory / self.components.denoiser_role, safe_serialization=True)
        if self.average is not None:
            self.average.save(directory)

    def _read_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.denoiser)
        if self.lora:
            from peft.utils import set_peft_model_state_dict

            path = directory / "lora_peft.safetensors"
            if not path.is_file():
                raise UserError(f"train.resume: {directory} has no LoRA weights (was it a full fine-tune?)")
            result = set_peft_model_state_dict(model, load_file(path, device=str(self.accelerator.device)))
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"train.resume: {path} does not match lora settings "
                                f"(unexpected {result.unexpected_keys[0]})")
        else:
            role = self.components.denoiser_role
            path = directory / role / "diffusion_pytorch_model.safetensors"
            if not path.is_file():
                raise UserError(f"train.resume: {directory} has no full {role} weights (was it a LoRA run, or "
                                "another model family?)")
            try:
                model.load_state_dict(load_file(path, device=str(self.accelerator.device)))
            except RuntimeError as exc:  # other shapes or names: another model's checkpoint
                raise UserError(f"train.resume: {path} does not fit {self.cfg.model.pretrained} "
                                f"({str(exc).splitlines()[0][:200]})") from None
        if self.average is not None:
            self.average.load(directory)

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.train.checkpointing_steps
        if every and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Optional[Path]:
        """Write checkpoint-<step>/ (the main process; every process waits for it).

        Under FSDP/DeepSpeed each process first writes its shards of the model and optimizer states into
        the staging directory's `engine/` (accelerate's save_state); the rename still makes it atomic."""
        acc = self.accelerator
        if self.sharded:
            if acc.is_main_process:
                ckpt.new_staging_dir(self.output_dir, self.state.step)
            acc.wait_for_everyone()
            acc.save_state(str(ckpt.staging_dir(self.output_dir, self.state.step) / ENGINE_DIR))
            acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(self.output_dir, self.state, None if self.sharded else self._write_weights,
                                        None if self.sharded else self.optimizer, self.lr_scheduler,
                                        self.cfg.train.checkpoints_total_limit,
                                        scaler=None if self.sharded else acc.scaler, staged=self.sharded)
        acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path) -> ckpt.TrainState:
        """Restore a checkpoint written by a run with the same engine (sharded or not)."""
        engine = path / ENGINE_DIR
        if self.sharded != engine.is_dir():
            how = ("an FSDP/DeepSpeed run; resume it under the same accelerate --config_file" if engine.is_dir()
                   else "a DDP or one-process run; resume it without FSDP/DeepSpeed")
            raise UserError(f"train.resume: {path} was written by {how} (sharded and plain states do not mix)")
        if self.sharded:
            self.accelerator.load_state(str(engine))  # every process reads its shards
            return ckpt.load_checkpoint(path, None, None, self.lr_scheduler)
        return ckpt.load_checkpoint(path, self._read_weights, self.optimizer, self.lr_scheduler,
                                    scaler=self.accelerator.scaler)

    def _maybe_validate(self, final: bool = False) -> None:
        every = self.cfg.validation.every_steps
        if every < 0 or not self.cfg.validation.prompts:
            return
        if not final and (every == 0 or self.state.step % every != 0 or self.state.step == self.cfg.train.max_steps):
            return
        if self.accelerator.is_main_process:
            from diffusion_dpo.evaluation.grids import write_validation_grid

            v = self.cfg.validation
            path = self.output_dir / "samples" / f"step-{self.state.step:06d}.png"
            components = self.components
            if components.vae is None:
                # Training from a cache holds no VAE or text encoders; a grid needs them, for the grid only.
                components = load_components(self.cfg.model, self.weight_dtype, self.accelerator.device,
                                             denoiser=False, flow=self.cfg.flow)
            with self._averaged():  # the grid shows what final/ will hold
                write_validation_grid(path, components, self.accelerator.unwrap_model(self.denoiser),
                                      self.reference, v.prompts, v.seeds, self.cfg.data.resolution,
                                      v.num_inference_steps, v.guidance_scale, autocast=self.accelerator.autocast)
            log_image(self.accelerator.trackers, "validation/reference_vs_policy", path, self.state.step)
        self.accelerator.wait_for_everyone()

    def _write_card(self, directory: Path) -> None:
        """final/README.md: the model card (base, data, loss and beta, steps, batch, lr, the last grid)."""
        comp, cfg = self.components, self.cfg
        grid = self.output_dir / "samples" / f"step-{self.state.step:06d}.png"
        facts = RunFacts(family_title=comp.title, family_tags=comp.card_tags,
                         pipeline_class=comp.pipeline_class.__name__, pairs=self.num_pairs, steps=self.state.step,
                         skipped_steps=self.state.skipped_steps, pairs_per_step=self.pairs_per_step,
                         lr=cfg.optim.lr * self.pairs_per_step if cfg.optim.scale_lr else cfg.optim.lr,
                         grid=grid if grid.is_file() else None)
        write_card(directory, cfg, facts)

    def _save_final(self) -> Path:
        """final/: a diffusers pipeline (full fine-tune) or pytorch_lora_weights.safetensors (LoRA)."""
        acc = self.accelerator
        final = self.output_dir / "final"
        self._maybe_validate(final=True)
        # sharded parameters (full fine-tunes only: LoRA is refused under FSDP/DeepSpeed) are gathered into
        # one full state dict on the main process (a collective)
        full_state = acc.get_state_dict(self.denoiser) if self.sharded else None
        with self._averaged():
            self._write_final(final, full_state)
        acc.wait_for_everyone()
        return final

    def _averaged(self):
        """A block in which the denoiser holds the weight average (train.ema_decay), or a no-op without one."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def _write_final(self, final: Path, full_state: Optional[dict]) -> None:
        """Write final/ atomically (main process): final.tmp/, then a rename."""
        acc = self.accelerator
        if acc.is_main_process:
            tmp = self.output_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model = acc.unwrap_model(self.denoiser)
            try:
                tmp.mkdir(parents=True)
                if self.lora:
                    self.components.save_lora(model, tmp)
                else:
                    if full_state is not None:  # a plain (unsharded) denoiser holding the gathered weights
                        model = type(model).from_config(model.config)
                        model.load_state_dict(full_state)
                    self.components.save_pipeline(model, tmp)
                self._write_card(tmp)
            except OSError as exc:  # disk full, quota: the last checkpoint still holds the run
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"cannot write {final}: {exc.strerror or exc}; the run can be finished with "
                                "--train.resume latest once there is space") from None
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)


def apply_update(optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: Optional[Any], finite: bool) -> bool:
    """The update at the end of an optimizer step, or its skip; True when the weights were updated.

    A step is skipped when its loss or gradient is not finite (with `train.skip_nonfinite`) or when fp16's grad
    scaler finds inf/NaN gradients and skips it itself (`step_was_skipped`). A skipped step moves neither the
    weights nor the LR schedule, so the schedule counts updates, as accelerate's own scheduler wrapper does.
    Under fp16 the clipping has already unscaled the gradients (`unscale_`): the scaler must still `update()`
    after a skip (lowering its scale when it saw inf), or the next step's `unscale_` fails ("unscale_() has
    already been called on this optimizer since the last update()")."""
    if finite:
        optimizer.step()  # under fp16: scaler.step (skipped by the scaler on inf gradients) + scaler.update
        updated = not getattr(optimizer, "step_was_skipped", False)
    else:
        if scaler is not None:
            scaler.update()
        updated = False
    if updated:
        lr_scheduler.step()
    return updated


def check_launcher_precision(mixed_precision: str) -> None:
    """Refuse a precision set in two places that disagree: `accelerate launch --mixed_precision fp16` (or an
    accelerate config file saying so) reaches the process as ACCELERATE_MIXED_PRECISION, which
    `train.mixed_precision` would silently override. "no" there is also accelerate launch's default when nothing
    was asked, so only an fp16/bf16 request is checked."""
    import os

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("fp16", "bf16") and launcher != mixed_precision:
        raise UserError(f"accelerate launch sets mixed precision {launcher} but train.mixed_precision is "
                        f"{mixed_precision}; set the precision in one place: --train.mixed_precision {launcher}, "
                        "or drop it from the accelerate launch command/config")


def _configure_deepspeed(ds: dict[str, Any], cfg: Config) -> None:
    """Fill the DeepSpeed config values accelerate cannot infer: we prepare no DataLoader (the sampler is
    ours), so the micro-batch size is given here; clipping follows optim.max_grad_norm; our optimizers are
    torch/transformers ones, which ZeRO accepts when told to."""
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro-batch x accumulation x processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    ds.setdefault("zero_allow_untested_optimizer", True)


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The config flattened to scalars (TensorBoard's hparams accept no lists or None)."""
    out = {}
    for section, values in asdict(cfg).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for k, v in items:
            key = f"{section}.{k}" if k else section
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # in a log file (not a terminal) a bar redrawn 10x a second is one endless line: redraw every 30 s
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)


def train(cfg: Config, dataset: Optional[Any] = None, callback: Optional[MetricsCallback] = None) -> Path:
    """Train with `cfg` (optionally on an in-memory `dataset`, calling `callback(metrics)` after every step) and
    return the `final/` directory. See `Trainer`."""
    return Trainer(cfg, dataset=dataset, callback=callback).run()
