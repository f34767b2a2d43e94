"""The official checkpoints' component layouts load (issue 34): tiny pipelines whose model_index.json copies each
official repo's, the components we never train (safety checker, feature extractor, image encoder) left as those
repos leave them. SD 1.5's `["stable_diffusion", "StableDiffusionSafetyChecker"]` was refused at load before."""

import json
import shutil
from pathlib import Path

import pytest

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError

CLIP = ["transformers", "CLIPTextModel"]
CLIP_PROJ = ["transformers", "CLIPTextModelWithProjection"]
CLIP_TOK = ["transformers", "CLIPTokenizer"]
VAE = ["diffusers", "AutoencoderKL"]
UNET = ["diffusers", "UNet2DConditionModel"]
FLOW = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
NULL = [None, None]

# The model_index.json of each official repo (hub id in the key's comment), as published.
OFFICIAL = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5 (and runwayml/stable-diffusion-v1-5 before it)
    "sd15": ("tiny_sd", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": CLIP, "tokenizer": CLIP_TOK,
        "unet": UNET, "vae": VAE}),
    # stabilityai/stable-diffusion-2-1
    "sd21": ("tiny_sd", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
        "safety_checker": NULL, "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": CLIP,
        "tokenizer": CLIP_TOK, "unet": UNET, "vae": VAE}),
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": ("tiny_sdxl", {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True, "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": CLIP, "text_encoder_2": CLIP_PROJ,
        "tokenizer": CLIP_TOK, "tokenizer_2": CLIP_TOK, "unet": UNET, "vae": VAE}),
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3": ("tiny_sd3", {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.29.0.dev0", "scheduler": FLOW,
        "text_encoder": CLIP_PROJ, "text_encoder_2": CLIP_PROJ, "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": CLIP_TOK, "tokenizer_2": CLIP_TOK, "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": VAE}),
    # stabilityai/stable-diffusion-3.5-medium (and -large): the IP-adapter slots present and empty
    "sd35": ("tiny_sd3", {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0.dev0",
        "feature_extractor": NULL, "image_encoder": NULL, "scheduler": FLOW,
        "text_encoder": CLIP_PROJ, "text_encoder_2": CLIP_PROJ, "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": CLIP_TOK, "tokenizer_2": CLIP_TOK, "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": VAE}),
    # black-forest-labs/FLUX.1-dev (FLUX.1-schnell has the same layout)
    "flux": ("tiny_flux", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0", "scheduler": FLOW,
        "text_encoder": CLIP, "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": CLIP_TOK,
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": VAE}),
}


def _write_safety_parts(root: Path, index: dict) -> None:
    """The folders an official SD 1.x repo ships for the parts we never train: a (tiny) safety checker and the
    CLIP image processor that feeds it."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    if (index.get("feature_extractor") or [None])[0]:
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            root / "feature_extractor")
    if (index.get("safety_checker") or [None])[0]:
        tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
        config = CLIPConfig(text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=8)
        StableDiffusionSafetyChecker(config).save_pretrained(root / "safety_checker")


@pytest.fixture(params=sorted(OFFICIAL))
def official(request, tmp_path):
    """(layout name, a tiny pipeline directory carrying that official layout)."""
    fixture, index = OFFICIAL[request.param]
    root = tmp_path / request.param
    shutil.copytree(request.getfixturevalue(fixture), root)
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    _write_safety_parts(root, index)
    return request.param, root


def test_official_layouts_load_for_training_and_sampling(official, tmp_path):
    from diffusion_dpo.evaluation.generate import generate
    from diffusion_dpo.models import describe, load_components

    name, root = official
    _, family = describe(ModelConfig(pretrained=str(root)))
    components = load_components(ModelConfig(pretrained=str(root)))
    assert components.denoiser is not None and components.vae is not None and components.text_encoders
    manifest = generate(str(root), ["a red circle"], [0], tmp_path / "gen", steps=2, guidance_scale=2.0, height=32,
                        width=32, batch_size=1)
    assert len(manifest.read_text().splitlines()) == 1, name


def test_the_official_sd15_layout_trains(tmp_path, tiny_sd):
    """The paper's first recipe on the real SD 1.5 layout (its safety checker entry): one training step."""
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic
    from diffusion_dpo.training import train
    from test_training import make_cfg

    root = tmp_path / "sd15"
    shutil.copytree(tiny_sd, root)
    index = OFFICIAL["sd15"][1]
    (root / "model_index.json").write_text(json.dumps(index))
    _write_safety_parts(root, index)
    data = build_tiny_pickapic(tmp_path / "data", num_pairs=4, seed=0)
    final = train(make_cfg(tmp_path / "run", root, data, train__max_steps=1))
    assert (final / "unet").is_dir()


@pytest.mark.parametrize("entry, refused", [
    (["stable_diffusion", "StableDiffusionSafetyChecker"], False),  # diffusers' own pipeline module
    (["stable_diffusion_xl", "StableDiffusionXLWatermarker"], False),
    (["os", "system"], True),
    (["diffusers.pipelines.stable_diffusion", "StableDiffusionSafetyChecker"], True),  # a dotted path is a module
    (["transformers", "AutoModel"], True),  # an Auto class follows the folder's config (auto_map: remote code)
])
def test_only_diffusers_and_transformers_code_is_named(tmp_path, tiny_sd, entry, refused):
    from diffusion_dpo.models import read_model_index

    root = tmp_path / "model"
    shutil.copytree(tiny_sd, root)
    index = json.loads((root / "model_index.json").read_text())
    index["safety_checker"] = entry
    (root / "model_index.json").write_text(json.dumps(index))
    if refused:
        with pytest.raises(UserError, match=f"component safety_checker (comes from|is transformers)"):
            read_model_index(ModelConfig(pretrained=str(root)))
    else:
        read_model_index(ModelConfig(pretrained=str(root)))
