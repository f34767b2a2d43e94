"""The flow demo's base model: a real `StableDiffusion3Pipeline` (the SD3 architecture), made and trained here.

Parts, each the real diffusers/transformers class of SD3, shrunk:

    tokenizer, _2     word-level `BertTokenizer`s of the prompts' words (base.word_tokenizer), 12 tokens
    text_encoder, _2  `CLIPTextModelWithProjection` in the CLIP-L and CLIP-G roles: 3 layers of width 32, projection
                      32; each pre-trained CLIP-style against the base split (base.train_text_encoder), then frozen
    tokenizer_3       `T5TokenizerFast` of the prompts' words, made offline from (piece, score) pairs
    text_encoder_3    `T5EncoderModel`: 2 layers, d_model 64; pre-trained the same way on its mean-pooled states
    vae               `AutoencoderKL` as SD3's: 16 latent channels, no quant convs, a scaling and a shift factor;
                      16x16x3 pixels <-> 8x8x16 latents
    transformer       `SD3Transformer2DModel` (MMDiT, RMS-normed q/k as in SD3.5): 3 joint blocks of width 64,
                      patch 2, so 16 image tokens attend jointly with 12 CLIP + T5_LENGTH T5 tokens
    scheduler         `FlowMatchEulerDiscreteScheduler` with shift 1 (SD3's 3.0 suits 4,096 image tokens, not 16)

The conditioning is the pipeline's own `encode_prompt` (CLIP penultimate states side by side, then T5's on the
sequence; pooled CLIP embeddings for the AdaLN), computed once per caption. The transformer is trained by
rectified flow as SD3 was: x_t = (1 - s) x_0 + s e, target v = e - x_0, s logit-normal (0, 1), timestep 1000 s,
captions "" at `caption_dropout` for classifier-free guidance; the budget is short on purpose, so that some
samples show the wrong digit or none, which leaves DPO something to fix.

The T5 length. SD3's pipeline pads T5 to max_sequence_length (default 256) and attends to every padding token;
at 256 the transformer would see 268 text tokens beside its 16 image ones, and a step costs 6x the one at 12
(1.16 s against 0.18 s for a DPO step of 32 pairs on 2 CPU cores, measured with this config), too slow for a
10-minute demo. So the model is trained (`model.max_sequence_length`) and sampled (`max_sequence_length=`, which
`generate` passes) at T5_LENGTH, as any SD3 model is best sampled at the length it was trained at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from diffusion_dpo.demo import world
from diffusion_dpo.demo.base import (TOKEN_LENGTH, DenoiserSteps, _pixels, captioned_batch, make_vae, progress_tick,
                                     recipe_key, train_text_encoder, train_vae, word_tokenizer, write_recipe)

T5_LENGTH = 12  # the longest prompt is 8 words + </s>
LATENT_CHANNELS = 16  # as SD3's VAE


@dataclass(frozen=True)
class SD3Recipe:
    """Every setting that decides the flow base model's weights (its hash keys the cache)."""

    family: str = "sd3"
    seed: int = 0
    vae_steps: int = 200
    vae_batch: int = 32  # reconstruction MSE 0.006 after 200 steps, in 40 s instead of 67 at batch 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 0.0  # as the UNet demo's (base.BaseRecipe): the latents' scale is fixed by scaling_factor
    text_steps: int = 150  # per text encoder
    text_lr: float = 3e-3
    transformer_layers: int = 3  # joint blocks
    # 400 steps left 25% of dev samples without the prompted digit at the pipeline's defaults (dev classifier, the
    # base split's), where the tuned models then gained least; 300 leave 46% there and 74% at the demo's sampling
    # (run.train_config tells how that was chosen)
    transformer_steps: int = 300
    transformer_batch: int = 128
    # At 1e-3 the prompt was still being learnt after 500 steps (the AI reward read the prompted digit in 23% of
    # dev samples); at 2e-3 in 82% (seed 0) and 89% (seed 1): past that transition, with mistakes left to fix.
    transformer_lr: float = 2e-3
    caption_dropout: float = 0.1
    shift: float = 1.0
    t5_length: int = T5_LENGTH
    resolution: int = world.RESOLUTION

    def key(self) -> str:
        return recipe_key(self)

    def build(self, out_dir: Path, progress: Optional[Callable[[int], None]] = None) -> Path:
        return build_sd3_base(out_dir, self, progress)

    def total_steps(self) -> int:
        """Optimizer steps of a build (the length of its progress bar)."""
        return self.vae_steps + 3 * self.text_steps + self.transformer_steps


def make_t5_tokenizer() -> Any:
    """A T5TokenizerFast whose pieces are the prompts' words and the numerals (each word-initial, as
    sentencepiece writes them), built offline."""
    from transformers import T5TokenizerFast

    words = world.tokens() + [str(d) for d in range(10)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)


def _t5_pooled(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean of T5's last hidden states over the non-padding tokens (T5 has no pooled output)."""
    states = encoder(ids).last_hidden_state  # (B, L, D)
    mask = (ids != 0).unsqueeze(-1).to(states.dtype)  # <pad> is id 0
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _modules(recipe: SD3Recipe, vocab_size: int, t5_vocab_size: int):
    """Freshly initialised VAE, CLIP-L, CLIP-G, T5 and transformer (seeded)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(recipe.seed)
    vae = make_vae(recipe.resolution, LATENT_CHANNELS, quant_conv=False)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH, projection_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        hidden_act="quick_gelu")) for _ in range(2)]
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(
        sample_size=recipe.resolution // 2, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=recipe.transformer_layers, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=recipe.resolution // 2,
        qk_norm="rms_norm")
    return vae, clips, t5, transformer


def _latent_stats(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (N, C, 8, 8) of the frozen VAE."""
    with torch.no_grad():
        dists = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def train_transformer(pipe: Any, pixels: torch.Tensor, labels: np.ndarray, recipe: SD3Recipe,
                      tick: Callable[[], None]) -> None:
    """Rectified-flow training of `pipe.transformer` on the base split, each image under a random one of its
    captions (or "" at caption_dropout); the pipeline's `encode_prompt` conditions every caption once."""
    transformer, vae = pipe.transformer, pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    captions = [c for d in range(10) for c in world.all_captions(d)] + [""]  # digit-major; the last one is ""
    k = len(world.all_captions(0))
    mean, std = _latent_stats(vae, pixels)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=recipe.t5_length)
    g = torch.Generator().manual_seed(recipe.seed + 2)
    step = DenoiserSteps(transformer, recipe.transformer_lr, recipe.transformer_steps, tick)
    labels_t = torch.from_numpy(labels)
    for _ in range(recipe.transformer_steps):
        b = recipe.transformer_batch
        z, rows = captioned_batch(g, mean, std, labels_t, k, len(captions) - 1, b, recipe.caption_dropout)
        x0 = (z - shift) * scale  # (B, 16, 8, 8)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(b, generator=g))  # logit-normal (0, 1)
        s = sigma.view(b, 1, 1, 1)
        pred = transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=1000 * sigma,
                           encoder_hidden_states=hidden[rows], pooled_projections=pooled[rows]).sample
        step((pred - (noise - x0)).pow(2).mean())
    transformer.eval()


def build_sd3_base(out_dir: Path, recipe: SD3Recipe, progress: Optional[Callable[[int], None]] = None) -> Path:
    """Train the flow base pipeline from scratch and save it to `out_dir` with `save_pretrained`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tick = progress_tick(progress)
    out_dir = Path(out_dir)
    tokenizer = word_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    vae, clips, t5, transformer = _modules(recipe, len(tokenizer), len(t5_tokenizer))
    pixels, labels = _pixels(recipe)
    scaling = train_vae(vae, pixels, recipe, tick)
    mean, _ = _latent_stats(vae, pixels)
    vae.register_to_config(scaling_factor=scaling, shift_factor=float(mean.mean()))  # SD3's VAE has both
    for k, clip in enumerate(clips):
        train_text_encoder(clip, tokenizer, pixels, labels, recipe, tick, seed_offset=3 + k)
    train_text_encoder(t5, t5_tokenizer, pixels, labels, recipe, tick, pooled=_t5_pooled, length=recipe.t5_length,
                       seed_offset=5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=recipe.shift), vae=vae,
        text_encoder=clips[0], tokenizer=tokenizer, text_encoder_2=clips[1], tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    train_transformer(pipe, pixels, labels, recipe, tick)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_recipe(out_dir, recipe)
    return out_dir
