"""The demo's base model: a real `StableDiffusionPipeline`, made and trained here on the CPU.

Parts, each the real diffusers/transformers class, shrunk:

    tokenizer      a word-level `BertTokenizer` whose vocabulary is the prompts' words (written locally)
    text_encoder   `CLIPTextModel`, 2 layers of width 32, pre-trained CLIP-style on the base split, then frozen
    vae            `AutoencoderKL`, 16x16x3 pixels <-> 8x8x4 latents, trained first on reconstructions
    unet           `UNet2DConditionModel`, 2 cross-attention levels (32, 64 channels) on 8x8 latents
    scheduler      DDPM noise schedule of SD 1.x (scaled_linear betas, epsilon prediction); sampled
                   with DPM-Solver++ (few steps are enough)

Training uses only the base split of the digits: the VAE by reconstruction, the text encoder by
CLIP's contrastive loss against the images, then the UNet by plain denoising MSE, with captions replaced by "" at
`caption_dropout` so classifier-free guidance works. The budget is deliberately short: samples
look like digits, but some are smudged or show the wrong digit, which leaves DPO something to fix.
Everything is seeded; the same recipe gives the same weights on the same machine.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from diffusion_dpo.demo import world

TOKEN_LENGTH = 12  # [CLS] + up to 9 words + [SEP], padded; the longest prompt has 8 words


@dataclass(frozen=True)
class BaseRecipe:
    """Every setting that decides the base model's weights (its hash keys the cache)."""

    seed: int = 0
    vae_steps: int = 200  # reconstructions are near-perfect (MSE < 0.01) after 200 steps of 64: 8x8 digits hold little
    vae_batch: int = 64
    vae_lr: float = 2e-3
    # No KL term: under Adam even a 1e-5 KL weight steadily widens the posterior (Adam rescales small, consistent
    # gradients), and posterior noise the UNet must treat as signal slows its learning; the latents' scale is
    # fixed by scaling_factor instead, as SD's was.
    vae_kl_weight: float = 0.0
    unet_steps: int = 600  # short on purpose: digit-like samples, but not all right or crisp
    unet_batch: int = 128
    unet_lr: float = 1e-3
    text_steps: int = 150  # contrastive pre-training of the text encoder: the digit is told apart within ~100
    text_lr: float = 3e-3
    caption_dropout: float = 0.1  # as in SD training: lets the pipeline do classifier-free guidance
    resolution: int = world.RESOLUTION

    def key(self) -> str:
        """A short stable hash of the recipe, the split and the package versions (the cache key)."""
        return recipe_key(self)

    def build(self, out_dir: Path, progress: Optional[Callable[[int], None]] = None) -> Path:
        return build_base(out_dir, self, progress)

    def total_steps(self) -> int:
        """Optimizer steps of a build (the length of its progress bar)."""
        return self.vae_steps + self.text_steps + self.unet_steps


def recipe_key(recipe: Any, versions: bool = True) -> str:
    """A short stable hash of a base recipe (a dataclass), the split and the package versions: its cache key.
    `versions=False`: without the versions, the key of a shipped base (its weights load under any version)."""
    import hashlib

    import diffusers
    import transformers

    facts = {**asdict(recipe), "split_seed": world.SPLIT_SEED, "templates": world.PAIR_TEMPLATES + world.EVAL_TEMPLATES}
    if versions:
        facts |= {"torch": torch.__version__, "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def make_tokenizer(out_dir: Path) -> None:
    """Write a word-level BertTokenizer: special tokens, the prompts' words and the ten numerals."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + world.tokens() + [str(d) for d in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "vocab.txt"
        file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
        BertTokenizer(str(file), model_max_length=TOKEN_LENGTH, do_lower_case=True).save_pretrained(out_dir)


def word_tokenizer() -> Any:
    """The word-level BertTokenizer of make_tokenizer, loaded (written to a temporary directory and read back)."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(Path(tmp))
        return BertTokenizer.from_pretrained(tmp)


def progress_tick(progress: Optional[Callable[[int], None]]) -> Callable[[], None]:
    """One optimizer step's worth of progress (a no-op without a progress callback)."""
    return (lambda: progress(1)) if progress is not None else (lambda: None)


def write_recipe(out_dir: Path, recipe: Any) -> None:
    """recipe.json beside a built base: every setting and the cache key."""
    (out_dir / "recipe.json").write_text(json.dumps({**asdict(recipe), "key": recipe.key()}, indent=2) + "\n")


def make_vae(resolution: int, latent_channels: int = 4, quant_conv: bool = True) -> nn.Module:
    """A fresh x2 AutoencoderKL (16x16x3 <-> 8x8xC), its posterior started near-deterministic."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, sample_size=resolution, use_quant_conv=quant_conv,
                        use_post_quant_conv=quant_conv)
    with torch.no_grad():
        # Start from a near-deterministic posterior (std ~0.02, like SD's VAE relative to its latents): from the
        # default std 1 a short run leaves posterior noise of a third of the latent scale, which the denoiser
        # cannot tell from diffusion noise, so low-noise steps dominate its loss and its prompt is never learned.
        moments = vae.quant_conv if quant_conv else vae.encoder.conv_out  # the last layer giving (mean, log var)
        moments.bias[latent_channels:] = -8.0
    return vae


def _modules(recipe: BaseRecipe, vocab_size: int):
    """Freshly initialised VAE, text encoder and UNet (seeded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed)
    vae = make_vae(recipe.resolution)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH, projection_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=recipe.resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        # Besides cross-attention, an attention-pooled summary of the prompt is added to the timestep embedding,
        # which modulates every ResNet block (as in class-conditional DDPMs): a direct path for the one thing
        # these prompts say, the digit, within a budget of a few hundred steps.
        addition_embed_type="text", addition_embed_type_num_heads=4)
    return vae, text_encoder, unet


def _pixels(recipe: BaseRecipe) -> tuple[torch.Tensor, np.ndarray]:
    """The base split as pixels (N, 3, R, R) in [-1, 1] and labels (N,)."""
    from diffusion_dpo.data.images import to_unit_range

    digits = world.split("base")
    pixels = np.stack([to_unit_range(world.to_image(ink, recipe.resolution)) for ink in digits.ink])
    return torch.from_numpy(pixels), digits.labels


def _schedule(step: int, total: int, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to zero: a short run ends on its best weights."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae: nn.Module, pixels: torch.Tensor, recipe: BaseRecipe, tick: Callable[[], None]) -> float:
    """Fit the VAE to reconstruct `pixels`; return the scaling factor that gives latents unit variance."""
    g = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, recipe.vae_steps))
    vae.train()
    for _ in range(recipe.vae_steps):
        x = pixels[torch.randint(0, len(pixels), (recipe.vae_batch,), generator=g)]  # (B, 3, R, R)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (recon - x).pow(2).mean() + recipe.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tick()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    return float(1.0 / means.std())  # SD's 0.18215 was found the same way


def clip_pooled(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The pooled embedding a pipeline reads from a CLIP text encoder: text_embeds (with projection), else the
    pooled output at the end token."""
    out = text_encoder(ids)
    return out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output


def train_text_encoder(text_encoder: nn.Module, tokenizer, pixels: torch.Tensor, labels: np.ndarray,
                       recipe: Any, tick: Callable[[], None], pooled: Callable = clip_pooled,
                       length: int = TOKEN_LENGTH, seed_offset: int = 3) -> None:
    """CLIP-style contrastive pre-training of the text encoder against the base split's images, then freeze it.

    SD conditions on a CLIP text encoder pre-trained on image-text pairs; a randomly initialised one gives
    hidden states that differ across prompts by a fifth of their scale, and a UNet trained on them learns to
    ignore the prompt. Here the pooled output (at [SEP]) of a caption and a linear embedding of a digit image
    are pulled together by the symmetric InfoNCE loss of CLIP, over batches holding each digit once with
    a random phrasing. Because the encoder is causal, every position from [SEP] on carries the digit.
    `pooled(encoder, ids)` picks the embedding trained (CLIP's pooled output by default; mean-pooled T5 states).
    """
    torch.manual_seed(recipe.seed + seed_offset)
    with torch.no_grad():
        width = pooled(text_encoder, tokenizer([""], return_tensors="pt").input_ids).shape[-1]
    image_encoder = nn.Linear(pixels[0].numel(), width)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(text_encoder.parameters()) + list(image_encoder.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=recipe.text_lr, weight_decay=0.0)
    captions = [world.all_captions(d) for d in range(10)]
    g = torch.Generator().manual_seed(recipe.seed + seed_offset)
    by_digit = [np.flatnonzero(labels == d) for d in range(10)]
    text_encoder.train()
    for _ in range(recipe.text_steps):
        picks = [int(ix[torch.randint(0, len(ix), (1,), generator=g)]) for ix in by_digit]  # one image per digit
        texts = [captions[d][int(torch.randint(0, len(captions[d]), (1,), generator=g))] for d in range(10)]
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        t = nn.functional.normalize(pooled(text_encoder, ids), dim=-1)  # (10, D)
        v = nn.functional.normalize(image_encoder(pixels[picks].flatten(1)), dim=-1)  # (10, D)
        logits = logit_scale.exp() * t @ v.T
        target = torch.arange(10)
        loss = 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()
    text_encoder.eval().requires_grad_(False)


def train_unet(unet: nn.Module, text_encoder: nn.Module, tokenizer, vae: nn.Module, scaling: float,
               pixels: torch.Tensor, labels: np.ndarray, recipe: BaseRecipe, tick: Callable[[], None]) -> None:
    """Denoising MSE (epsilon target) on the base split, each image under a random one of its captions;
    the text encoder is frozen (as in SD), so every caption's hidden states are computed once."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**SCHEDULE)
    captions = [c for d in range(10) for c in world.all_captions(d)] + [""]  # digit-major; the last one is ""
    k = len(world.all_captions(0))
    with torch.no_grad():  # the VAE and text encoder are frozen now: encode once, sample the posterior per step
        dists = [vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        mean = torch.cat([d.mean for d in dists])  # (N, 4, 8, 8)
        std = torch.cat([d.std for d in dists])
        ids = tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        hidden_table = text_encoder(ids)[0]  # (10 * k + 1, L, 32)
    g = torch.Generator().manual_seed(recipe.seed + 2)
    step = DenoiserSteps(unet, recipe.unet_lr, recipe.unet_steps, tick)
    labels_t = torch.from_numpy(labels)
    for _ in range(recipe.unet_steps):
        b = recipe.unet_batch
        z, rows = captioned_batch(g, mean, std, labels_t, k, len(captions) - 1, b, recipe.caption_dropout)
        latents = z * scaling  # (B, 4, 8, 8)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden_table[rows]).sample
        step((pred - noise).pow(2).mean())
    unet.eval()


def captioned_batch(g: torch.Generator, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, k: int,
                    empty_row: int, b: int, caption_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch for a denoiser: a posterior draw z (B, C, h, w) of b random images (unscaled) and the row
    of each one's caption in a digit-major table of k phrasings per digit (`empty_row`, the "" caption, at
    `caption_dropout`)."""
    idx = torch.randint(0, len(mean), (b,), generator=g)
    rows = labels[idx] * k + torch.randint(0, k, (b,), generator=g)  # a random phrasing of each image's digit
    rows = torch.where(torch.rand(b, generator=g) < caption_dropout, empty_row, rows)
    return mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g), rows


class DenoiserSteps:
    """AdamW (weight decay 1e-2) with warm-up and cosine decay, gradients clipped at norm 1: one call per step."""

    def __init__(self, model: nn.Module, lr: float, steps: int, tick: Callable[[], None]):
        self.model, self.tick = model, tick
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _schedule(s, steps))
        model.train()

    def __call__(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.tick()


# The noise schedule of SD 1.x: the training (DDPM) and sampling (DPM-Solver++) schedulers share it.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1)


def build_base(out_dir: Path, recipe: BaseRecipe, progress: Optional[Callable[[int], None]] = None) -> Path:
    """Train the base pipeline from scratch and save it to `out_dir` with `save_pretrained`."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tick = progress_tick(progress)
    out_dir = Path(out_dir)
    tokenizer = word_tokenizer()
    vae, text_encoder, unet = _modules(recipe, len(tokenizer))
    pixels, labels = _pixels(recipe)
    scaling = train_vae(vae, pixels, recipe, tick)
    vae.register_to_config(scaling_factor=scaling)
    train_text_encoder(text_encoder, tokenizer, pixels, labels, recipe, tick)
    train_unet(unet, text_encoder, tokenizer, vae, scaling, pixels, labels, recipe, tick)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_recipe(out_dir, recipe)
    return out_dir
