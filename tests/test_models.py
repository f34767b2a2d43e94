"""Model loading, SD/SDXL conditioning, prediction targets, LoRA and the reference model (the SD family)."""

import json

import pytest
import torch

from diffusion_dpo.config import LoraConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import Reference, add_lora, describe, load_components


def _encodings(components, batch):
    return components.encode_prompt(components.tokenizer(["a red circle"] * batch))


def _lora(c, **kw):
    return add_lora(c.denoiser, LoraConfig(**kw), c.default_lora_targets)


def test_sd_components_and_conditioning(tiny_sd):
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    assert c.name == "sd" and len(c.text_encoders) == 1 and c.prediction_type == "epsilon"
    assert all(not p.requires_grad for p in c.vae.parameters())
    assert all(not p.requires_grad for p in c.text_encoders[0].parameters())
    cond = c.conditioning(_encodings(c, 3), torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), 32)
    assert cond.hidden_states.shape == (6, 16, 32) and cond.added is None
    # both images of a pair share the prompt: rows i and B+i are equal
    torch.testing.assert_close(cond.hidden_states[:3], cond.hidden_states[3:])


def test_sdxl_conditioning_uses_each_images_size_and_crop(tiny_sdxl):
    c = load_components(ModelConfig(pretrained=str(tiny_sdxl), sdxl_time_ids="image"))
    assert c.name == "sdxl" and len(c.text_encoders) == 2 and len(c.tokenizers) == 2
    sizes = torch.tensor([[[40, 32], [48, 64]], [[32, 32], [33, 35]]])  # (B, 2 images, (h, w))
    crops = torch.tensor([[[4, 0], [0, 8]], [[0, 0], [1, 2]]])
    cond = c.conditioning(_encodings(c, 2), sizes, crops, 32)
    assert cond.hidden_states.shape == (4, 16, 64)  # both encoders' penultimate states concatenated
    assert cond.added["text_embeds"].shape == (4, 32)
    expected = torch.tensor([[40, 32, 4, 0, 32, 32], [32, 32, 0, 0, 32, 32],   # winners
                             [48, 64, 0, 8, 32, 32], [33, 35, 1, 2, 32, 32]],  # losers
                            dtype=cond.added["time_ids"].dtype)
    torch.testing.assert_close(cond.added["time_ids"], expected)
    # the UNet accepts it
    noisy = torch.randn(4, 4, 16, 16)
    out = c.denoiser(noisy, torch.tensor([10, 20, 10, 20]), cond.hidden_states, added_cond_kwargs=cond.added).sample
    assert out.shape == noisy.shape


@pytest.mark.parametrize("setting", ["auto", "constant"])
def test_sdxl_time_ids_are_shared_by_a_pair_by_default_as_the_official_code(tiny_sdxl, tiny_sd, setting):
    """The default (auto) and constant: (res, res, 0, 0, res, res) for every image whatever its size and crop, so a
    pair's winner and loser are conditioned alike (issue 37, defect 4: the default gave each image its own, which
    can correlate with the preference)."""
    from diffusion_dpo.models import describe
    from diffusion_dpo.models.sd import StableDiffusionXL

    cfg = ModelConfig(pretrained=str(tiny_sdxl), **({"sdxl_time_ids": setting} if setting != "auto" else {}))
    assert cfg.sdxl_time_ids == setting
    c = load_components(cfg)
    sizes = torch.tensor([[[40, 32], [48, 64]]])
    crops = torch.tensor([[[4, 0], [0, 8]]])
    cond = c.conditioning(_encodings(c, 1), sizes, crops, 32)
    torch.testing.assert_close(cond.added["time_ids"], torch.tensor([[32, 32, 0, 0, 32, 32]] * 2,
                                                                    dtype=cond.added["time_ids"].dtype))
    from diffusion_dpo.config import FlowConfig

    # the precomputed reference's identity follows it; "image" keeps the identity earlier files were made with
    assert StableDiffusionXL.schedule_identity(cfg, FlowConfig())["model.sdxl_time_ids"] == "constant"
    assert "model.sdxl_time_ids" not in StableDiffusionXL.schedule_identity(
        ModelConfig(pretrained="x", sdxl_time_ids="image"), FlowConfig())
    describe(ModelConfig(pretrained=str(tiny_sd)))  # the default is no SDXL setting
    with pytest.raises(UserError, match="model.sdxl_time_ids is not a Stable Diffusion 1.x/2.x setting"):
        describe(ModelConfig(pretrained=str(tiny_sd), sdxl_time_ids=setting if setting != "auto" else "image"))


@pytest.mark.parametrize("fixture,setting,value", [("tiny_sd", "max_sequence_length", 8), ("tiny_sd", "guidance", 3.5),
                                                   ("tiny_sd3", "guidance", 3.5), ("tiny_sd3", "prediction_type", "epsilon"),
                                                   ("tiny_zimage", "sdxl_time_ids", "image"),
                                                   ("tiny_sd", "t5", False)])
def test_a_setting_the_family_would_ignore_is_refused_in_one_line(request, fixture, setting, value):
    """Each family names the family-specific model.* settings it reads; one set for another family (where it
    would change nothing) stops before any weight loads."""
    with pytest.raises(UserError, match=f"model.{setting} is not a .* setting \\(it is .*'s\\)") as exc:
        describe(ModelConfig(pretrained=str(request.getfixturevalue(fixture)), **{setting: value}))
    assert "\n" not in str(exc.value)


def test_encode_images_samples_the_posterior_and_scales(tiny_sd):
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert c.latent_shape(32) == (4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    a = c.encode_images(x, noise)
    dist = c.vae.encode(x).latent_dist
    torch.testing.assert_close(a, (dist.mean + dist.std * noise) * c.vae.config.scaling_factor)
    torch.testing.assert_close(c.encode_images(x), dist.mean * c.vae.config.scaling_factor)


def test_targets_follow_prediction_type(tiny_sd, tiny_sd_vpred):
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([5, 900])
    eps = load_components(ModelConfig(pretrained=str(tiny_sd)))
    assert eps.target(latents, noise, t) is noise
    v = load_components(ModelConfig(pretrained=str(tiny_sd_vpred)))
    assert v.prediction_type == "v_prediction"
    alphas = v.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(v.target(latents, noise, t), expected)
    # the config can override the scheduler's prediction type
    forced = load_components(ModelConfig(pretrained=str(tiny_sd), prediction_type="v_prediction"))
    assert forced.prediction_type == "v_prediction"


def _unet_out(unet, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 16, 16, generator=g)
    cond = c.conditioning(_encodings(c, 1), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 32)
    with torch.no_grad():
        return unet(noisy, torch.tensor([100, 100]), cond.hidden_states, added_cond_kwargs=cond.added).sample


def test_lora_reference_disables_adapters_without_a_copy(tiny_sd):
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    base = _unet_out(c.denoiser, c)
    params = _lora(c, rank=4, alpha=8.0)
    assert params and all("lora" in n for n, p in c.denoiser.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_unet_out(c.denoiser, c), base)  # B = 0 at init: adapted == base
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    ref = Reference(c.denoiser, lora=True, dtype=torch.float32)
    assert ref.copy is None
    assert not torch.allclose(_unet_out(c.denoiser, c), base)
    with ref.model() as r:
        assert r is c.denoiser
        torch.testing.assert_close(_unet_out(r, c), base)
    assert not torch.allclose(_unet_out(c.denoiser, c), base)  # adapters are back on


def test_full_reference_is_a_frozen_copy(tiny_sd):
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    ref = Reference(c.denoiser, lora=False, dtype=torch.float32)
    assert ref.copy is not c.denoiser and all(not p.requires_grad for p in ref.copy.parameters())
    with torch.no_grad():
        for p in c.denoiser.parameters():
            p.add_(0.01)
    with ref.model() as r:
        assert not torch.allclose(_unet_out(r, c), _unet_out(c.denoiser, c))


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_saved_lora_loads_with_load_lora_weights(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    c = load_components(ModelConfig(pretrained=str(path)))
    params = _lora(c, rank=4, alpha=2.0)  # alpha != rank: the scale must survive saving
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    trained = _unet_out(c.denoiser, c)
    c.save_lora(c.denoiser, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe = c.pipeline_class.from_pretrained(path)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(_unet_out(pipe.unet, c), trained, atol=1e-5, rtol=1e-4)


def test_build_pipeline_samples_with_the_checkpoints_scheduler(tiny_sd):
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    pipe = c.build_pipeline(c.denoiser)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0]
    assert img.size == (32, 32)


def test_bad_model_paths_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_components(ModelConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no model_index.json"):
        load_components(ModelConfig(pretrained=str(tmp_path)))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Nothing"}))
    with pytest.raises(UserError, match="does not describe"):
        load_components(ModelConfig(pretrained=str(tmp_path)))
    with pytest.raises(UserError, match="hub") as exc:
        load_components(ModelConfig(pretrained="someone/not-a-real-model-xyz"))
    assert "\n" not in str(exc.value)


def test_reference_copy_runs_in_the_policys_mode(tiny_sd):
    """Some diffusers blocks compute differently in train and eval mode (ResnetBlock2D makes inputs contiguous
    only when training); a reference in another mode than the policy breaks loss = log 2 at step 1."""
    c = load_components(ModelConfig(pretrained=str(tiny_sd)))
    ref = Reference(c.denoiser, lora=False, dtype=torch.float32)
    for training in (True, False):
        c.denoiser.train(training)
        with ref.model(c.denoiser) as r:
            assert r.training is training
