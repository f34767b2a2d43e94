"""Test helpers for rewards: a tiny CLIP saved like a real checkpoint, LAION-layout aesthetic weights,
and a stand-in `open_clip` module so the HPS loading path runs without the real package."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

PROJECTION_DIM = 16  # the tiny CLIP's embedding size; the tiny aesthetic MLP takes this as its input
IMAGE_SIZE = 32
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP's


def char_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: start/end tokens, then each printable char bare and word-final."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = [chr(c) for c in range(33, 127)]
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    return vocab


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """Save a random 2-layer CLIPModel (hidden 32, 32px images, 8px patches, projection 16) with its
    tokenizer and a `preprocessor_config.json` in the layout the hub CLIP checkpoints use."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out_dir = Path(out_dir)
    vocab = char_vocab()
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(out_dir)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # not the init value, so a test sees the model's own scale is used
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
        "do_convert_rgb": True,
    }))
    return out_dir


AESTHETIC_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def aesthetic_state(in_dim: int = PROJECTION_DIM, hidden=(24, 12, 8, 4), seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the LAION improved-aesthetic-predictor layout (Linear layers at 0, 2, 4, 6, 7)."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, *hidden, 1]
    state = {}
    for key, d_in, d_out in zip(AESTHETIC_KEYS, dims[:-1], dims[1:]):
        state[f"{key}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        state[f"{key}.bias"] = torch.randn(d_out, generator=g)
    return state


def solid(colour, size=(40, 48), mode: str = "RGB") -> Image.Image:
    """A one-colour image (width, height)."""
    return Image.new("RGB", size, colour).convert(mode)


def stripes(size=(48, 40)) -> Image.Image:
    """An image with structure, so crops and resizes matter."""
    img = Image.new("RGB", size)
    img.putdata([((x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256) for y in range(size[1]) for x in range(size[0])])
    return img


# A stand-in for open_clip with its API shape (create_model_and_transforms, get_tokenizer,
# encode_image/encode_text); written to a temporary dir as `open_clip.py` by the HPS test.
FAKE_OPEN_CLIP = '''
import numpy as np
import torch
from torch import nn

CALLS = []


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3 * 8 * 8, 8)
        self.visual.image_size = (8, 8)  # as open_clip's VisionTransformer
        self.token_embedding = nn.Embedding(256, 8)

    def encode_image(self, pixels, normalize=False):
        return self.visual(pixels.flatten(1))

    def encode_text(self, tokens, normalize=False):
        return self.token_embedding(tokens).mean(1)


def create_model_and_transforms(name, pretrained=None, precision="fp32", device="cpu", **kw):
    CALLS.append(dict(name=name, pretrained=pretrained, precision=precision))
    model = Model().to(device)

    def preprocess(image):
        arr = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    return model, None, preprocess


def get_tokenizer(name):
    def tokenize(texts):
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode())[:16]
            out[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        return out
    return tokenize
'''
