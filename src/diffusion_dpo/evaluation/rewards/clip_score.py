"""CLIP embeddings and the two rewards built on them: `clip` (CLIP score) and `pickscore`.

Both embed the image and the prompt with a transformers `CLIPModel` exactly as CLIP does:

    image feature = visual_projection(pooled vision output)        # (N, D)
    text feature  = text_projection(pooled text output, EOS token)  # (N, D)
    cos_i         = <img_i / |img_i|, txt_i / |txt_i|>              # image i against its own prompt i

and differ only in the formula applied to cos:

    clip:       100 * max(cos, 0)                 (Hessel et al. 2021, as torchmetrics reports it)
    pickscore:  exp(logit_scale) * cos            (Kirstain et al. 2023; exp(logit_scale) ~ 100)

Images are pre-processed by the checkpoint's own CLIP image processor (shortest side resized
bicubic, centre crop, rescale 1/255, normalise with its mean/std); prompts are truncated to the
text encoder's context (77 tokens for real CLIP).

Defaults: `clip` uses `openai/clip-vit-large-patch14`; `pickscore` uses the model
`yuvalkirstain/PickScore_v1` with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
(as the PickScore authors do). A local directory holding a saved `CLIPModel` plus its
tokenizer and `preprocessor_config.json` works for either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_dpo.evaluation.rewards.common import (RewardFn, hub_error, hub_revision, looks_local, resolve_source, to_rgb,
                                          torch_dtype)

CLIP_MODEL = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP score = 100 * max(cos(img_i, txt_i), 0); features (N, D), need not be normalised -> (N,)."""
    cos = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)  # (N,)
    return 100.0 * cos.clamp(min=0.0)


def pickscore(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """PickScore = exp(logit_scale) * cos(img_i, txt_i); features (N, D) -> (N,)."""
    cos = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)  # (N,)
    return torch.as_tensor(logit_scale, dtype=cos.dtype).exp() * cos


def _image_processor_class():
    # transformers 5 splits the CLIP processor into a torchvision-backed default and a PIL-backed
    # class; we never need torchvision, so take the PIL one (transformers 4's class is PIL-backed).
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


class ClipEmbedder:
    """A loaded CLIPModel with its tokenizer and image processor, producing unit-norm features."""

    def __init__(self, model, tokenizer, image_processor, device: torch.device, dtype: torch.dtype):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.device, self.dtype = device, dtype
        text_ctx = model.config.text_config.max_position_embeddings
        # tokenizers saved without a limit report a huge model_max_length; the encoder's context is the real one
        self.max_length = min(text_ctx, getattr(tokenizer, "model_max_length", text_ctx) or text_ctx)

    @property
    def dim(self) -> int:
        """Embedding size D (the projection dim)."""
        return self.model.config.projection_dim

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """visual_projection(pooled vision output), L2-normalised, float32: (N, D)."""
        pixels = self.image_processor(images=to_rgb(images), return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output  # (N, hidden)
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # (N, D)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """text_projection(pooled text output at the EOS token), L2-normalised, float32: (N, D)."""
        if self.tokenizer is None:
            raise RuntimeError("this embedder was loaded without a tokenizer")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)  # (N, D)


def load_clip_embedder(reward: str, model_source: str, processor_source: str | None = None,
                       device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                       with_text: bool = True) -> ClipEmbedder:
    """Load a CLIPModel (local dir or hub id) and its processor (from `processor_source`, default the model's)."""
    from transformers import AutoTokenizer, CLIPModel

    model_source = resolve_source(reward, model_source, "model")
    processor_source = resolve_source(reward, processor_source or model_source, "processor")
    torch_type = torch_dtype(reward, dtype)
    model_rev, processor_rev = (None if looks_local(s) else hub_revision(s) for s in (model_source, processor_source))
    try:
        model = CLIPModel.from_pretrained(model_source, revision=model_rev,
                                          trust_remote_code=False)  # a hub repo never brings code
    except (OSError, ValueError) as err:  # missing files / not cached offline / not a CLIP checkpoint
        raise hub_error(reward, model_source, err) from err
    try:
        image_processor = _image_processor_class().from_pretrained(processor_source, revision=processor_rev,
                                                                   trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(processor_source, revision=processor_rev,
                                                  trust_remote_code=False) if with_text else None
    except (OSError, ValueError) as err:
        raise hub_error(reward, processor_source, err) from err
    device = torch.device(device)
    model.to(device, torch_type).eval().requires_grad_(False)
    return ClipEmbedder(model, tokenizer, image_processor, device, torch_type)


def load_clip(path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
              processor: str | None = None) -> RewardFn:
    """`clip` reward: 100 * max(cos(image, prompt), 0) with any CLIP checkpoint (default openai ViT-L/14)."""
    embedder = load_clip_embedder("clip", path or CLIP_MODEL, processor, device, dtype)

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return clip_score(embedder.images(images), embedder.texts(prompts)).cpu()  # (N,)

    score.embedder = embedder  # for tests and for callers that want the raw features
    return score


def load_pickscore(path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                   processor: str | None = None) -> RewardFn:
    """`pickscore` reward: exp(logit_scale) * cos(image, prompt) with the PickScore_v1 CLIP-H.

    The processor defaults to `path` when it is a local dir with a `preprocessor_config.json`,
    else to the LAION CLIP-H processor the PickScore model was trained with."""
    source = path or PICKSCORE_MODEL
    if processor is None:
        local = Path(source).expanduser()
        processor = str(local) if (local / "preprocessor_config.json").is_file() else PICKSCORE_PROCESSOR
    embedder = load_clip_embedder("pickscore", source, processor, device, dtype)
    logit_scale = embedder.model.logit_scale.detach().float().cpu()  # a learned scalar; exp ~ 100 for PickScore

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return pickscore(embedder.images(images), embedder.texts(prompts), logit_scale.to(embedder.device)).cpu()

    score.embedder = embedder
    return score
