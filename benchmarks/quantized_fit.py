"""What a LoRA run of the large transformers holds on one GPU, per `model.quantize_base`: computed from the published
architectures (built on the meta device: no weights, no GPU), not measured.

    python benchmarks/quantized_fit.py            # the table for BENCHMARKS.md / docs/training.md

Per model and quantization: the frozen base's bytes (the block linears in 2 / 1 / ~0.53 bytes a weight plus their
scales, everything else in bf16), the LoRA adapters at the recipe's rank 64 on the family's default targets with
their fp32 gradients and AdamW moments (16 bytes a parameter), and the activations of one optimizer micro-step of
B pairs (2B images) at 512 and 1024 px with gradient checkpointing: every block's input kept (bf16), plus one block's
working set while it is recomputed and differentiated (each linear's input and output, bf16). The text encoders and
the VAE are not loaded (a cached run), the reference is the same base with adapters off (no copy). Not counted: the
CUDA context and the allocator's slack (a few GB), attention's own buffers (flash attention: O(tokens)).
"""

from __future__ import annotations

import argparse
from collections import Counter

from torch import nn

GIB = 2**30


def transformers() -> dict[str, tuple[nn.Module, tuple[str, ...], int, int]]:
    """name -> (model on the meta device, default LoRA targets, pixels per token side, text tokens)."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel

    from diffusion_dpo.models.flux2 import LORA_TARGETS as FLUX2
    from diffusion_dpo.models.qwenimage import LORA_TARGETS as QWEN
    from diffusion_dpo.models.zimage import LORA_TARGETS as ZIMAGE

    with init_empty_weights():
        # diffusers' defaults are the published configs: FLUX.2-dev, Qwen-Image, Z-Image
        return {"FLUX.2 [dev] (32B)": (Flux2Transformer2DModel(), FLUX2, 16, 512),
                "Qwen-Image (20B)": (QwenImageTransformer2DModel(), QWEN, 16, 512),
                "Z-Image (6B)": (ZImageTransformer2DModel(), ZIMAGE, 16, 512)}


def base_bytes(model: nn.Module, how: str) -> float:
    from diffusion_dpo.models.quantize import block_linears

    blocks = {n: model.get_submodule(n) for n in block_linears(model)}
    in_blocks = sum(m.weight.numel() for m in blocks.values())
    rows = sum(m.out_features for m in blocks.values())
    total = sum(p.numel() for p in model.parameters())
    rest = 2 * (total - in_blocks)  # bf16
    if how == "none":
        return rest + 2 * in_blocks
    if how in ("int8", "fp8"):
        return rest + in_blocks + 4 * rows  # a float32 scale per output row
    return rest + in_blocks / 2 + 4 * in_blocks / 64  # nf4: a float32 absmax per 64 weights


def lora_params(model: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def activation_bytes(model: nn.Module, tokens: int, images: int) -> float:
    """Checkpointed blocks: each block's input (tokens x width) kept; one block's linears' inputs and outputs, all at
    every token (an upper estimate for a two-stream block, whose linears each see one stream's tokens)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and not any(isinstance(c, (nn.Linear, nn.Dropout)) for c in m)]
    blocks = [b for lst in lists for b in lst]
    # the hidden width: what most of the blocks' linears take in
    width = Counter(m.in_features for b in blocks for m in b.modules() if isinstance(m, nn.Linear)).most_common(1)[0][0]
    kept = len(blocks) * tokens * width * 2
    one = max(sum(m.in_features + m.out_features for m in b.modules() if isinstance(m, nn.Linear)) for b in blocks)
    return images * (kept + tokens * one * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="pairs per micro-step (data.batch_size)")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    print(f"| model | base | frozen base | LoRA r{args.rank} + AdamW | activations, {args.pairs} pair(s), 512 px | "
          "1024 px | total at 512 / 1024 px |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (model, targets, patch, text) in transformers().items():
        states = 16 * lora_params(model, targets, args.rank)
        acts = {r: activation_bytes(model, (r // patch) ** 2 + text, 2 * args.pairs) for r in (512, 1024)}
        for how in ("none", "int8", "nf4"):
            base = base_bytes(model, how)
            label = {"none": "bf16", "int8": "int8 / fp8", "nf4": "nf4"}[how]
            print(f"| {name} | {label} | {base / GIB:.1f} GiB | {states / GIB:.1f} GiB | {acts[512] / GIB:.1f} GiB | "
                  f"{acts[1024] / GIB:.1f} GiB | {(base + states + acts[512]) / GIB:.1f} / "
                  f"{(base + states + acts[1024]) / GIB:.1f} GiB |")


if __name__ == "__main__":
    main()
