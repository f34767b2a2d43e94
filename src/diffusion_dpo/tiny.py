"""Tiny SD and SDXL pipelines built from config, saved as real diffusers directories.

They share every code path with real checkpoints (`from_pretrained`, tokenizer files, scheduler
config), so the tests and the offline tiny run exercise exactly what users run, in seconds on a
CPU. Architecture is the real one, shrunk: a 2-level UNet with cross-attention, a 2-level VAE
(downsampling x2), a 2-layer CLIP text encoder (two for SDXL, the second with a projection
giving the pooled embedding), and a character-level CLIP tokenizer written locally.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TOKEN_LENGTH = 16  # tokenizer model_max_length == text encoder max_position_embeddings


def _write_tokenizer(out_dir: Path, max_length: int = TOKEN_LENGTH) -> None:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt with no merges): every printable
    ASCII character, with and without the end-of-word marker, plus the start/end tokens."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
        tok = CLIPTokenizer.from_pretrained(tmp)
    tok.save_pretrained(out_dir)


def _text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TOKEN_LENGTH, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_pipeline(out_dir: str | Path, kind: str = "sd", resolution: int = 32,
                        prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny randomly initialised `StableDiffusionPipeline` (kind="sd") or
    `StableDiffusionXLPipeline` (kind="sdxl") to `out_dir` and return the path."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    if kind not in ("sd", "sdxl"):
        raise ValueError(f"kind must be 'sd' or 'sdxl', got {kind!r}")
    out_dir = Path(out_dir)
    sdxl = kind == "sdxl"
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, sample_size=resolution, scaling_factor=0.18215 if not sdxl else 0.13025,
                        force_upcast=sdxl)
    text_dims = 32 + (32 if sdxl else 0)  # SDXL concatenates both encoders' penultimate hidden states
    if sdxl:
        # Real SDXL's shape, shrunk: a plain block, then cross-attention blocks with linear projections and
        # deeper transformers; its conv shortcuts see non-contiguous inputs as in the real model.
        unet_kwargs = dict(
            block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), use_linear_projection=True,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8))
    else:
        unet_kwargs = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    unet_kwargs.update(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                       cross_attention_dim=text_dims, norm_num_groups=32)
    if sdxl:
        # pooled text embedding (32) + 6 time ids (original size, crop top-left, target size) x 8 dims each
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=32 + 6 * 8)
    unet = UNet2DConditionModel(**unet_kwargs)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, steps_offset=1)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 1), text_encoder_2=_text_encoder(True, seed + 2),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **schedule))
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 1), tokenizer=tokenizer, unet=unet,
            scheduler=PNDMScheduler(skip_prk_steps=True, **schedule),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_sd15_shaped_pipeline(out_dir: str | Path, width: int = 64, resolution: int = 256, seed: int = 0) -> Path:
    """Write a randomly initialised `StableDiffusionPipeline` with SD1.5's architecture, channels scaled.

    `width` is the UNet's first block width (SD1.5: 320, giving its 860M-parameter UNet exactly): four
    levels (width x 1, 2, 4, 4), two layers per block, cross-attention in the first three, 8 heads
    (diffusers' `attention_head_dim` means the head count here; SD1.5's heads are 40 wide),
    768-dim text conditioning over 77 tokens. The VAE keeps SD's four levels (x8 downsampling) with its
    channels scaled by the same factor; the text encoder is CLIP ViT-L/14's shape (12 layers) at
    width 320, two layers otherwise. For benchmarks: no checkpoint is needed to time the architecture.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if width % 32 or width < 32:
        raise ValueError(f"width must be a positive multiple of 32 (group norm), got {width}")
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae_width = max(32, 128 * width // 320 // 32 * 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=resolution, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    text_config = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12 if width == 320 else 2, num_attention_heads=12,
                                 max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                 hidden_act="quick_gelu")
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, **schedule), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir
