"""Continuing a run's weights and choosing its reference (what `iterate`'s rounds are made of):
`lora.init_from` puts earlier adapters back exactly and trains against them; `model.reference` makes another
pipeline's denoiser the reference; the precomputed reference follows both; wrong inputs end in one line."""

import math

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from diffusion_dpo.errors import UserError
from diffusion_dpo.training import Trainer, train
from test_training import make_cfg, read_metrics

FAST = {"sd": {}, "flux": dict(model__max_sequence_length=8)}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16, seed=3)


def _adapter(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.denoiser)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lora_init_from_restores_the_adapters_and_trains_against_them(request, tmp_path, tiny_data, family):
    model = request.getfixturevalue(f"tiny_{family}")
    first = Trainer(make_cfg(tmp_path / "a", model, tiny_data, lora__rank=4, optim__lr=1e-2, **FAST[family]))
    final = first.run()
    trained = _adapter(first)
    # starting from the exported file gives back the very weights (diffusers' naming and back, for the UNet)
    second = Trainer(make_cfg(tmp_path / "b", model, tiny_data, lora__rank=4, lora__init_from=final,
                              train__max_steps=1, **FAST[family]))
    restored = _adapter(second)
    assert restored.keys() == trained.keys() and all(torch.equal(restored[k], trained[k]) for k in trained)
    second.run()
    # the reference is the starting point (the frozen copy of the adapters): exactly log 2 at step 1
    assert read_metrics(tmp_path / "b")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # ... and with model.reference = the base, the adapters are off in the reference: the margin is not 0
    third = make_cfg(tmp_path / "c", model, tiny_data, lora__rank=4, lora__init_from=final, train__max_steps=1,
                     model__reference=model, **FAST[family])
    train(third)
    assert abs(read_metrics(tmp_path / "c")[0]["loss"] - math.log(2)) > 1e-4


def test_lora_init_from_continues_the_adapters_at_their_saved_alpha(tmp_path, tiny_sd, tiny_data):
    """Adapters trained at alpha 8, rank 4 (scale 2): a continuation with lora.alpha unset applies them at scale 2,
    as the saved model (and diffusers' load_lora_weights) does, in the policy and in its frozen reference; another
    lora.alpha is refused in one line (issue 37, defect 7: it was used silently, continuing another model)."""
    from peft.tuners.lora import LoraLayer

    final = train(make_cfg(tmp_path / "a", tiny_sd, tiny_data, lora__rank=4, lora__alpha=8, optim__lr=1e-2))
    trainer = Trainer(make_cfg(tmp_path / "b", tiny_sd, tiny_data, lora__rank=4, lora__init_from=final,
                               train__max_steps=1))
    assert trainer.cfg.lora.alpha == 8
    layers = [m for m in trainer.accelerator.unwrap_model(trainer.denoiser).modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == m.scaling["reference"] == 2.0 for m in layers)
    with pytest.raises(UserError, match="lora.alpha 4: the adapters in lora.init_from .* were trained with alpha 8"):
        Trainer(make_cfg(tmp_path / "c", tiny_sd, tiny_data, lora__rank=4, lora__alpha=4, lora__init_from=final))


def test_model_reference_is_another_pipelines_denoiser(tmp_path, tiny_sd, tiny_data):
    tuned = train(make_cfg(tmp_path / "a", tiny_sd, tiny_data, optim__lr=1e-2))
    # round 2 with the base as reference sees the base's errors, exactly those of a run that trains the base
    train(make_cfg(tmp_path / "b", tuned, tiny_data, model__reference=tiny_sd, train__seed=5, train__max_steps=1))
    train(make_cfg(tmp_path / "c", tiny_sd, tiny_data, train__seed=5, train__max_steps=1))
    b, c = read_metrics(tmp_path / "b")[0], read_metrics(tmp_path / "c")[0]
    assert (b["ref_mse_w"], b["ref_mse_l"]) == (c["ref_mse_w"], c["ref_mse_l"])
    assert abs(b["loss"] - math.log(2)) > 1e-4  # the policy is not the reference
    # without model.reference, the reference is the tuned start itself
    train(make_cfg(tmp_path / "d", tuned, tiny_data, train__seed=5, train__max_steps=1))
    assert read_metrics(tmp_path / "d")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("how", ["init_from", "reference"])
def test_precomputed_reference_follows_the_reference_settings(tmp_path, tiny_sd, tiny_data, how):
    lora = train(make_cfg(tmp_path / "a", tiny_sd, tiny_data, lora__rank=4, optim__lr=1e-2))
    full = train(make_cfg(tmp_path / "f", tiny_sd, tiny_data, optim__lr=1e-2))
    extra = dict(lora__rank=4, lora__init_from=lora) if how == "init_from" else \
        dict(model__pretrained=full, model__reference=tiny_sd)
    live = make_cfg(tmp_path / "live", tiny_sd, tiny_data, train__max_steps=3, **extra)
    train(live)
    pre = make_cfg(tmp_path / "pre", tiny_sd, tiny_data, train__max_steps=3, cache__dir=tmp_path / "cache",
                   cache__auto=True, cache__reference="precomputed", **extra)
    train(pre)
    cached = make_cfg(tmp_path / "cached", tiny_sd, tiny_data, train__max_steps=3, cache__dir=tmp_path / "cache",
                      **extra)
    train(cached)
    # the errors agree to float noise (a few ulps of ~1.1); the loss amplifies their differences by beta / 2 = 2500
    # (|d loss / d inside| <= 1), so 4 errors off by 2 ulps (2.4e-7 each) may move it by up to 2500 * 9.6e-7 = 2.4e-3
    for a, b in zip(read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "pre")):
        for key in ("ref_mse_w", "ref_mse_l", "model_mse_w", "model_mse_l"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert b["loss"] == pytest.approx(a["loss"], abs=2.4e-3)
    # the file records what the reference was made of: another start is refused, not silently reused
    other = make_cfg(tmp_path / "other", tiny_sd, tiny_data, train__max_steps=3, cache__dir=tmp_path / "cache",
                     cache__reference="precomputed",
                     **({"lora__rank": 4} if how == "init_from" else {"model__pretrained": full}))
    with pytest.raises(UserError, match="init_from" if how == "init_from" else "model.reference"):
        train(other)


def test_wrong_continuations_end_in_one_line(tmp_path, tiny_sd, tiny_flux, tiny_data):
    flux_lora = train(make_cfg(tmp_path / "fl", tiny_flux, tiny_data, lora__rank=4, train__max_steps=1,
                               model__max_sequence_length=8))
    with pytest.raises(UserError, match="holds no unet weights.*another model family"):
        Trainer(make_cfg(tmp_path / "x", tiny_sd, tiny_data, lora__rank=4, lora__init_from=flux_lora))
    sd_lora = train(make_cfg(tmp_path / "sl", tiny_sd, tiny_data, lora__rank=4, train__max_steps=1))
    with pytest.raises(UserError, match="do not fit lora.rank"):
        Trainer(make_cfg(tmp_path / "y", tiny_sd, tiny_data, lora__rank=8, lora__init_from=sd_lora))
    with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors"):
        Trainer(make_cfg(tmp_path / "z", tiny_sd, tiny_data, lora__rank=4, lora__init_from=tmp_path))
    with pytest.raises(UserError, match="lora.init_from.*needs lora.rank > 0"):
        Trainer(make_cfg(tmp_path / "w", tiny_sd, tiny_data, lora__init_from=sd_lora))
    with pytest.raises(UserError, match="model.reference .* is a FLUX"):
        Trainer(make_cfg(tmp_path / "v", tiny_sd, tiny_data, model__reference=tiny_flux))
