"""How steady is this machine? The same 512x512 matmul loop (20 products), timed over and over: median, min and max
per 2-second window. A timing ratio whose two sides were measured in different windows is off by the drift.

    python benchmarks/machine_drift.py --seconds 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--window", type=float, default=2.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    end = time.time() + args.seconds
    while time.time() < end:
        times, start = [], time.time()
        while time.time() - start < args.window:
            began = time.perf_counter()
            for _ in range(20):
                a @ b
            times.append(1e3 * (time.perf_counter() - began))
        print(f"median {statistics.median(times):.2f} min {min(times):.2f} max {max(times):.2f} ms (n={len(times)})")


if __name__ == "__main__":
    main()
