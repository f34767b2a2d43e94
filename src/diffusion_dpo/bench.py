"""`diffusion-dpo bench`: the training step's time and memory against the bare compute floor, per mode.

For one config (one model, one batch size), every mode trains a few optimizer steps through the real
`Trainer` loop (data loading, the VAE and text encoders unless cached, the reference, the loss, the
backward, clipping, the optimizer, the one host sync) in its own subprocess, so that its peak memory
is its own. Between those steps, in the same process and on the same denoiser, it times the *floor*:
plain torch, the policy's forward + backward on the exact 2B latents the step just fed it, plus the
reference's forward on them when the mode runs a live reference. `step / floor` says how much the loop
adds to the compute that no implementation can avoid.

    diffusion-dpo bench --config configs/tiny.yaml --steps 20 --markdown bench.md

Step time is the median over the timed steps of the loop's wall time from one optimizer step to the next
(the floor's time between them left out), after `--warmup` untimed steps; the floor's is the median of
its `--floor-repeats` repetitions, spread over the timed steps (`InterleavedFloor`). Peak memory is training's,
from the end of loading to the last step: CUDA's max_memory_allocated; on the CPU, the process's peak
resident set over its size before any model was loaded. Loading's own peak is in the JSON
(`load_peak_memory_mib`). Time inside the VAE and the text encoders is measured by module hooks and
reported per step (zero, and "not loaded", when a run reads pre-encoded latents).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from diffusion_dpo.config import Config, load_config, to_yaml, validate
from diffusion_dpo.errors import UserError
from diffusion_dpo.metrics import peak_bytes, reset_peak_memory, rss_bytes


@dataclass(frozen=True)
class Mode:
    """One way of training the same model, on top of the user's config."""

    description: str
    lora: bool = False  # LoRA (rank --lora-rank, reference = adapters off) instead of a full fine-tune
    cached: bool = False  # latents and caption encodings from the pre-encoding cache
    precomputed: bool = False  # reference errors precomputed (needs the cache)
    loss: Optional[str] = None  # another loss than the config's (mapo: no reference model at all)


MODES: dict[str, Mode] = {
    "live": Mode("full fine-tune, frozen reference copy, images encoded every step"),
    "live+cache": Mode("full fine-tune, frozen reference copy, pre-encoded latents", cached=True),
    "lora": Mode("LoRA, reference = the same denoiser with adapters disabled, images encoded every step", lora=True),
    "lora+cache": Mode("LoRA, reference = adapters disabled, pre-encoded latents", lora=True, cached=True),
    "precomputed": Mode("full fine-tune, precomputed reference (no reference model), pre-encoded latents",
                        cached=True, precomputed=True),
    "mapo": Mode("full fine-tune, MaPO (reference-free: no reference model or pass), images encoded every step",
                 loss="mapo"),
    "mapo+cache": Mode("full fine-tune, MaPO (reference-free), pre-encoded latents", cached=True, loss="mapo"),
}
DEFAULT_MODES = ("live", "live+cache", "lora", "lora+cache", "precomputed")  # the mapo modes on request

# Dense bf16 tensor-core peaks (TFLOP/s) for model-FLOP utilisation; others: --peak-tflops.
GPU_PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


# ------------------------------------------------------------------ measurement helpers
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ModuleTimer:
    """Wall time spent inside some modules' forward passes (CUDA-synchronised), by forward hooks."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.seconds = 0.0
        self.modules = list(modules)
        self._start: Optional[float] = None
        self._depth = 0
        self._handles = []
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave))

    def _enter(self, *_: Any) -> None:
        if self._depth == 0:
            _sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._start is not None:
            _sync()
            self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class InputRecorder:
    """Keeps the arguments of the denoiser's last forward with gradients on: the policy's real 2B inputs."""

    def __init__(self, denoiser: torch.nn.Module):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._handle = denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.args, self.kwargs = args, kwargs

    def close(self) -> None:
        self._handle.remove()


def model_flop_counter() -> Any:
    """torch's FlopCounterMode, counting *model* FLOPs in fused attention on every device.

    torch counts the CUDA attention kernels but not the CPU's (`_scaled_dot_product_flash_attention_for_cpu`),
    which would count every attention layer on a CPU as zero. And its backward formula for the fused kernels
    includes their recomputation of QKᵀ, which is hardware work, not model work (MFU's numerator, as in
    PaLM's definition, leaves recomputation out). Here every fused attention kernel counts what the plain
    matmuls count: forward QKᵀ and PV, backward four matmuls of the same sizes."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return 2 * sdpa_flop_count(query, key, value)  # dV, dP, dQ, dK: twice the forward's two matmuls

    mapping = {}
    for kernel in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, kernel):  # the set of kernels varies across torch versions
            mapping[getattr(aten, kernel)] = forward
        if hasattr(aten, kernel + "_backward"):
            mapping[getattr(aten, kernel + "_backward")] = backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _prediction(out: Any) -> torch.Tensor:
    """The prediction in a denoiser's output, however it is returned: an output object's `.sample`, or a tuple's
    first element; a list of per-image tensors (Z-Image's) stacked."""
    sample = out.sample if hasattr(out, "sample") else out[0]
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


def _shape(x: Any) -> list[int]:
    """A denoiser input's shape; a list of per-image tensors (Z-Image's latents) as (N, *each)."""
    return [len(x), *x[0].shape] if isinstance(x, (list, tuple)) else list(x.shape)


class InterleavedFloor:
    """The floor, timed between the very training steps it is set against (a `MetricsLog` callback).

    The bare compute of one micro-step: the policy's forward + backward on the step's own 2B inputs, then the
    reference's forward on them (no_grad) when the trainer runs a live reference; the same autocast as training.
    It runs after every timed step (and after the last warm-up step), so step and floor sample the same moments:
    a shared machine's speed drifts by a third over seconds (BENCHMARKS.md), and a floor timed after
    training would meet another machine than the steps did. The loop's own time is measured from the end of one
    callback to the start of the next, so no floor time is in it. Model FLOPs are counted on the first call."""

    def __init__(self, trainer: Any, recorder: InputRecorder, warmup: int, per_step: int):
        self.trainer, self.recorder, self.warmup, self.per_step = trainer, recorder, warmup, per_step
        self.step_seconds: list[float] = []
        self.floor_seconds: list[float] = []
        self.flops: Optional[int] = None
        self._left: Optional[float] = None  # when the last callback returned

    def once(self) -> None:
        trainer = self.trainer
        acc, model, args, kwargs = trainer.accelerator, trainer.denoiser, self.recorder.args, self.recorder.kwargs
        with acc.autocast():
            out = _prediction(model(*args, **kwargs))
        out.float().pow(2).mean().backward()
        if trainer.loss_spec.needs_reference and trainer.reference is not None:
            with torch.no_grad(), acc.autocast(), trainer.reference.model(acc.unwrap_model(model)) as ref:
                ref(*args, **kwargs)
        model.zero_grad(set_to_none=True)

    def _timed(self) -> float:
        _sync()
        began = time.perf_counter()
        self.once()
        _sync()
        return time.perf_counter() - began

    def __call__(self, record: dict[str, Any]) -> None:
        _sync()
        arrived = time.perf_counter()
        if record["step"] > self.warmup and self._left is not None:
            self.step_seconds.append(arrived - self._left)
        if record["step"] >= self.warmup and record["step"] < self.trainer.cfg.train.max_steps:
            paused = self.trainer.in_backward.paused() if self.trainer.in_backward is not None else nullcontext()
            with paused:  # the floor is bare compute: no optimizer inside its backward
                if self.flops is None:
                    counter = model_flop_counter()
                    with counter:
                        self.once()
                    self.flops = int(counter.get_total_flops())
                    self.once()  # untimed: the counter's first call is not the steady state
                self.floor_seconds += [self._timed() for _ in range(self.per_step)]
        _sync()
        self._left = time.perf_counter()


def peak_tflops(device: torch.device, given: Optional[float]) -> Optional[float]:
    """The device's dense bf16 peak for MFU: --peak-tflops, else a known GPU's, else None (CPU)."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)


def _encoder_modules(components: Any) -> list[torch.nn.Module]:
    """The modules a cached run never calls: the VAE's encoder half (training calls `vae.encode`, not its
    forward) and the text encoders. Empty when the run did not load them."""
    found = []
    vae = getattr(components, "vae", None)
    if vae is not None:
        found += [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]
    found += [m for m in getattr(components, "text_encoders", None) or () if m is not None]
    return found


# ------------------------------------------------------------------ one mode, in this process
def bench_config(cfg: Config, mode: str, lora_rank: int, steps: int, warmup: int, out_dir: Path,
                 cache_dir: Path, reference_file: Path) -> Config:
    """The config one mode trains with: the user's, the mode's settings, and a short silent run."""
    spec = MODES[mode]
    overrides = {"output_dir": str(out_dir), "overwrite": True, "train.max_steps": warmup + steps,
                 "train.checkpointing_steps": 0, "train.resume": None, "train.report_to": "none",
                 "train.gradient_accumulation_steps": 1, "validation.every_steps": -1,
                 "lora.rank": lora_rank if spec.lora else 0,
                 "cache.dir": str(cache_dir) if spec.cached else None, "cache.auto": False,
                 "cache.reference": "precomputed" if spec.precomputed else "live",
                 "cache.reference_file": str(reference_file) if spec.precomputed else None}
    if spec.loss is not None:  # MaPO's own beta (its margin weight): the DPO beta of the config means nothing to it
        overrides.update({"loss.name": spec.loss, "loss.beta": 0.1, "loss.safeguard": False})
    run_cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = run_cfg
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)
    validate(run_cfg)
    return run_cfg


def run_mode(run_cfg: Config, mode: str, warmup: int, floor_repeats: int, peak: Optional[float]) -> dict[str, Any]:
    """Train `run_cfg` (a `bench_config`), then time the floor on the same model: one result row.

    `peak`: the device's TFLOP/s for MFU (--peak-tflops); None looks the GPU up by name."""
    from diffusion_dpo.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        run_cfg = copy.deepcopy(run_cfg)
        run_cfg.output_dir = str(Path(tmp) / "run")
        rss_before = rss_bytes()  # the CPU's baseline (CUDA's peak needs none)
        reset_peak_memory()
        trainer = Trainer(run_cfg)
        trainer._save_final = lambda: trainer.output_dir  # a benchmark keeps no weights
        load_peak_bytes = peak_bytes(rss_before)
        # Training's own peak: loading can pass through a transient (a file's pages and the tensors built from
        # them) that a long run never sees again; what stays resident (weights, reference copy) still counts.
        reset_peak_memory()
        comp = trainer.components
        encoders = ModuleTimer(_encoder_modules(comp))
        recorder = InputRecorder(trainer.accelerator.unwrap_model(trainer.denoiser))
        steps = run_cfg.train.max_steps - warmup
        floor = InterleavedFloor(trainer, recorder, warmup, per_step=-(-floor_repeats // steps))
        trainer.metrics.callback = floor
        trainer.run()
        encoders.close()
        recorder.close()
        train_peak_bytes = peak_bytes(rss_before)
        lines = [json.loads(ln) for ln in trainer.metrics_path.read_text().splitlines()]
        step_s, floor_s, flops = statistics.median(floor.step_seconds), statistics.median(floor.floor_seconds), \
            floor.flops

    pairs = trainer.pairs_per_step
    peak = peak_tflops(trainer.accelerator.device, peak)
    row = {
        "mode": mode, "cached": MODES[mode].cached, "precomputed_reference": MODES[mode].precomputed,
        "description": MODES[mode].description, "device": str(trainer.accelerator.device),
        "model": run_cfg.model.pretrained, "resolution": run_cfg.data.resolution, "batch_pairs": pairs,
        "loss": run_cfg.loss.name, "lora_rank": run_cfg.lora.rank, "mixed_precision": run_cfg.train.mixed_precision,
        "optimizer": run_cfg.optim.name, "gradient_checkpointing": run_cfg.train.gradient_checkpointing,
        "step_in_backward": run_cfg.optim.step_in_backward,
        "floor_latents": _shape(recorder.args[0]) if recorder.args else None,
        "steps_timed": len(floor.step_seconds), "floor_repeats": len(floor.floor_seconds), "step_s": step_s, "pairs_per_s": pairs / step_s, "floor_s": floor_s,
        "step_over_floor": step_s / floor_s, "peak_memory_mib": train_peak_bytes / 2**20,
        "load_peak_memory_mib": load_peak_bytes / 2**20,
        "vae_text_s_per_step": encoders.seconds / len(lines), "encoders_loaded": bool(encoders.modules),
        "model_tflop_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
    }
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    return row


# ------------------------------------------------------------------ all modes, one subprocess each
def run_bench(cfg: Config, modes: Sequence[str], lora_rank: int = 8, steps: int = 10, warmup: int = 3,
              floor_repeats: int = 10, peak: Optional[float] = None,
              progress: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Each mode in its own `python -m diffusion_dpo.bench` process (its own peak memory); rows in order.

    The pre-encoding cache (`cache.dir`, or a temporary one) and the precomputed reference errors are made
    here first, untimed and outside the workers, as a user makes them once with `diffusion-dpo cache`."""
    from diffusion_dpo.cache.build import build_cache
    from diffusion_dpo.cache.store import read_manifest
    from diffusion_dpo.cache.reference import precompute_reference

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"bench: unknown mode '{unknown[0]}' (choose from {', '.join(MODES)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        cache_dir = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else Path(tmp) / "cache"
        configs = {m: bench_config(cfg, m, lora_rank, steps, warmup, Path(tmp) / "run", cache_dir,
                                   Path(tmp) / "reference.safetensors") for m in modes}
        cached = [m for m in modes if MODES[m].cached]
        if cached and read_manifest(cache_dir) is None:
            progress(f"bench: building the pre-encoding cache in {cache_dir} (untimed)")
            c = configs[cached[0]]
            build_cache(c.model, c.data, c.cache, c.flow, device, log=progress, mixed_precision=c.train.mixed_precision)
        for m in modes:
            if MODES[m].precomputed:
                progress("bench: precomputing the reference errors (untimed)")
                c = configs[m]
                precompute_reference(c.model, c.lora, c.flow, c.data, c.train, c.cache, device)
        for mode in modes:
            progress(f"bench: {mode} ({MODES[mode].description})")
            result = Path(tmp) / f"{mode}.json"
            config_file = Path(tmp) / f"{mode}.yaml"
            config_file.write_text(to_yaml(configs[mode]))
            cmd = [sys.executable, "-m", "diffusion_dpo.bench", str(config_file), mode, str(warmup),
                   str(floor_repeats), str(peak or 0), str(result)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not result.is_file():
                lines = (proc.stderr.strip() or "no output").splitlines()
                raise UserError(f"bench: mode {mode} failed: {lines[-1]}")
            rows.append(json.loads(result.read_text()))
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (what BENCHMARKS.md records)."""
    head = ("| mode | pairs/s | step (ms) | floor (ms) | step / floor | peak memory (MiB) | VAE+text (ms/step) "
            "| TFLOP/s | MFU |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    body = ""
    for r in rows:
        enc = f"{1e3 * r['vae_text_s_per_step']:.1f}" if r["encoders_loaded"] else "not loaded"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        body += (f"| {r['mode']} | {r['pairs_per_s']:.2f} | {1e3 * r['step_s']:.1f} | {1e3 * r['floor_s']:.1f} "
                 f"| {r['step_over_floor']:.3f} | {r['peak_memory_mib']:.0f} | {enc} | {r['achieved_tflops']:.4f} "
                 f"| {mfu} |\n")
    return head + body


def _import_libraries() -> None:
    """Import what training imports lazily, so the memory baseline holds the code and the peak only data: every
    family's pipeline module (and with it its models' and text encoders' modules)."""
    import accelerate  # noqa: F401
    import diffusers
    import peft  # noqa: F401

    from diffusion_dpo.models import FAMILIES

    for family in FAMILIES:
        for pipeline in family.pipelines:
            getattr(diffusers, pipeline)

    import diffusion_dpo.training.trainer  # noqa: F401


def _worker(argv: Sequence[str]) -> None:
    """Subprocess entry: config_file mode warmup floor_repeats peak result_file."""
    from diffusion_dpo.console import quiet_progress_bars

    config_file, mode, warmup, repeats, peak, result = argv
    quiet_progress_bars()
    _import_libraries()
    os.environ.setdefault("TQDM_DISABLE", "1")
    row = run_mode(load_config(config_file), mode, int(warmup), int(repeats), float(peak) or None)
    Path(result).write_text(json.dumps(row))


if __name__ == "__main__":
    _worker(sys.argv[1:])
