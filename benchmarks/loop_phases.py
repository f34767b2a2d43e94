"""Where a training step's time goes: per-phase wall time inside one process, no profiler (each phase wrapped in a
timer), medians after the first steps.

    diffusion-dpo make-tiny --output-dir tiny64 --resolution 64
    python benchmarks/loop_phases.py --model tiny64/flux2-klein --data tiny64/pickapic --resolution 64 \\
        --max-sequence-length 64 --mode precomputed --steps 60

Modes as `diffusion-dpo bench`'s (the cache and the precomputed reference are built first, untimed); the batch is
made in the training process (`data.num_workers 0`), as `bench` is run in BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tiny_run import tiny_run_config, tiny_run_parser


def main() -> None:
    import diffusion_dpo.training.trainer as trainer_module
    from diffusion_dpo.bench import bench_config
    from diffusion_dpo.cache.build import build_cache
    from diffusion_dpo.cache.reference import precompute_reference
    from diffusion_dpo.cache.store import Cache, read_manifest

    parser = tiny_run_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", default="precomputed", choices=["live+cache", "lora+cache", "precomputed"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the medians")
    args = parser.parse_args()
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            began = time.perf_counter()
            out = fn(*a, **kw)
            times[name].append(time.perf_counter() - began)
            return out
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(tiny_run_config(args), args.mode, 8, args.steps, 0,
                           Path(tmp) / "run", Path(tmp) / "cache", Path(tmp) / "reference.safetensors")
        device = torch.device("cpu")
        build_cache(cfg.model, cfg.data, cfg.cache, cfg.flow, device, log=lambda s: None,
                    mixed_precision=cfg.train.mixed_precision)
        if args.mode == "precomputed":
            precompute_reference(cfg.model, cfg.lora, cfg.flow, cfg.data, cfg.train, cfg.cache, device)
        store = Cache(Path(cfg.cache.dir), read_manifest(Path(cfg.cache.dir)))
        for index in range(store.num_pairs):  # the pages in memory: what a run's second epoch reads
            store.pair(index, False, False)
        began = time.perf_counter()
        for repeat in range(5):
            for index in range(store.num_pairs):
                store.pair(index, repeat % 2 == 1, False)
        read_ms = 1e3 * (time.perf_counter() - began) / (5 * store.num_pairs)
        for name in ("reduce_metrics", "apply_update"):  # the loop calls these module-level helpers
            setattr(trainer_module, name, timed(name, getattr(trainer_module, name)))
        trainer = trainer_module.Trainer(cfg)
        trainer._save_final = lambda: trainer.output_dir  # no weights kept
        acc = trainer.accelerator
        trainer.step = timed("step: draws, forward, loss", trainer.step)
        acc.backward = timed("backward", acc.backward)
        acc.clip_grad_norm_ = timed("clipping", acc.clip_grad_norm_)
        trainer.optimizer.zero_grad = timed("zero_grad", trainer.optimizer.zero_grad)
        trainer.metrics.write = timed("metrics line", trainer.metrics.write)
        batches = trainer.batches

        def timed_batches():
            source = batches()
            while True:
                began = time.perf_counter()
                item = next(source)
                times["next batch"].append(time.perf_counter() - began)
                yield item

        trainer.batches = timed_batches
        began = time.perf_counter()
        trainer.run()
        whole = time.perf_counter() - began
    print(f"{args.model} {args.mode}: {1e3 * whole / args.steps:.1f} ms a step (mean, warm-up included); one cached "
          f"pair read alone: {read_ms:.3f} ms")
    for name, values in times.items():
        print(f"  {name:30s} {1e3 * statistics.median(values[args.skip:]):7.2f} ms")


if __name__ == "__main__":
    main()
