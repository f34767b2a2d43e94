"""Pick-a-Pic at scale, measured on this machine: what a start costs in time and disk as the data grows.

Writes Pick-a-Pic-shaped parquet shards (the real schema; 512 px JPEG pairs, ~80 KB each, ~3 GB per 20K pairs),
then times a one-step training run of the tiny SD pipeline (so the data path dominates) in fresh processes:

  first start      fresh image-check memory: every image decoded once (split over the processes)
  repeated start   the same files: the remembered check decodes nothing
  200 pairs        the same repeated start on the first 200 pairs (a start should be flat in the data's size)

with 1 process and with 2 (`accelerate launch --multi_gpu --num_processes 2`, gloo), and the disk written outside
the data and the run (the datasets cache, which read-in-place parquet must leave empty, and the check memory).

    python benchmarks/data_scale.py --pairs 20000 --shards 8 --out /tmp/scale   # results: a markdown table
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_shards(out: Path, pairs: int, shards: int, resolution: int, seed: int = 0) -> Path:
    """`shards` parquet files of Pick-a-Pic v2's schema holding `pairs` rows of two JPEG images each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffusion_dpo.data.schema import SCHEMA

    data = out / "pickapic"
    if data.is_dir() and len(list(data.glob("*.parquet"))) == shards:
        return data
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        # smooth colour fields plus grain: ~80 KB at 512 px, quality 90 (Pick-a-Pic-shaped shards: ~3 GB per 20K pairs)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(img, np.int16) + rng.integers(-16, 16, (resolution, resolution, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    pool = [jpeg() for _ in range(401)]  # distinct images, cycled: the bytes and decode cost of real ones, fast
    per = -(-pairs // shards)
    for s in range(shards):
        rows = []
        for i in range(s * per, min(pairs, (s + 1) * per)):
            first = bool(rng.integers(0, 2))
            rows.append({"caption": f"a photo number {i}", "jpg_0": pool[(2 * i) % 401],
                         "jpg_1": pool[(2 * i + 1) % 401],
                         "label_0": 1.0 if first else 0.0, "label_1": 0.0 if first else 1.0,
                         "are_different": True, "has_label": True, "ranking_id": i, "user_id": i % 97,
                         "num_example_per_prompt": 1})
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        # row groups of 100 rows, as the hub's image parquet is written
        pq.write_table(table, data / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=100)
    return data


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(model: Path, data: Path, out: Path, processes: int, env: dict, max_pairs: int | None = None) -> float:
    """Wall seconds of a one-step run in a fresh process (or processes)."""
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", str(model),
            "--data.path", str(data), "--output_dir", str(out), "--train.max_steps", "1",
            "--data.batch_size", "2", "--data.num_workers", "2", "--validation.every_steps", "-1",
            "--train.report_to", "none", "--data.resolution", "32"]
    if max_pairs:
        args += ["--data.max_pairs", str(max_pairs)]
    launch = [sys.executable, "-m", "diffusion_dpo"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_dpo"]
    began = time.perf_counter()
    res = subprocess.run([*launch, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if res.returncode != 0:
        raise SystemExit(f"run failed: {res.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dpo-data-scale"))
    args = parser.parse_args()
    from diffusion_dpo.testing.tiny import build_tiny_pipeline

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = write_shards(args.out, args.pairs, args.shards, args.resolution)
    print(f"data: {args.pairs} pairs in {args.shards} shards, {du(data) / 2**30:.2f} GiB "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
    model = args.out / "tiny-sd"
    if not model.is_dir():
        build_tiny_pipeline(model, kind="sd")
    rows = []
    for n in args.processes:
        checks, hf = args.out / f"check-memory-{n}", args.out / f"hf-datasets-{n}"
        shutil.rmtree(checks, ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               "DIFFUSION_DPO_CACHE": str(checks), "HF_DATASETS_CACHE": str(hf)}
        first = run(model, data, args.out / "run", n, env)
        again = run(model, data, args.out / "run", n, env)
        small = run(model, data, args.out / "run", n, env, max_pairs=200)
        extra = du(hf) + du(checks)
        rows.append({"processes": n, "pairs": args.pairs, "data_gib": du(data) / 2**30, "first_start_s": first,
                     "repeated_start_s": again, "start_200_pairs_s": small, "extra_disk_mib": extra / 2**20,
                     "datasets_cache_bytes": du(hf), "check_memory_bytes": du(checks)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| processes | pairs | data | first start | repeated start | same, 200 pairs | disk beyond data and run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['processes']} | {r['pairs']} | {r['data_gib']:.2f} GiB | {r['first_start_s']:.1f} s | "
              f"{r['repeated_start_s']:.1f} s | {r['start_200_pairs_s']:.1f} s | {r['extra_disk_mib']:.2f} MiB "
              f"(datasets cache {r['datasets_cache_bytes']} B) |")


if __name__ == "__main__":
    main()
