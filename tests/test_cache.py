"""The pre-encoding cache and the precomputed reference: exactness against the on-the-fly run, no frozen
encoders in training, refusals of mismatched caches as one line, resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffusion_dpo.cache import build_cache
from diffusion_dpo.cli import main
from diffusion_dpo.errors import UserError
from diffusion_dpo.training import Trainer, train
from test_training import _Killed, _KilledAfter, make_cfg, read_metrics, unet_weights

# Flip on and half the captions dropped: both the flipped encodings and the empty-prompt row are exercised.
COMMON = dict(data__random_flip="true", data__proportion_empty_prompts="0.5", data__batch_size=3,
              train__max_steps=3, cache__shard_pairs=5, cache__batch_size=4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=14, seed=3)


@pytest.fixture(scope="module")
def sd_cache(tmp_path_factory, tiny_sd, tiny_data):
    out = tmp_path_factory.mktemp("cache")
    return build_cache(make_cfg(out / "run", tiny_sd, tiny_data, cache__dir=out / "sd", **COMMON))


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


def test_cached_items_equal_encoding_on_the_fly(tmp_path, tiny_sdxl, tiny_data):
    """Same keys, same draws: the cached posterior, caption encoding (or the empty prompt) and SDXL time ids are
    those the uncached path computes, in both orientations."""
    from diffusion_dpo.cache import Cache, CachedPairs, cached_inputs
    from diffusion_dpo.data import PreferenceDataset, collate_pairs, load_preference_pairs
    from diffusion_dpo.models import load_components
    from diffusion_dpo.randomness import item_draws, pair_noise

    cfg = make_cfg(tmp_path / "run", tiny_sdxl, tiny_data, cache__dir=tmp_path / "cache", **COMMON)
    build_cache(cfg)
    comp = load_components(cfg.model)
    plain = PreferenceDataset(load_preference_pairs(cfg.data), cfg.data, comp.tokenizers, sdxl=True)
    cached = CachedPairs(Cache.open(cfg), cfg.data.random_flip, cfg.data.proportion_empty_prompts)
    keys = [(i, 1000 + i) for i in range(len(cached))]
    draws = [item_draws(s, True, False, 0.5) for _, s in keys]
    assert {d.flip for d in draws} == {True, False} and {d.empty_prompt for d in draws} == {True, False}
    a, b = collate_pairs([plain[k] for k in keys]), collate_pairs([cached[k] for k in keys])
    eps = pair_noise(a["sample_seed"].tolist(), 1000, comp.latent_shape(32), "cpu").posterior
    pixels = torch.cat([a["pixel_values"][:, 0], a["pixel_values"][:, 1]])
    expected = comp.encode_images(pixels, eps)
    cond = comp.conditioning([a["input_ids"], a["input_ids_2"]], a["original_sizes"], a["crop_top_lefts"], 32)
    latents, cached_cond = cached_inputs(b, eps, comp.latent_scale, 32, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_cond.hidden_states, cond.hidden_states, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_cond.added["text_embeds"], cond.added["text_embeds"], rtol=1e-5, atol=1e-6)
    assert torch.equal(cached_cond.added["time_ids"], cond.added["time_ids"])
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["sample_seed"], b["sample_seed"])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cached_run_equals_uncached_run(tmp_path, request, tiny_data, kind):
    model = request.getfixturevalue("tiny_sd" if kind == "sd" else "tiny_sdxl")
    # eps = 1 makes Adam ~ SGD with momentum: plain Adam would turn float noise in near-zero gradients into
    # +-lr updates, and beta = 5000 amplifies what is left; this compares the inputs, not Adam.
    common = dict(COMMON, train__max_steps=2, optim__lr="0.1", optim__adam_epsilon="1.0", optim__weight_decay="0")
    train(make_cfg(tmp_path / "plain", model, tiny_data, **common))
    cached = Trainer(make_cfg(tmp_path / "cached", model, tiny_data, cache__dir=tmp_path / "cache",
                              cache__auto="true", **common))
    # the frozen encoders are never loaded: nothing to encode with, and no parameters of theirs in memory
    assert cached.components.vae is None and cached.components.text_encoders == []
    cached.run()
    plain, from_cache = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached")
    assert plain[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # training moved
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert [m[key] for m in plain] == pytest.approx([m[key] for m in from_cache], rel=1e-5), key
    # beta = 5000 turns ~1e-7 relative float noise in the errors into ~1e-4 in the loss (measured: 1e-4)
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in from_cache], abs=1e-3)


@pytest.mark.parametrize("rank", [0, 4])
def test_precomputed_reference_equals_live_reference(tmp_path, tiny_sd, tiny_data, sd_cache, rank, monkeypatch):
    """The reference errors computed ahead (other batches, no training) give the live run's losses; training
    then holds no reference copy (full) and never switches the adapters off (LoRA)."""
    common = dict(COMMON, cache__dir=sd_cache, lora__rank=rank, optim__lr="0.1" if rank == 0 else "1.0",
                  optim__adam_epsilon="1.0", optim__weight_decay="0", train__max_steps=2,
                  cache__reference_file=tmp_path / "ref.safetensors")
    train(make_cfg(tmp_path / "live", tiny_sd, tiny_data, **common))
    cfg = make_cfg(tmp_path / "pre", tiny_sd, tiny_data, cache__reference="precomputed", cache__auto="true", **common)
    trainer = Trainer(cfg)
    assert (tmp_path / "ref.safetensors").is_file()
    if rank:
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        monkeypatch.setattr(unet, "disable_adapters", lambda: pytest.fail("adapters-off forward with precomputed"))
    else:
        assert trainer.reference is None  # no frozen copy of the UNet in memory
    trainer.run()
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for key in ("ref_mse_w", "ref_mse_l", "model_mse_w", "model_mse_l"):
        assert [m[key] for m in live] == pytest.approx([m[key] for m in pre], rel=1e-5), key
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in pre], abs=1e-3)
    assert live[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)
