"""The cache's storage dtype: bfloat16 against float32, on a run, beside the run's own precision noise; and a run
from the cache against the same run without one.

Builds the cache of the tiny Pick-a-Pic-shaped data in float32 and in bfloat16 with the tiny SD pipeline (or the
pipeline of --model), once per train.mixed_precision (no, bf16: the captions are encoded in the run's dtype), trains
the same run (live reference, every step's reference and policy errors in metrics.jsonl) from each, and reports the
largest relative difference of the reference errors (ref_mse_w, ref_mse_l) and the policy errors, and the largest
loss difference, between the two caches; as the scale those are judged on, the same differences between a float32
and a bf16 run, each from its float32 cache (the run's own precision noise); and between the bf16 run without a
cache and from its float32 cache (the VAE encodes in fp32 and the text encoders run in bf16 on both paths).

    python benchmarks/cache_dtype.py --out /tmp/cache-dtype      # results: a markdown table
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def largest(a: list[dict], b: list[dict], key: str, relative: bool) -> float:
    out = 0.0
    for x, y in zip(a, b):
        d = abs(x[key] - y[key])
        out = max(out, d / max(abs(x[key]), 1e-12) if relative else d)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dpo-cache-dtype"))
    parser.add_argument("--model", type=Path, help="a diffusers SD pipeline folder [default: the tiny one, built]")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    from diffusion_dpo.cache.build import build_cache
    from diffusion_dpo.config import load_config
    from diffusion_dpo.testing.tiny import build_tiny_pipeline
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic
    from diffusion_dpo.training.trainer import train

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or (args.out / "tiny-sd")
    if not model.is_dir():
        build_tiny_pipeline(model, kind="sd")
    data = args.out / "pickapic"
    if not data.is_dir():
        build_tiny_pickapic(data, num_pairs=args.pairs)

    def cfg(dtype: str, precision: str, run: str):
        return load_config(None, {
            "output_dir": str(args.out / run), "overwrite": "true", "model.pretrained": str(model),
            "data.path": str(data), "data.resolution": "32", "data.batch_size": "4", "data.num_workers": "0",
            "data.random_flip": "true", "data.proportion_empty_prompts": "0.1",
            **({"cache.dir": str(args.out / f"cache-{dtype}-{precision}"), "cache.dtype": dtype} if dtype else {}),
            "loss.beta": "5000", "optim.lr": "1e-5", "optim.scale_lr": "false",
            "train.max_steps": str(args.steps), "train.checkpointing_steps": "0", "train.mixed_precision": precision,
            "train.report_to": "none", "validation.every_steps": "-1"})

    runs = {}
    for precision in ("no", "bf16"):
        for dtype in ("float32", "bfloat16"):
            c = cfg(dtype, precision, "unused")
            shutil.rmtree(c.cache.dir, ignore_errors=True)
            build_cache(c.model, c.data, c.cache, c.flow, mixed_precision=precision)
            name = f"{dtype}-{precision}"
            train(cfg(dtype, precision, name))
            runs[name] = metrics(args.out / name)
    train(cfg("", "bf16", "live-bf16"))
    runs["live-bf16"] = metrics(args.out / "live-bf16")
    rows = []
    for label, a, b in [("bfloat16 cache vs float32 cache, float32 run", "float32-no", "bfloat16-no"),
                        ("bfloat16 cache vs float32 cache, bf16 run", "float32-bf16", "bfloat16-bf16"),
                        ("bf16 run vs float32 run, float32 caches (precision noise)", "float32-no", "float32-bf16"),
                        ("bf16 run: no cache vs float32 cache", "live-bf16", "float32-bf16")]:
        rows.append({"compared": label,
                     "ref_mse_rel": max(largest(runs[a], runs[b], k, True) for k in ("ref_mse_w", "ref_mse_l")),
                     "model_mse_rel": max(largest(runs[a], runs[b], k, True) for k in ("model_mse_w", "model_mse_l")),
                     "loss_abs": largest(runs[a], runs[b], "loss", False)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| compared ({args.steps} steps, batch 4 pairs) | reference errors, largest relative difference | "
          "policy errors | loss, largest difference |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['compared']} | {r['ref_mse_rel']:.2e} | {r['model_mse_rel']:.2e} | {r['loss_abs']:.2e} |")


if __name__ == "__main__":
    main()
