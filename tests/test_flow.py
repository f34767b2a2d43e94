"""The flow-matching families (SD3, FLUX): the schedule by hand, conditioning and the denoiser call against the
diffusers pipelines' own, the pair invariants, and the one-line refusals."""

import json
import math
import shutil

import pytest
import torch

from conftest import FLOW_FAMILIES, tiny_family
from diffusion_dpo.config import FlowConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.training.losses import dpo_loss
from diffusion_dpo.models import load_components
from diffusion_dpo.models.flow import draw_u, loss_weight, shift_sigma
from diffusion_dpo.models.flux import image_ids, pack, unpack
from diffusion_dpo.randomness import pair_noise

PROMPTS = ["a red circle", "a blue square on a white background"]


def test_flow_noisy_input_and_target_by_hand(tiny_sd3):
    c = load_components(ModelConfig(pretrained=str(tiny_sd3)), denoiser=False, encoders=False)
    x0 = torch.tensor([[[[2.0]]], [[[-1.0]]]])  # (2, 1, 1, 1)
    eps = torch.tensor([[[[0.5]]], [[[3.0]]]])
    sigma = torch.tensor([0.25, 0.9])
    noisy, target = c.noisy_and_target(x0, eps, sigma)
    assert noisy.flatten().tolist() == pytest.approx([0.75 * 2.0 + 0.25 * 0.5, 0.1 * -1.0 + 0.9 * 3.0])
    assert target.flatten().tolist() == pytest.approx([0.5 - 2.0, 3.0 + 1.0])  # v = eps - x0
    assert target.dtype == torch.float32


def test_sigma_sampling_and_shift_by_hand():
    def first(kind, seed=7, **kw):
        return draw_u(torch.Generator().manual_seed(seed), FlowConfig(timestep_sampling=kind, **kw), "cpu").item()

    z = torch.randn((1,), generator=torch.Generator().manual_seed(7)).item()
    w = torch.rand((1,), generator=torch.Generator().manual_seed(7)).item()
    assert first("logit_normal") == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-6)
    # m in diffusers' sense (issue 37, defect 3): u = sigmoid(s z - m), m > 0 less noise
    assert first("logit_normal", logit_mean=0.5, logit_std=2.0) == pytest.approx(1 / (1 + math.exp(-(2 * z - 0.5))),
                                                                                  rel=1e-6)
    # ... as diffusers' training scripts draw it: u' = sigmoid(m + s z) indexing the descending timestep table
    g = torch.Generator().manual_seed(0)
    ours = torch.stack([draw_u(g, FlowConfig(logit_mean=1.0), "cpu") for _ in range(4000)]).flatten()
    descending = torch.linspace(1, 0, 1001)[:-1]  # sigma of timesteps 1000 .. 1 (an unshifted FLUX-style table)
    theirs = descending[(torch.sigmoid(1.0 + torch.randn(4000, generator=g)) * 1000).long().clamp(max=999)]
    assert ours.mean().item() < 0.35 and abs(ours.mean().item() - theirs.mean().item()) < 0.02
    assert first("uniform") == pytest.approx(w)
    assert first("mode", mode_scale=1.29) == pytest.approx(1 - w - 1.29 * (math.cos(math.pi * w / 2) ** 2 - 1 + w),
                                                           rel=1e-5)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert shift_sigma(u, 3.0).tolist() == pytest.approx([0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0])  # s u / (1 + (s-1) u)
    assert shift_sigma(u, 1.0).tolist() == pytest.approx(u.tolist())
    sigma = torch.tensor([0.5, 0.25])
    assert loss_weight(sigma, "none") is None
    assert loss_weight(sigma, "sigma_sqrt").tolist() == pytest.approx([4.0, 16.0])
    assert loss_weight(sigma, "cosmap").tolist() == pytest.approx([2 / (math.pi * 0.5), 2 / (math.pi * 0.625)])


def test_each_family_takes_its_schedulers_shift(tiny_sd3, tiny_flux):
    """SD3: its config's static shift (3); FLUX.1-dev shifts dynamically at sampling time, so training is unshifted
    (diffusers' FLUX script, Flow-Factory); `flow.shift` overrides either. One sigma per pair, shared."""
    sd3 = load_components(ModelConfig(pretrained=str(tiny_sd3)), denoiser=False, encoders=False)
    flux = load_components(ModelConfig(pretrained=str(tiny_flux)), denoiser=False, encoders=False)
    assert sd3.shift == 3.0 and flux.shift == 1.0
    forced = load_components(ModelConfig(pretrained=str(tiny_flux)), denoiser=False, encoders=False,
                             flow=FlowConfig(shift=2.0))
    assert forced.shift == 2.0
    seeds = [11, 12, 13]
    draws = pair_noise(seeds, sd3.draw_timestep, sd3.latent_shape(32), "cpu")
    plain = pair_noise(seeds, flux.draw_timestep, flux.latent_shape(32), "cpu")
    assert torch.allclose(draws.timesteps, shift_sigma(plain.timesteps, 3.0))  # the same u, shifted
    assert torch.equal(draws.timesteps[:3], draws.timesteps[3:]) and torch.equal(draws.noise[:3], draws.noise[3:])
    assert bool(((draws.timesteps > 0) & (draws.timesteps < 1)).all())


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_equals_the_pipelines_encode_prompt(tiny_sd3, t5):
    from diffusers import StableDiffusion3Pipeline

    c = load_components(ModelConfig(pretrained=str(tiny_sd3), t5=t5, max_sequence_length=24))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    pipe = c.build_pipeline(c.denoiser)
    assert isinstance(pipe, StableDiffusion3Pipeline) and (pipe.text_encoder_3 is None) is (not t5)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=24)
    assert embeds.shape == (2, 16 + 24, 64)  # 16 CLIP tokens (the tiny CLIPs) + 24 T5 tokens, T5's width
    torch.testing.assert_close(cond.hidden_states, embeds.repeat(2, 1, 1))  # [winners; losers]
    torch.testing.assert_close(cond.pooled, pooled.repeat(2, 1))
    assert cond.guidance is None


@pytest.mark.parametrize("fixture,guidance", [("tiny_flux", 3.5), ("tiny_flux_schnell", None)])
def test_flux_conditioning_equals_the_pipelines_encode_prompt(request, fixture, guidance):
    c = load_components(ModelConfig(pretrained=str(request.getfixturevalue(fixture)), max_sequence_length=20))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    embeds, pooled, text_ids = c.build_pipeline(c.denoiser).encode_prompt(PROMPTS, max_sequence_length=20)
    torch.testing.assert_close(cond.hidden_states, embeds.repeat(2, 1, 1))
    torch.testing.assert_close(cond.pooled, pooled.repeat(2, 1))
    if guidance is None:
        assert cond.guidance is None
    else:
        assert cond.guidance.tolist() == [guidance] * 4


def test_flux_packing_and_ids_are_the_pipelines(tiny_flux):
    """Training packs latents and numbers the tokens exactly as FluxPipeline does at sampling time, and unpack
    inverts pack, so the per-sample error is over the same latent elements."""
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 8, 12)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(unpack(pack(x), 16, 8, 12), x)
    assert torch.equal(image_ids(4, 6, "cpu"), FluxPipeline._prepare_latent_image_ids(3, 4, 6, "cpu", torch.float32))
    # predict = the transformer called as FluxPipeline calls it (timestep / 1000, guidance, ids), unpacked
    c = load_components(ModelConfig(pretrained=str(tiny_flux), max_sequence_length=8))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS[:1])), None, None, 32)
    noisy, sigma = torch.randn(2, 16, 16, 16), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        direct = c.denoiser(hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 16, 16), timestep=sigma,
                            guidance=torch.full((2,), 3.5), pooled_projections=cond.pooled,
                            encoder_hidden_states=cond.hidden_states, txt_ids=torch.zeros(8, 3),
                            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)).sample
        torch.testing.assert_close(c.predict(c.denoiser, noisy, sigma, cond), unpack(direct, 16, 16, 16))


def test_zimage_conditioning_equals_the_pipelines_encode_prompt(tiny_zimage):
    """Qwen3's second-to-last hidden state at each prompt's own tokens (the chat template, thinking on), one length
    per prompt: ZImagePipeline.encode_prompt's list, for [winners; losers]."""
    from diffusers import ZImagePipeline

    c = load_components(ModelConfig(pretrained=str(tiny_zimage), max_sequence_length=64))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    pipe = c.build_pipeline(c.denoiser)
    assert isinstance(pipe, ZImagePipeline)
    embeds, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=64)
    assert len({e.shape[0] for e in embeds}) == 2  # the two prompts have their own lengths
    assert len(cond.features) == 4
    for ours, theirs in zip(cond.features, embeds + embeds):
        torch.testing.assert_close(ours, theirs)


def test_zimage_predicts_the_velocity_its_pipeline_steps_with(tiny_zimage):
    """One sampling step from sigma = 1 to 0 is x - v(x, sigma = 1): ZImagePipeline feeds the transformer 1 - sigma
    and negates its output; predict() returns that velocity, so the training target noise - x_0 is the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = load_components(ModelConfig(pretrained=str(tiny_zimage), max_sequence_length=64))
    pipe = c.build_pipeline(c.denoiser, FlowMatchEulerDiscreteScheduler(shift=1.0))
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))  # the tiny VAE downsamples 2x
    with torch.no_grad():
        stepped = pipe("a red circle", height=32, width=32, num_inference_steps=1, guidance_scale=0.0, latents=noise,
                       output_type="latent", max_sequence_length=64).images
        cond = c.conditioning(c.encode_prompt(c.tokenizer(["a red circle"])), torch.zeros(1, 1, 2), None, 32)
        velocity = c.predict(c.denoiser, noise, torch.ones(1), cond)
    torch.testing.assert_close(stepped, noise - velocity, rtol=1e-5, atol=1e-5)


def test_flux2_klein_conditioning_equals_the_pipelines_prompt_embeds(tiny_flux2_klein):
    """Qwen3's layers 9, 18 and 27 side by side at every one of max_sequence_length tokens (the chat template,
    thinking off), as Flux2KleinPipeline._get_qwen3_prompt_embeds, for [winners; losers]."""
    from diffusers import Flux2KleinPipeline

    c = load_components(ModelConfig(pretrained=str(tiny_flux2_klein), max_sequence_length=64))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(c.text_encoders[0], c.tokenizers[0], list(PROMPTS),
                                                         max_sequence_length=64)
    assert embeds.shape == (2, 64, 48)
    torch.testing.assert_close(cond.hidden_states, embeds.repeat(2, 1, 1))
    assert cond.guidance is None  # klein has no guidance embedding


def test_flux2_dev_conditioning_equals_the_pipelines_prompt_embeds(tiny_flux2):
    """Mistral 3's layers 10, 20 and 30 side by side at every one of max_sequence_length tokens (the system message,
    then the prompt, in the chat template), as Flux2Pipeline._get_mistral_3_small_prompt_embeds, for [winners;
    losers]; the guidance embedding fed 4.0 (the pipeline's default) or model.guidance. The checkpoint names a
    PixtralProcessor (whose class needs torchvision): its tokenizer alone is loaded, and the pipeline's own
    encoding runs with it."""
    from diffusers import Flux2Pipeline

    assert json.loads((tiny_flux2 / "model_index.json").read_text())["tokenizer"] == ["transformers",
                                                                                     "PixtralProcessor"]
    c = load_components(ModelConfig(pretrained=str(tiny_flux2), max_sequence_length=64))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(c.text_encoders[0], c.tokenizers[0], list(PROMPTS),
                                                              max_sequence_length=64)
    assert embeds.shape == (2, 64, 48)
    torch.testing.assert_close(cond.hidden_states, embeds.repeat(2, 1, 1))
    assert torch.equal(cond.guidance, torch.full((4,), 4.0))
    c = load_components(ModelConfig(pretrained=str(tiny_flux2), max_sequence_length=64, guidance=2.5),
                        denoiser=False)
    assert torch.equal(c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32).guidance,
                       torch.full((4,), 2.5))


def test_a_distilled_klein_samples_its_grids_without_guidance(tiny_flux2_klein, tmp_path):
    """The pipeline skips classifier-free guidance from its is_distilled flag: a sample grid's pipeline carries the
    checkpoint's."""
    for distilled in (False, True):
        model = _edited_copy(tiny_flux2_klein, tmp_path / str(distilled), lambda i: i.update(is_distilled=distilled))
        c = load_components(ModelConfig(pretrained=model, max_sequence_length=64), denoiser=False)
        assert c.build_pipeline(None).config.is_distilled is distilled


@pytest.mark.parametrize("fixture,guidance", [("tiny_flux2_klein", 1.0), ("tiny_flux2", 4.0)])
def test_flux2_predicts_the_velocity_its_pipeline_steps_with(request, fixture, guidance):
    """One sampling step from sigma = 1 to 0 is x - v(x, 1) in the patchified, normalised space, which the pipeline
    then denormalises with the VAE's BatchNorm statistics and unpatchifies: predict() and LatentScale are the
    pipeline's, packing, position ids and (for [dev]) the embedded guidance included."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    length = {"tiny_flux2_klein": 64, "tiny_flux2": 64}[fixture]
    c = load_components(ModelConfig(pretrained=str(request.getfixturevalue(fixture)), max_sequence_length=length))
    assert c.latent_shape(32) == (32, 8, 8) and c.posterior_shape(32) == (8, 16, 16)
    pipe = c.build_pipeline(c.denoiser, FlowMatchEulerDiscreteScheduler(shift=1.0))
    noise = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stepped = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=1, guidance_scale=guidance,
                       latents=noise, output_type="latent", max_sequence_length=length).images
        cond = c.conditioning(c.encode_prompt(c.tokenizer(["a red circle"])), torch.zeros(1, 1, 2), None, 32)
        ours = noise - c.predict(c.denoiser, noise, torch.ones(1), cond)
    if fixture == "tiny_flux2":  # Flux2Pipeline returns its latents as they are: packed, normalised
        from diffusion_dpo.models.flux2 import pack

        torch.testing.assert_close(stepped, pack(ours), rtol=1e-5, atol=1e-5)
        return
    scale = c.latent_scale
    shift, scaling = (torch.tensor(v).view(1, -1, 1, 1).float() for v in (scale.shift, scale.scaling))
    torch.testing.assert_close(stepped, Flux2KleinPipeline._unpatchify_latents(ours / scaling + shift), rtol=1e-5,
                               atol=1e-5)


def test_qwenimage_conditioning_equals_the_pipelines_encode_prompt(tiny_qwenimage):
    """Qwen2.5-VL's last hidden state at the prompt's tokens after the template's first 34, at most
    max_sequence_length of them, zero-padded to the batch's longest with the mask the transformer applies (None
    when none is padded): QwenImagePipeline.encode_prompt's, for [winners; losers]."""
    from diffusers import QwenImagePipeline

    c = load_components(ModelConfig(pretrained=str(tiny_qwenimage), max_sequence_length=256))
    cond = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS)), None, None, 32)
    pipe = c.build_pipeline(c.denoiser)
    assert isinstance(pipe, QwenImagePipeline)
    embeds, mask = pipe.encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=256)
    assert mask is not None and len(set(mask.sum(1).tolist())) == 2  # the prompts have their own lengths
    torch.testing.assert_close(cond.hidden_states, embeds.repeat(2, 1, 1))
    assert torch.equal(cond.mask, mask.repeat(2, 1))
    same = c.conditioning(c.encode_prompt(c.tokenizer(PROMPTS[:1])), None, None, 32)
    assert same.mask is None  # one prompt: nothing padded, as the pipeline passes no mask


def test_qwenimage_predicts_the_velocity_its_pipeline_steps_with(tiny_qwenimage):
    """One sampling step from sigma = 1 to 0 is x - v(x, 1), in the packed tokens QwenImagePipeline returns as
    latents: predict() (packing, img_shapes, timestep sigma, the mask) is the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    c = load_components(ModelConfig(pretrained=str(tiny_qwenimage), max_sequence_length=256))
    assert c.latent_shape(32) == c.posterior_shape(32) == (4, 16, 16)
    pipe = c.build_pipeline(c.denoiser, FlowMatchEulerDiscreteScheduler(shift=1.0))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stepped = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=1, latents=pack(noise),
                       output_type="latent", max_sequence_length=256).images
        cond = c.conditioning(c.encode_prompt(c.tokenizer(["a red circle"])), torch.zeros(1, 1, 2), None, 32)
        ours = noise - c.predict(c.denoiser, noise, torch.ones(1), cond)
    torch.testing.assert_close(stepped, pack(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_swapping_winner_and_loser_negates_inside(request, family):
    """At theta = ref the margin is 0; with the policy moved, the same pair in the other order has the opposite
    margin: conditioning, timestep and noise are paired per pair, never per position."""
    # a chat template takes ~20 of the byte-level tokens; Qwen-Image's system prompt, kept after its first 34, ~130
    length = {"zimage": 64, "flux2-klein": 64, "flux2": 64, "qwenimage": 256}.get(family, 8)
    c = load_components(ModelConfig(pretrained=str(tiny_family(request, family)), max_sequence_length=length))
    ref = load_components(ModelConfig(pretrained=str(tiny_family(request, family)), max_sequence_length=length))
    with torch.no_grad():
        for p in c.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = 2
    enc = c.encode_prompt(c.tokenizer(PROMPTS))
    draws = pair_noise([5, 6], c.draw_timestep, c.latent_shape(32), "cpu")
    winners, losers = torch.randn(b, *c.latent_shape(32)), torch.randn(b, *c.latent_shape(32))

    def inside(first, second):
        noisy, target = c.noisy_and_target(torch.cat([first, second]), draws.noise, draws.timesteps)
        cond = c.conditioning(enc, None, None, 32)
        with torch.no_grad():
            m, r = (c.mse(model, noisy, draws.timesteps, cond, target) for model in (c.denoiser, ref.denoiser))
        return dpo_loss(m[:b], m[b:], r[:b], r[b:], beta=100.0).inside

    forward, swapped = inside(winners, losers), inside(losers, winners)
    assert bool((forward.abs() > 1e-3).all())
    torch.testing.assert_close(swapped, -forward, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for p, q in zip(c.denoiser.parameters(), ref.denoiser.parameters()):
            p.copy_(q)
    assert inside(winners, losers).abs().max() == 0  # theta = ref: exactly zero, so the loss is log 2


def _edited_copy(src, tmp_path, edit):
    out = tmp_path / "model"
    shutil.copytree(src, out)
    index = json.loads((out / "model_index.json").read_text())
    edit(index)
    (out / "model_index.json").write_text(json.dumps(index))
    return str(out)


def test_refusals_are_one_line(tiny_sd3, tiny_flux, tiny_flux_schnell, tiny_flux2_klein, tmp_path):
    def error(**model) -> str:
        with pytest.raises(UserError) as exc:
            load_components(ModelConfig(**model))
        assert "\n" not in str(exc.value)
        return str(exc.value)

    other = _edited_copy(tiny_sd3, tmp_path / "a", lambda ix: ix.update(_class_name="PixArtSigmaPipeline"))
    assert "does not describe a supported model family (its _class_name is 'PixArtSigmaPipeline'" in \
        error(pretrained=other)
    no_t5 = _edited_copy(tiny_flux, tmp_path / "b", lambda ix: ix.update(text_encoder_2=[None, None]))
    assert "is a FLUX model without its T5 encoder" in error(pretrained=no_t5)
    assert "FLUX.1 cannot run without its T5" in error(pretrained=str(tiny_flux), t5=False)
    assert "at most 512 text tokens" in error(pretrained=str(tiny_flux), max_sequence_length=513)
    # SD3 too, before training (its pipeline refuses more at the first grid or `generate`: issue 37, defect 6)
    assert "Stable Diffusion 3 / 3.5's pipeline takes at most 512 text tokens" in \
        error(pretrained=str(tiny_sd3), max_sequence_length=513)
    assert "has no guidance embedding" in error(pretrained=str(tiny_flux_schnell), guidance=3.5)
    assert "it is not a guidance-distilled FLUX.2 [klein]" in error(pretrained=str(tiny_flux2_klein), guidance=4.0,
                                                                    max_sequence_length=64)
    sd3_no_t5 = _edited_copy(tiny_sd3, tmp_path / "c", lambda ix: ix.update(text_encoder_3=[None, None],
                                                                             tokenizer_3=[None, None]))
    assert "set model.t5 false" in error(pretrained=sd3_no_t5)
    assert load_components(ModelConfig(pretrained=sd3_no_t5, t5=False), denoiser=False).tokenizer.lengths == (16, 16)
    flux = load_components(ModelConfig(pretrained=str(tiny_flux)), denoiser=False, encoders=False)
    flux.vae_config = {**flux.vae_config, "block_out_channels": [1, 2, 3, 4]}  # a real FLUX VAE: downsampling 8
    with pytest.raises(UserError, match="data.resolution 504: FLUX.1 needs a multiple of 16"):
        flux.latent_shape(504)
    assert flux.latent_shape(512) == (16, 64, 64)


def test_sd3_default_lora_targets_leave_the_dual_attention_blocks_attn2_alone():
    """SD3.5-medium's dual-attention blocks hold a second self-attention, attn2; the default targets are each block's
    attn projections only, as flow_grpo and diffusers' SD3 script adapt (issue 37, defect 1: bare names adapted attn2
    too, 243 linears instead of 191 = 24 blocks x 8 - 1 in SD3.5-medium). Here 3 blocks, the first two dual."""
    from diffusers import SD3Transformer2DModel
    from peft.tuners.lora import LoraLayer

    from diffusion_dpo.config import LoraConfig
    from diffusion_dpo.models.lora import add_lora
    from diffusion_dpo.models.sd3 import StableDiffusion3

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
                                  dual_attention_layers=(0, 1), qk_norm="rms_norm")
    assert sum(".attn2." in n for n, _ in model.named_modules()) > 0
    add_lora(model, LoraConfig(rank=4), StableDiffusion3.default_lora_targets)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert not any(".attn2." in n for n in adapted)
    assert len(adapted) == 3 * 8 - 1  # the last block feeds no text stream onward: no to_add_out


def test_the_new_families_refuse_bad_input_in_one_line(tiny_zimage, tiny_flux2_klein, tiny_qwenimage, tmp_path):
    """Before any work: a checkpoint missing a component, a LoRA of another family, a cache of another family."""
    from dataclasses import replace

    from diffusion_dpo.cache.build import build_cache
    from diffusion_dpo.cache.store import Cache
    from diffusion_dpo.config import CacheConfig, DataConfig, FlowConfig, LoraConfig
    from diffusion_dpo.evaluation.generate import generate
    from diffusion_dpo.models import add_lora
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    broken = tmp_path / "zimage"
    shutil.copytree(tiny_zimage, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(UserError, match=r"missing component folder\(s\) text_encoder/"):
        load_components(ModelConfig(pretrained=str(broken)))

    z = load_components(ModelConfig(pretrained=str(tiny_zimage), max_sequence_length=64))
    add_lora(z.denoiser, LoraConfig(rank=4), z.default_lora_targets)
    z.save_lora(z.denoiser, tmp_path / "z_lora")
    with pytest.raises(UserError, match="z_lora': cannot load into this model: Target modules .* not found") as exc:
        generate(str(tiny_flux2_klein), ["a red circle"], [0], tmp_path / "x", lora=str(tmp_path / "z_lora"),
                 height=32, width=32, steps=1, max_sequence_length=64)
    assert "\n" not in str(exc.value)

    data = build_tiny_pickapic(tmp_path / "data", num_pairs=6)
    cfg = DataConfig(path=str(data), resolution=32, num_workers=0)
    cache = CacheConfig(dir=str(tmp_path / "cache"), shard_pairs=4, batch_size=4)
    zimage = ModelConfig(pretrained=str(tiny_zimage), max_sequence_length=64)
    build_cache(zimage, cfg, cache, FlowConfig())
    with pytest.raises(UserError, match="was made with model family = 'zimage', this run has 'qwenimage'"):
        Cache.open(replace(zimage, pretrained=str(tiny_qwenimage)), cfg, cache, "no")
