"""The VAE seam: every VAE class our families name turns images into the denoiser's latents exactly as its own
pipeline does (AutoencoderKL's scale and shift, Qwen-Image's per-channel mean and std over one frame, FLUX.2's
patchify and BatchNorm statistics), on the fly and from the statistics read alone out of the weights file."""

import json
from types import SimpleNamespace

import pytest
import torch

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.vae import (FLUX2_STATISTICS, LatentScale, downsampling, latent_channels, load_vae,
                                      load_vae_config, patchify, sample_latents, vae_posterior, vae_statistics)
from diffusion_dpo.randomness import pair_noise


def _pixels(n: int = 3, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                  latents_std=[1.5, 0.5, 2.0, 1.0]).eval()


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32).eval()
    vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))  # a trained VAE's statistics, not the fresh 0 and 1
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return vae


def _index(vae_class: str) -> dict:
    return {"_class_name": "Pipeline", "vae": ["diffusers", vae_class]}


def test_qwen_image_latents_are_its_pipelines():
    """One frame in, the frame axis out, then (z - latents_mean) / latents_std per channel: the img2img pipeline's
    encoding, draw for draw."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline

    vae, pixels = _qwen_vae(), _pixels()
    scale = LatentScale.of(vae.config)
    assert (downsampling(vae.config), latent_channels(vae.config), scale.patch) == (4, 4, 1)
    mean, std = vae_posterior(vae, pixels, batch=2)
    assert mean.shape == (3, 4, 8, 8)
    eps = torch.randn((3, 4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    ours = sample_latents(mean, std, eps[:, :, 0], scale)
    with torch.no_grad():
        theirs = QwenImageImg2ImgPipeline._encode_vae_image(SimpleNamespace(vae=vae), pixels.unsqueeze(2),
                                                            torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs[:, :, 0], rtol=1e-5, atol=1e-5)


def test_flux2_latents_are_its_pipelines_from_the_vae_or_its_weights_file(tmp_path):
    """The posterior mode, 2x2 patchified (C -> 4C), then the BatchNorm's running mean and std: FLUX.2's
    `_encode_vae_image`; the statistics read out of the saved weights alone give the same scale."""
    from diffusers import Flux2KleinPipeline

    vae, pixels = _flux2_vae(), _pixels()
    stats = lambda: {name: vae.get_buffer(name) for name in FLUX2_STATISTICS}  # noqa: E731
    scale = LatentScale.of(vae.config, stats)
    assert scale.patch == 2 and len(scale.shift) == 16
    mean, std = vae_posterior(vae, pixels, batch=8)
    assert mean.shape == (3, 4, 16, 16)
    ours = sample_latents(mean, std, None, scale)
    assert ours.shape == (3, 16, 8, 8)
    with torch.no_grad():
        theirs = Flux2KleinPipeline._encode_vae_image(
            SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents), pixels, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(_index("AutoencoderKLFlux2")))
    cfg = ModelConfig(pretrained=str(tmp_path / "pipe"))
    read = vae_statistics(cfg)  # what a run from the cache reads: no VAE loaded
    assert all(torch.equal(read[n], vae.get_buffer(n)) for n in FLUX2_STATISTICS)
    assert LatentScale.of(load_vae_config(cfg, _index("AutoencoderKLFlux2")), lambda: read) == scale
    loaded = load_vae(cfg, _index("AutoencoderKLFlux2"))
    assert type(loaded).__name__ == "AutoencoderKLFlux2"


def test_the_one_value_scale_keeps_sd_and_sd3s_arithmetic():
    config = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_channels": 16, "block_out_channels": [1, 2]}
    scale = LatentScale.of(config)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(scale.apply(x), (x - 0.0609) * 1.5305)
    assert scale.to_json() == {"scaling": [1.5305], "shift": [0.0609], "patch": 1}


def test_patchify_orders_channels_as_flux2_does():
    from diffusers import Flux2KleinPipeline

    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(patchify(x, 2), Flux2KleinPipeline._patchify_latents(x))
    assert patchify(x, 1) is x


def test_pair_noise_draws_the_posterior_in_the_vaes_shape_and_keeps_the_old_stream():
    """Where the denoiser's latents and the VAE's posterior differ in shape (FLUX.2) each draw has its own; where
    they agree the draws are one call, the stream every earlier run and reference file used."""
    draw = lambda g, shape, device: torch.rand(1, generator=g, device=device)  # noqa: E731
    same = pair_noise([3, 4], draw, (4, 2, 2), "cpu")
    again = pair_noise([3, 4], draw, (4, 2, 2), "cpu", posterior_shape=(4, 2, 2))
    assert torch.equal(same.noise, again.noise) and torch.equal(same.posterior, again.posterior)
    g = torch.Generator().manual_seed(0)
    from diffusion_dpo.randomness import seed_for

    g.manual_seed(seed_for(3, 1))
    draw(g, None, "cpu")
    assert torch.equal(torch.randn((3, 4, 2, 2), generator=g)[0], same.noise[0])  # the old one-call stream
    split = pair_noise([3, 4], draw, (16, 1, 1), "cpu", posterior_shape=(4, 2, 2))
    assert split.noise.shape == (4, 16, 1, 1) and split.posterior.shape == (4, 4, 2, 2)
    assert torch.equal(split.noise[:2], split.noise[2:])  # one noise per pair, shared by its images
    five = pair_noise([3], draw, (4, 1, 2, 2), "cpu")  # a frame axis: any rank
    assert five.noise.shape == (2, 4, 1, 2, 2)


def test_a_vae_class_no_family_names_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="model_index.json: vae is diffusers.UNet2DModel; the VAEs that load"):
        load_vae_config(ModelConfig(pretrained=str(tmp_path)), _index("UNet2DModel"))
    with pytest.raises(UserError, match="is transformers.CLIPModel"):
        load_vae_config(ModelConfig(pretrained=str(tmp_path)), {"vae": ["transformers", "CLIPModel"]})
