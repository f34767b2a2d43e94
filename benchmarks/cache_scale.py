"""The cache build and the precomputed reference split over processes, measured on this machine, and a kill -9.

Writes Pick-a-Pic-shaped parquet shards whose images are all distinct (512 px JPEG; every image is decoded and
encoded), then runs `diffusion-dpo cache --reference` with the tiny SD pipeline in fresh processes:

  1 process     the build alone (one thread: one process stands for one GPU)
  2 processes   `accelerate launch --multi_gpu --num_processes 2` (gloo), one thread each: the same work split
  killed        the 2-process build killed with SIGKILL (the whole process group) at a random moment, then rerun
                on 2 processes; its files are compared byte for byte with the 1-process build's

    python benchmarks/cache_scale.py --pairs 4000 --out /tmp/cache-scale   # results: a markdown table
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_distinct_shards(out: Path, pairs: int, shards: int, resolution: int, seed: int = 0) -> Path:
    """`shards` parquet files of Pick-a-Pic v2's schema, `pairs` rows of two JPEG images, no two images alike."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffusion_dpo.data.schema import SCHEMA

    data = out / "pickapic-distinct"
    if data.is_dir() and len(list(data.glob("*.parquet"))) == shards:
        return data
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grain = rng.integers(-16, 16, (resolution, resolution, 3))

    def jpeg(i: int) -> bytes:
        # smooth colour fields plus grain (~80 KB at 512 px, quality 90); the colours differ per image
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(img, np.int16) + grain
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    per = -(-pairs // shards)
    for s in range(shards):
        rows = []
        for i in range(s * per, min(pairs, (s + 1) * per)):
            first = bool(rng.integers(0, 2))
            rows.append({"caption": f"a photo number {i % (pairs // 15 + 1)}", "jpg_0": jpeg(2 * i),
                         "jpg_1": jpeg(2 * i + 1), "label_0": 1.0 if first else 0.0, "label_1": 0.0 if first else 1.0,
                         "are_different": True, "has_label": True, "ranking_id": i, "user_id": i % 97,
                         "num_example_per_prompt": 1})
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), data / f"train-{s:05d}-of-{shards:05d}.parquet",
                       row_group_size=100)
    return data


def command(model: Path, data: Path, cache: Path, processes: int, resolution: int) -> list[str]:
    launch = [sys.executable, "-m", "diffusion_dpo"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_dpo"]
    return [*launch, "cache", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", str(model),
            "--data.path", str(data), "--cache.dir", str(cache), "--data.resolution", str(resolution),
            "--data.num_workers", "0", "--data.batch_size", "4", "--cache.batch_size", "16",
            "--cache.shard_pairs", "256", "--train.max_steps", "250", "--reference"]


def timed(cmd: list[str], env: dict) -> float:
    began = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[-20:])}\n{res.stderr[-3000:]}")
    return time.perf_counter() - began


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun starts its workers in sessions of their own, so killing the
    launcher's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def killed(cmd: list[str], env: dict, after: float) -> None:
    """`cmd` SIGKILLed after `after` seconds, with every process it started (as a node that dies)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=after)
        raise SystemExit(f"the build ended before the kill at {after:.1f} s: choose more pairs")
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        time.sleep(1)


def train_command(model: Path, data: Path, cache: Path, out: Path, resolution: int, *extra: str) -> list[str]:
    """40 steps of a 2-process full fine-tune from the cache and its precomputed reference, checkpoints every 10."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_dpo",
            "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", str(model),
            "--data.path", str(data), "--cache.dir", str(cache), "--cache.reference", "precomputed",
            "--data.resolution", str(resolution), "--data.num_workers", "0", "--data.batch_size", "2",
            "--cache.batch_size", "16", "--cache.shard_pairs", "256", "--train.max_steps", "40",
            "--train.checkpointing_steps", "10", "--validation.every_steps", "-1", "--train.report_to", "none",
            "--overwrite", "false", "--output_dir", str(out), *extra]


def weights(run: Path) -> bytes:
    return (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def train_kill(args: argparse.Namespace, model: Path, data: Path, cache: Path, env: dict) -> tuple:
    """A 2-process training run from `cache`, and the same run killed at a random moment and resumed."""
    # training: 2 processes from the cache, killed at a random moment after the first checkpoint, resumed
    straight, resumed_run = args.out / "train-straight", args.out / "train-killed"
    for run in (straight, resumed_run):
        shutil.rmtree(run, ignore_errors=True)
    # the reference the run needs: 40 steps x 2 pairs x 2 processes (the cache build's covered 1 process x 4)
    reference = [sys.executable, "-m", "diffusion_dpo", "cache", "--config", str(ROOT / "configs" / "tiny.yaml"),
                 "--model.pretrained", str(model), "--data.path", str(data), "--cache.dir", str(cache),
                 "--data.resolution", str(args.resolution), "--data.num_workers", "0", "--data.batch_size", "2",
                 "--cache.batch_size", "16", "--cache.shard_pairs", "256", "--train.max_steps", "40",
                 "--reference", "--num-processes", "2"]
    timed(reference, env)
    train_s = timed(train_command(model, data, cache, straight, args.resolution), env)
    train_at = random.Random(args.seed + 1).uniform(0.4, 0.9) * train_s
    killed(train_command(model, data, cache, resumed_run, args.resolution), env, train_at)
    kept = sorted(p.name for p in resumed_run.glob("checkpoint-*"))
    timed(train_command(model, data, cache, resumed_run, args.resolution, "--train.resume", "latest"), env)
    same_weights = weights(straight) == weights(resumed_run)
    print(json.dumps({"train_s": round(train_s, 1), "train_killed_at_s": round(train_at, 1), "checkpoints_kept": kept,
                      "same_final_weights": same_weights}), flush=True)
    return train_s, train_at, kept, same_weights


def files_of(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.name != "manifest.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (the images are 512 px)")
    parser.add_argument("--seed", type=int, default=0, help="of the kill's moment")
    parser.add_argument("--kill-at", type=float, help="the kill's moment as a fraction of the 2-process build's wall "
                                                      "time [default: drawn from 0.3-0.8 with --seed]")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dpo-cache-scale"))
    parser.add_argument("--training-only", action="store_true", help="with --walls: only the training kill")
    parser.add_argument("--walls", type=float, nargs=2, metavar=("ONE", "TWO"),
                        help="the 1- and 2-process wall times of builds already in OUT (cache-1, cache-2): only the "
                             "kill and the rerun are run")
    args = parser.parse_args()
    from diffusion_dpo.testing.tiny import build_tiny_pipeline

    args.out.mkdir(parents=True, exist_ok=True)
    data = write_distinct_shards(args.out, args.pairs, args.shards, 512)
    size = sum(p.stat().st_size for p in data.glob("*.parquet"))
    print(f"data: {args.pairs} pairs, {2 * args.pairs} distinct images, {size / 2**30:.2f} GiB", flush=True)
    model = args.out / "tiny-sd"
    if not model.is_dir():
        build_tiny_pipeline(model, kind="sd")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "DIFFUSION_DPO_CACHE": str(args.out / "check-memory")}
    timed([sys.executable, "-m", "diffusion_dpo", "--help"], env)  # warm the file cache
    wall, caches = {}, {}
    for n in (1, 2):
        caches[n] = args.out / f"cache-{n}"
        if args.walls:
            wall[n] = args.walls[n - 1]
            continue
        shutil.rmtree(caches[n], ignore_errors=True)
        shutil.rmtree(caches[n].with_name(caches[n].name + ".tmp"), ignore_errors=True)
        wall[n] = timed(command(model, data, caches[n], n, args.resolution), env)
        print(json.dumps({"processes": n, "wall_s": round(wall[n], 1)}), flush=True)
    same = files_of(caches[1]) == files_of(caches[2])
    if args.training_only:
        train_kill(args, model, data, caches[1], env)
        return
    # a kill -9 at a random moment of the 2-process build, then the build rerun on 2 processes
    resumed = args.out / "cache-killed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.rmtree(resumed.with_name(resumed.name + ".tmp"), ignore_errors=True)
    at = (args.kill_at if args.kill_at is not None else random.Random(args.seed).uniform(0.3, 0.8)) * wall[2]
    killed(command(model, data, resumed, 2, args.resolution), env, at)
    kept = [resumed.with_name(resumed.name + ".tmp"), resumed / "reference.safetensors.parts"]
    left = [p.name for folder in kept if folder.is_dir() for p in folder.iterdir() if p.name != "plan.json"]
    rerun = timed(command(model, data, resumed, 2, args.resolution), env)
    same_after_kill = files_of(resumed) == files_of(caches[1])
    print(json.dumps({"killed_at_s": round(at, 1), "files_left": len(left), "rerun_s": round(rerun, 1),
                      "same_bytes_1_vs_2": same, "same_bytes_after_kill": same_after_kill}), flush=True)
    train_s, train_at, kept, same_weights = train_kill(args, model, data, caches[1], env)
    cache_bytes = sum(len(b) for b in files_of(caches[1]).values())
    print("\n| pairs (distinct images) | 1 process | 2 processes | ratio | killed at, rerun | files equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.pairs} ({2 * args.pairs}) | {wall[1]:.1f} s | {wall[2]:.1f} s | {wall[2] / wall[1]:.2f} | "
          f"{at:.1f} s ({len(left)} files kept), {rerun:.1f} s | 1 vs 2: {same}; killed + rerun vs 1: "
          f"{same_after_kill} ({cache_bytes / 2**20:.0f} MiB) |")
    print(f"\ntraining (2 processes, 40 steps): {train_s:.1f} s; killed at {train_at:.1f} s (kept {', '.join(kept)}), "
          f"resumed with --train.resume latest: final weights equal to the uninterrupted run's: {same_weights}")


if __name__ == "__main__":
    main()
