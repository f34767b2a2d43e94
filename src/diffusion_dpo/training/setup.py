"""Setting a run up, in the order that fails cheapest first: the launcher and engine checks, the data (pairs
validated on the fly, or the cache and the precomputed reference errors), then the model with its LoRA adapters,
its reference and speed options, and the optimizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo.cache.build import build_cache
from diffusion_dpo.cache.reference import ReferenceTable, WithReference, precompute_reference, reference_path
from diffusion_dpo.cache.store import Cache, CachedPairs
from diffusion_dpo.config import Config, DataConfig, LoraConfig, OptimConfig, TrainConfig
from diffusion_dpo.data.image_checks import shared_by
from diffusion_dpo.data.items import PairSampler, PreferenceDataset, locality_of
from diffusion_dpo.data.pairs import pairs_from_memory
from diffusion_dpo.data.stream import StreamedPairs, StreamSource, open_stream
from diffusion_dpo.data.unpaired import Feedback, load_feedback, split_pairs
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import Family, add_lora, cast
from diffusion_dpo.models.quantize import quantize_base
from diffusion_dpo.models.lora import continue_adapters
from diffusion_dpo.models.reference import Reference, build_reference
from diffusion_dpo.processes import agree, attempt, decide_once, init_kwargs
from diffusion_dpo.training.losses import LossSpec


def make_accelerator(train: TrainConfig, output_dir: Path, trackers: Optional[list[str]]) -> Any:
    """accelerate's Accelerator for this run: its precision, accumulation and trackers."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # accelerate keeps one state per process; a second run in the same process (a notebook, the
    # tests) with another precision would be refused. The process group itself is left alone.
    AcceleratorState._reset_state(reset_partial_state=False)
    check_launcher_precision(train.mixed_precision)
    acc = Accelerator(
        # without CUDA, say so: only then does accelerate run several CPU processes over gloo
        cpu=not torch.cuda.is_available(),
        mixed_precision=train.mixed_precision, log_with=trackers,
        # accelerate's own accumulation: DDP's no_sync, FSDP, and DeepSpeed's engine (which owns the
        # micro-step boundary and the update) all follow it; the loss is divided by it in backward()
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # applies where this Accelerator starts the process group (not when iterate's rounds already did)
        kwargs_handlers=[InitProcessGroupKwargs(**init_kwargs(train.process_group_timeout_minutes))])
    if train.mixed_precision == "fp16" and acc.device.type != "cuda":
        raise UserError(f"train.mixed_precision=fp16 needs a CUDA GPU (this run is on {acc.device.type}); "
                        "use bf16 or no")
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return acc


def check_launcher_precision(mixed_precision: str) -> None:
    """Refuse a precision set in two places that disagree: `accelerate launch --mixed_precision fp16` (or an
    accelerate config file saying so) reaches the process as ACCELERATE_MIXED_PRECISION, which
    `train.mixed_precision` would silently override. "no" there is also accelerate launch's default when nothing
    was asked, so only an fp16/bf16 request is checked."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("fp16", "bf16") and launcher != mixed_precision:
        raise UserError(f"accelerate launch sets mixed precision {launcher} but train.mixed_precision is "
                        f"{mixed_precision}; set the precision in one place: --train.mixed_precision {launcher}, "
                        "or drop it from the accelerate launch command/config")


def check_engine(accelerator: Any, cfg: Config) -> bool:
    """Whether parameters are sharded over processes (FSDP, DeepSpeed), after refusing what such a run cannot do;
    DeepSpeed's config gets the values accelerate cannot infer."""
    from accelerate.utils import DistributedType

    # FSDP and DeepSpeed shard parameters and optimizer states over processes: their checkpoints go
    # through accelerate's save_state/load_state, and final weights are gathered with get_state_dict.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and cfg.lora.rank > 0:
        # LoRA's trainable state is a few MB and its frozen base is not sharded by ZeRO-2 anyway; mixed
        # frozen/trainable (and bf16/fp32) parameters in one sharded group is what FSDP handles worst
        raise UserError("lora.rank > 0 under FSDP/DeepSpeed: LoRA needs no sharding; launch it with DDP "
                        "(plain `accelerate launch`, or configs/accelerate/multi_gpu.yaml)")
    if sharded and cfg.train.ema_decay > 0:  # each process holds only shards of the weights to average
        raise UserError("train.ema_decay under FSDP/DeepSpeed: the weight average needs unsharded weights; "
                        "launch with DDP (plain `accelerate launch`) or set train.ema_decay 0")
    if (accelerator.num_processes > 1 or sharded) and cfg.optim.step_in_backward:
        raise UserError("optim.step_in_backward runs on one process only: each parameter is updated before "
                        "gradients could be averaged over processes; launch a single process or turn it off")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.data, cfg.optim)
    return sharded


def configure_deepspeed(ds: dict[str, Any], data: DataConfig, optim: OptimConfig) -> None:
    """Fill the DeepSpeed config values accelerate cannot infer: we prepare no DataLoader (the sampler is
    ours), so the micro-batch size is given here; clipping follows optim.max_grad_norm; our optimizers are
    torch/transformers ones, which ZeRO accepts when told to."""
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = data.batch_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro-batch x accumulation x processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = optim.max_grad_norm
    ds.setdefault("zero_allow_untested_optimizer", True)


@dataclass
class TrainingData:
    """The run's items: validated pairs read on the fly, or a cache (with, if asked, the precomputed reference)."""

    pairs: Optional[Feedback] = None
    cache: Optional[Cache] = None
    reference_table: Optional[ReferenceTable] = None
    stream: Optional[StreamSource] = None  # data.streaming: this process's shards, read as training goes

    @property
    def num_items(self) -> Optional[int]:
        """Usable items (None for a stream: they are not counted ahead)."""
        if self.stream is not None:
            return None
        return self.cache.num_pairs if self.cache is not None else len(self.pairs)

    @property
    def images_per_item(self) -> int:
        found = next(d for d in (self.cache, self.stream, self.pairs) if d is not None)
        return found.images_per_item

    def sampler(self, data: DataConfig, seed: int) -> PairSampler:
        """The run's order: pairs read in place from parquet keep to windows of row groups (`data.parquet`)."""
        locality = locality_of(self.pairs, data.shuffle_window_mb) if self.cache is None else None
        return PairSampler(self.num_items, seed=seed, locality=locality)

    def dataset(self, data: DataConfig, tokenizer: Any, seed: int, rank: int) -> torch.utils.data.Dataset:
        """Items keyed by (pair index, sample seed), as the loop's sampler sends them; for a stream, this process's
        items in the stream's own order (`data.stream`)."""
        if self.stream is not None:
            return StreamedPairs(self.stream, data, tokenizer, seed, rank)
        if self.cache is None:
            return PreferenceDataset(self.pairs, data, tokenizer)
        items = CachedPairs(self.cache, data.random_flip, data.proportion_empty_prompts)
        return WithReference(items, self.reference_table) if self.reference_table is not None else items


def open_data(accelerator: Any, cfg: Config, in_memory: Optional[Any], loss: LossSpec) -> TrainingData:
    """The validated pairs (on the fly), or the cache and, if asked, the precomputed reference errors; all
    checked before any model loads, so a stale cache or a short reference file fails in seconds. A one-line error on
    any process stops every process (`processes.agree`)."""
    acc = accelerator
    if cfg.data.streaming:  # each process opens its own shards: nothing is read before training
        stream = agree(acc, attempt(lambda: open_stream(cfg.data, acc.process_index, acc.num_processes)))
        acc.print(stream.summary())
        return TrainingData(stream=stream)
    if not cfg.cache.dir:
        def pairs() -> Feedback:
            if in_memory is None:
                return load_feedback(cfg.data)
            found = pairs_from_memory(in_memory, cfg.data)
            return split_pairs(found) if cfg.data.unpaired else found

        # Every process reads the data; the image check is split over them (`image_checks.shared_by`).
        with shared_by(acc.state):
            outcome = attempt(pairs)
        found = agree(acc, outcome)
        acc.print(found.summary())
        return TrainingData(pairs=found)

    if cfg.cache.auto:  # what is missing is built by every process, each its share (a complete cache: checked)
        build_cache(cfg.model, cfg.data, cfg.cache, cfg.flow, acc.device, acc.print, state=acc.state,
                    mixed_precision=cfg.train.mixed_precision)
    # refuses a cache made with other settings, on every process
    store = agree(acc, attempt(lambda: Cache.open(cfg.model, cfg.data, cfg.cache, cfg.train.mixed_precision)))
    acc.print(f"cache {cfg.cache.dir}: {store.manifest['summary']}")
    table = None
    if cfg.cache.reference == "precomputed" and loss.needs_reference:
        sections = (cfg.model, cfg.lora, cfg.flow, cfg.data, cfg.train, cfg.cache)
        if cfg.cache.auto and decide_once(acc.state, lambda: not reference_path(cfg.cache).is_file()):
            precompute_reference(*sections, acc.device, acc.num_processes, acc.print, state=acc.state)
        table = agree(acc, attempt(lambda: ReferenceTable.open(*sections, store, acc.num_processes,
                                                               acc.device.type)))
    return TrainingData(cache=store, reference_table=table)


def check_items(data: TrainingData, loss_name: str, loss: LossSpec, cfg_data: DataConfig, processes: int) -> None:
    """Refuse pairs for an unpaired loss (and the reverse) and a data set smaller than one global batch."""
    source = f"data.path '{cfg_data.path or 'in-memory dataset'}'"
    if loss.unpaired and data.images_per_item != 1:
        raise UserError(f"loss.name {loss_name} trains on unpaired items (prompt, image, label) and {source} "
                        "holds pairs; set data.unpaired=true to split each pair into its winner and its loser")
    if not loss.unpaired and data.images_per_item != 2:
        raise UserError(f"loss.name {loss_name} trains on pairs and {source} holds unpaired items"
                        + (" (data.unpaired=true)" if cfg_data.unpaired else "") + "; use loss.name kto")
    if data.num_items is not None and data.num_items < cfg_data.batch_size * processes:
        raise UserError(f"{source}: {data.num_items} usable pairs is fewer than one batch "
                        f"(data.batch_size {cfg_data.batch_size} x {processes} processes)")


def trainable_parameters(family: Family, lora: LoraConfig, weight_dtype: torch.dtype
                         ) -> tuple[list[torch.nn.Parameter], Optional[dict]]:
    """The parameters to train (LoRA's adapters on a frozen base in the compute dtype, or every weight) and, when
    `lora.init_from` continues earlier adapters, their starting state (the reference may need it)."""
    model = family.denoiser
    if lora.rank == 0:
        return _reaching_the_output(family, list(model.parameters())), None
    cast(model, weight_dtype)  # the frozen base in the compute dtype; LoRA weights stay fp32
    quantize_base(model, family.cfg.quantize_base, weight_dtype)  # model.quantize_base: its block linears in fewer bits
    params = add_lora(model, lora, family.default_lora_targets)
    init_state = None
    if lora.init_from:  # continue earlier adapters (iterate's rounds)
        init_state = continue_adapters(model, lora, family.denoiser_role, family.lora_diffusers_naming)
    return _reaching_the_output(family, params), init_state


def _reaching_the_output(family: Family, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """`params` less those of the family's `unused_parameters` (adapters on those layers included), which are frozen:
    their gradient would never come, and DDP would wait for it. Alone, a run is unchanged (the optimizer skips a
    parameter without a gradient)."""
    unused = family.unused_parameters()
    if not unused:
        return params
    for name, p in family.denoiser.named_parameters():
        if name.startswith(unused):
            p.requires_grad_(False)
    return [p for p in params if p.requires_grad]


def make_reference(cfg: Config, family: Family, loss: LossSpec, precomputed: bool, weight_dtype: torch.dtype,
                   device: torch.device, init_state: Optional[dict]) -> Optional[Reference]:
    """The reference (models/reference.py): the starting weights, adapters off, or model.reference; for a full
    fine-tune only if the loss needs one and its errors are not precomputed. With precomputed errors LoRA keeps it
    for the sample grids only. A reference-free loss (mapo, sft) never loads one: LoRA's adapters-off view serves
    the grids at no cost."""
    lora = cfg.lora.rank > 0
    live = loss.needs_reference and not precomputed
    if loss.needs_reference and (lora or live):
        return build_reference(family.denoiser, cfg.model, cfg.lora, family, weight_dtype, device, init_state)
    return Reference(family.denoiser, lora=True, dtype=weight_dtype) if lora else None


def apply_speed_options(model: torch.nn.Module, reference: Optional[Reference], train: TrainConfig) -> None:
    """Gradient checkpointing, channels-last memory and torch.compile, as train asks (the reference copy too)."""
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    frozen = reference.copy if reference is not None else None
    if train.channels_last:  # NHWC convolutions: faster tensor-core kernels under bf16/fp16 on GPUs
        model.to(memory_format=torch.channels_last)
        if frozen is not None:
            frozen.to(memory_format=torch.channels_last)
    if train.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and unwrap_model stay as they are.
        model.compile()
        if frozen is not None:
            frozen.compile()
