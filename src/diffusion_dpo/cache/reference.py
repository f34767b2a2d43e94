"""The precomputed reference: the frozen reference model's per-pair errors, computed once, ahead of training.

The reference model never changes, so its errors ref_w, ref_l for a pair depend only on what the pair sees:
its latents (the cache), its flip and caption (`randomness.item_draws`) and its timestep, noise and posterior
draws (`randomness.pair_noise`), all fixed by the pair's sample seed, which `PairSampler` derives from
(train.seed, epoch, position). So the errors of a whole training run can be computed before it starts, in
one inference-only pass with large batches (`cache.batch_size`) and no gradients:

    diffusion-dpo cache --config run.yaml --cache.dir cache/x --reference [--num-processes N]
    diffusion-dpo train --config run.yaml --cache.dir cache/x --cache.reference precomputed

Training then holds no reference model (no frozen copy for a full fine-tune, no adapters-off forward for
LoRA). The file (`reference.safetensors` beside the cache) maps each sample seed of the run to its
(ref_w, ref_l) and records what they depend on (reference weights, seed, data order, empty-prompt rate,
flip, precision, device type); a run that differs in any of them, or needs a pair the file does not hold,
is refused with one line, never silently given another reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from diffusion_dpo.cache.chunks import ChunkWriter, chunk, num_chunks, open_plan, save_whole, written
from diffusion_dpo.cache.identity import reference_identity
from diffusion_dpo.cache.store import Cache, CachedPairs, cached_inputs
from diffusion_dpo.config import CacheConfig, DataConfig, FlowConfig, LoraConfig, ModelConfig, TrainConfig
from diffusion_dpo.data.items import PairSampler, collate_packed, keys_per_epoch, unpack_batch
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import add_lora, cast, load_components, weight_dtype_of
from diffusion_dpo.models.reference import reference_kind
from diffusion_dpo.processes import Share
from diffusion_dpo.randomness import pair_noise

REFERENCE_FORMAT = 1
DEFAULT_NAME = "reference.safetensors"


def reference_path(cache: CacheConfig) -> Path:
    """`cache.reference_file`, or reference.safetensors in cache.dir."""
    if cache.reference_file:
        return Path(cache.reference_file).expanduser()
    return Path(cache.dir).expanduser() / DEFAULT_NAME


def _reference_denoiser(model: ModelConfig, lora: LoraConfig, comp: Any, device: torch.device,
                        dtype: torch.dtype) -> torch.nn.Module:
    """The reference model as training holds it (models.reference.build_reference): model.reference's denoiser,
    or the base with lora.init_from's adapters (without dropout), or the base itself; a LoRA run's base in the
    bits of model.quantize_base."""
    from diffusion_dpo.models.loading import load_reference_denoiser
    from diffusion_dpo.models.lora import continue_adapters, with_saved_alpha
    from diffusion_dpo.models.quantize import quantize_base

    lora = with_saved_alpha(lora, comp.denoiser_role)  # as the training run continues them
    kind = reference_kind(model, lora)
    base = load_reference_denoiser(model, type(comp), device) if kind == "elsewhere" else comp.denoiser
    if lora.rank > 0:
        quantize_base(cast(base, dtype), model.quantize_base, dtype)
    if kind == "elsewhere":
        return base
    if kind == "start_adapters":
        add_lora(comp.denoiser, replace(lora, dropout=0.0), comp.default_lora_targets)
        continue_adapters(comp.denoiser, lora, comp.denoiser_role, comp.lora_diffusers_naming)
    return comp.denoiser


def run_coverage(data: DataConfig, train: TrainConfig, num_pairs: int, num_processes: int) -> tuple[int, int]:
    """(keys per epoch, keys in the run) of a training run: every process takes data.batch_size pairs of each
    global batch, an incomplete last global batch of an epoch is dropped (`ShardedPairSampler`)."""
    per_step = data.batch_size * num_processes * train.gradient_accumulation_steps
    return keys_per_epoch(num_pairs, data.batch_size, num_processes), train.max_steps * per_step


def _epochs(keys_per_epoch: int, num_keys: int) -> list[int]:
    """Positions used in each epoch, in order: the run's keys are epochs' prefixes."""
    full, rest = divmod(num_keys, keys_per_epoch)
    return [keys_per_epoch] * full + ([rest] if rest else [])


def run_keys(num_pairs: int, seed: int, keys_per_epoch: int, num_keys: int) -> Iterator[tuple[int, int]]:
    """(pair_index, sample_seed) of every pair the run visits, in order (the same `PairSampler` as training)."""
    sampler = PairSampler(num_pairs, seed=seed)
    for epoch, used in enumerate(_epochs(keys_per_epoch, num_keys)):
        order = sampler.order(epoch)
        for position in range(used):
            yield int(order[position]), sampler.sample_seed(epoch, position)


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """The autocast the training step runs its reference under (accelerate's, for the same precision)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def precompute_reference(model: ModelConfig, lora: LoraConfig, flow: FlowConfig, data: DataConfig, train: TrainConfig,
                         cache: CacheConfig, device: torch.device | str = "cpu", num_processes: int = 1,
                         log: Any = print, state: Any = None) -> Path:
    """Compute the reference errors of every pair a training run with these settings on `num_processes` processes
    visits and write them to `reference_path(cache)`. With `state` (accelerate's process state under `accelerate
    launch`) every process computes its share of the chunks, and every process must call it. The chunks
    (`<file>.parts/`, whole batches of `cache.batch_size`) do not depend on how many processes compute them, so the
    errors are those of one pass and a killed run resumes, on any number of processes, after its finished chunks."""
    device = torch.device(device)
    if train.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.mixed_precision=fp16 needs a CUDA GPU (this is {device.type}); use bf16 or no")
    procs = Share(state)
    log = log if procs.is_main else (lambda *a, **k: None)
    store = procs.all_do(lambda: Cache.open(model, data, cache, train.mixed_precision))
    keys_per_epoch, num_keys = run_coverage(data, train, store.num_pairs, num_processes)
    info = {"format": REFERENCE_FORMAT,
            "identity": reference_identity(model, lora, flow, data, train, store.manifest, device.type),
            "keys_per_epoch": keys_per_epoch, "num_keys": num_keys, "num_processes": num_processes,
            "max_steps": train.max_steps}
    path = reference_path(cache)
    parts = path.with_name(path.name + ".parts")
    size = cache.batch_size * max(1, -(-cache.shard_pairs // cache.batch_size))
    plan = {"reference": info, "chunk": size, "batch_size": cache.batch_size}
    kept = (str(path), parts, "diffusion-dpo cache --reference")  # where a failed write's finished chunks wait
    procs.main_does(lambda: written(lambda: open_plan(parts, plan, "reference errors", log), *kept))
    files = [parts / f"part-{j:05d}.safetensors" for j in range(num_chunks(size, num_keys))]
    mine = procs.of_missing(list(range(len(files))), lambda j: files[j].is_file())

    def compute() -> None:
        if mine:
            keys = list(run_keys(store.num_pairs, train.seed, keys_per_epoch, num_keys))
            _compute_errors(model, lora, flow, data, train, cache, store, device,
                            [[keys[k] for k in chunk(j, size, num_keys)] for j in mine],
                            [files[j] for j in mine], show=procs.is_main)

    procs.all_do(lambda: written(compute, *kept))

    def finish() -> None:
        from safetensors.torch import load_file

        done = [load_file(f) for f in files]
        merged = {name: torch.cat([d[name] for d in done]) if done else torch.zeros(0) for name in ("sample_seed", "ref_mse")}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_whole(merged, path, metadata={"reference": json.dumps(info)})
        shutil.rmtree(parts)

    procs.main_does(lambda: written(finish, *kept))
    log(f"reference errors: {num_keys} pairs ({train.max_steps} steps) -> {path}")
    return path


def _compute_errors(model: ModelConfig, lora: LoraConfig, flow: FlowConfig, data: DataConfig, train: TrainConfig,
                    cache: CacheConfig, store: Cache, device: torch.device, chunks: list[list[tuple[int, int]]],
                    files: list[Path], show: bool) -> None:
    """The reference errors of the keys (pair_index, sample_seed) of each chunk, each chunk written whole."""
    from tqdm.auto import tqdm

    dtype = weight_dtype_of(train.mixed_precision)
    comp = load_components(model, dtype, device, encoders=False, flow=flow)
    # The reference as training holds it: the base denoiser in the compute dtype, in train mode (see
    # models.Reference: some diffusers blocks compute differently in eval mode).
    denoiser = cast(_reference_denoiser(model, lora, comp, device, dtype), dtype).requires_grad_(False).train()
    if train.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    batches = [keys[s:s + cache.batch_size] for keys in chunks for s in range(0, len(keys), cache.batch_size)]
    loader = torch.utils.data.DataLoader(CachedPairs(store, data.random_flip, data.proportion_empty_prompts),
                                         batch_sampler=batches, collate_fn=collate_packed,
                                         num_workers=data.num_workers, pin_memory=device.type == "cuda")
    writer = ChunkWriter([len(c) for c in chunks], files)
    with torch.no_grad():
        for batch in tqdm(loader, desc="reference errors", unit="batch", disable=not show):
            batch = unpack_batch(batch)
            b = batch["label"].shape[0]
            draws = pair_noise(batch["sample_seed"].tolist(), comp.draw_timestep,
                               comp.latent_shape(data.resolution), device, images=store.images_per_item,
                               posterior_shape=comp.posterior_shape(data.resolution))
            latents, cond = cached_inputs(batch, draws.posterior, comp, data.resolution, device, dtype)
            noisy, target = comp.noisy_and_target(latents, draws.noise, draws.timesteps)
            if train.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with _autocast(device, dtype):
                err = comp.mse(denoiser, noisy, draws.timesteps, cond, target)  # (GB,) [winners; losers]
            # (B, G): (ref_w, ref_l), or one unpaired image's
            writer.add(sample_seed=batch["sample_seed"], ref_mse=err.float().cpu().view(-1, b).T)


class ReferenceTable:
    """The precomputed errors of a run, looked up by sample seed (in the data pipeline, not in the step)."""

    def __init__(self, path: Path, seeds: np.ndarray, errors: torch.Tensor):
        order = np.argsort(seeds, kind="stable")
        self.path, self.seeds, self.errors = path, seeds[order], errors[torch.from_numpy(order)]

    @classmethod
    def open(cls, model: ModelConfig, lora: LoraConfig, flow: FlowConfig, data: DataConfig, train: TrainConfig,
             cache: CacheConfig, store: Cache, num_processes: int, device_type: str) -> "ReferenceTable":
        """Load `reference_path(cache)`, refusing (one line) one made for other settings or too short for this run."""
        from safetensors import safe_open

        path = reference_path(cache)
        redo = "recompute it with `diffusion-dpo cache --reference` and this run's config"
        if not path.is_file():
            raise UserError(f"cache.reference precomputed: {path} not found; compute it with "
                            "`diffusion-dpo cache --reference` and this run's config (or set cache.auto=true)")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {})["reference"])
                seeds, errors = f.get_tensor("sample_seed").numpy(), f.get_tensor("ref_mse")
        except Exception as exc:  # noqa: BLE001 - not a safetensors file, no metadata, missing tensors
            raise UserError(f"{path} is not a precomputed reference file ({type(exc).__name__}); {redo}") from None
        if info.get("format") != REFERENCE_FORMAT:
            raise UserError(f"{path} has format {info.get('format')} (this version reads {REFERENCE_FORMAT}); {redo}")
        identity = reference_identity(model, lora, flow, data, train, store.manifest, device_type)
        for key in [*identity, *(k for k in info["identity"] if k not in identity)]:  # a key only the file has too
            value = identity.get(key)
            if info["identity"].get(key) != value:
                raise UserError(f"{path} was computed with {key} = {info['identity'].get(key)!r}, this run has "
                                f"{value!r}; {redo}")
        keys_per_epoch, num_keys = run_coverage(data, train, store.num_pairs, num_processes)
        have = _epochs(info["keys_per_epoch"], info["num_keys"])
        need = _epochs(keys_per_epoch, num_keys)
        if len(need) > len(have) or any(n > h for n, h in zip(need, have)):
            raise UserError(f"{path} holds reference errors for {info['num_keys']} pairs ({info['max_steps']} steps on "
                            f"{info['num_processes']} process(es)), this run needs {num_keys} (train.max_steps "
                            f"{train.max_steps} x data.batch_size x accumulation x {num_processes} processes); "
                            f"{redo} (--num-processes {num_processes})")
        return cls(path, seeds, errors)

    def lookup(self, sample_seed: int) -> torch.Tensor:
        """(G,) the (ref_w, ref_l) of the pair with this sample seed (an unpaired item: (ref,)); a seed not in the
        file is an error."""
        i = int(np.searchsorted(self.seeds, sample_seed))
        if i == len(self.seeds) or self.seeds[i] != sample_seed:
            raise UserError(f"{self.path}: no reference errors for the pair with sample seed {sample_seed}; "
                            "recompute it with `diffusion-dpo cache --reference` and this run's config")
        return self.errors[i]


class WithReference(torch.utils.data.Dataset):
    """Cached items plus their precomputed reference errors as `ref_mse` (2,): (ref_w, ref_l)."""

    def __init__(self, items: CachedPairs, table: ReferenceTable):
        self.items, self.table = items, table

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        item = self.items[key]
        item["ref_mse"] = self.table.lookup(item["sample_seed"])
        return item
