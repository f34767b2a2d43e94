"""Is the training loop's model compute the floor's? Times, on one cached batch, the loop's step (forward and backward,
no optimizer update) against the floor's parts (`bench`'s: the policy's forward + backward and the reference's
forward on the same denoiser inputs), medians of repeated runs in one process.

    diffusion-dpo make-tiny --output-dir tiny64 --resolution 64
    python benchmarks/loop_vs_floor.py --model tiny64/flux2-klein --data tiny64/pickapic --resolution 64 \\
        --max-sequence-length 64

When the loop's number equals the floor's sum, what `bench` reports above the floor is outside the model compute
(the optimizer update, clipping, data, draws, metrics). Full fine-tune with a frozen reference copy (live+cache).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from tiny_run import tiny_run_config, tiny_run_parser


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    from diffusion_dpo.training import Trainer

    parser = tiny_run_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tiny_run_config(args, **{
            "output_dir": f"{tmp}/run", "cache.dir": f"{tmp}/cache", "cache.auto": "true",
            "train.report_to": "none", "validation.every_steps": "-1", "train.checkpointing_steps": "0"}))
        _, batch = next(trainer.batches())
        acc, model = trainer.accelerator, trainer.denoiser

        def loop_step() -> None:
            out = trainer.step(batch, micro_step=0)
            acc.backward(out.loss)
            trainer.optimizer.zero_grad(set_to_none=True)

        recorded: dict = {}

        def record(_module, a, kw) -> None:
            if torch.is_grad_enabled():
                recorded["args"], recorded["kwargs"] = a, kw

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        loop_ms = median_ms(loop_step, args.repeats)
        handle.remove()
        a, kw = recorded["args"], recorded["kwargs"]

        def policy() -> None:
            with acc.autocast():
                out = model(*a, **kw)
            (out.sample if hasattr(out, "sample") else out[0]).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        def reference() -> None:
            with torch.no_grad(), acc.autocast(), trainer.reference.model(acc.unwrap_model(model)) as ref:
                ref(*a, **kw)

        policy_ms, reference_ms = median_ms(policy, args.repeats), median_ms(reference, args.repeats)
    print(f"loop step, forward + backward (no update): {loop_ms:.1f} ms")
    print(f"floor: policy forward + backward {policy_ms:.1f} ms + reference forward {reference_ms:.1f} ms = "
          f"{policy_ms + reference_ms:.1f} ms")


if __name__ == "__main__":
    main()
