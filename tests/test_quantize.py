"""A frozen base in fewer bits for LoRA runs (model.quantize_base): which layers, what trains, what is saved, and the
reference and its precomputed errors on the same quantized base."""

import math

import pytest
import torch
from safetensors import safe_open

from diffusion_dpo.errors import UserError
from diffusion_dpo.models import load_components
from diffusion_dpo.config import ModelConfig
from diffusion_dpo.models.quantize import block_linears, quantize_base, stored_bytes
from diffusion_dpo.training import Trainer, train
from test_training import make_cfg, read_metrics

FAST = dict(model__max_sequence_length=64, lora__rank=4, lora__alpha=8, optim__lr="1e-2")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16, seed=3)


def test_only_the_block_linears_are_quantized(tiny_flux2_klein):
    """Inside the double and single block lists (attention, feed-forwards, the fused QKV+MLP input); the patch and
    text embeddings, the time embedder, the modulations and the output projection stay as they are."""
    import bitsandbytes as bnb

    model = load_components(ModelConfig(pretrained=str(tiny_flux2_klein), max_sequence_length=64),
                            encoders=False).denoiser
    names = block_linears(model)
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in names
    assert "transformer_blocks.0.ff.linear_in" in names and "transformer_blocks.0.attn.to_out.0" in names
    assert not any(n.startswith(("x_embedder", "context_embedder", "proj_out", "time_guidance_embed", "norm_out",
                                 "double_stream_modulation", "single_stream_modulation")) for n in names)
    before, total = sum(stored_bytes(model.get_submodule(n)) for n in names), stored_bytes(model)
    assert quantize_base(model, "int8", torch.float32) == len(names)
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear8bitLt) for n in names)
    assert isinstance(model.x_embedder, torch.nn.Linear) and model.x_embedder.weight.dtype == torch.float32
    # int8: a byte a weight for float32's 4, plus a float32 scale per output row (and the biases, kept)
    after = sum(stored_bytes(model.get_submodule(n)) for n in names)
    assert 0.25 * before < after < 0.35 * before and stored_bytes(model) == total - before + after


@pytest.mark.parametrize("how,precision", [("int8", "no"), ("nf4", "bf16")])
def test_a_lora_run_on_a_quantized_base_trains_the_adapters_only_and_saves_a_loadable_lora(
        tmp_path, tiny_flux2_klein, tiny_data, how, precision):
    """Step 1 is log 2 (policy and reference share the quantized base, the adapters start at zero), training moves
    only the adapters, and the saved LoRA loads into the family's unquantized pipeline with load_lora_weights."""
    import bitsandbytes as bnb
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "run"
    trainer = Trainer(make_cfg(out, tiny_flux2_klein, tiny_data, model__quantize_base=how,
                               train__mixed_precision=precision, train__max_steps=3, **FAST))
    model = trainer.accelerator.unwrap_model(trainer.denoiser)
    kind = bnb.nn.Linear8bitLt if how == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.transformer_blocks[0].attn.to_q.base_layer, kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    final = trainer.run()
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4) and all(math.isfinite(m["loss"]) for m in metrics)
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    with safe_open(str(final / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert any("to_qkv_mlp_proj" in k for k in f.keys())
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein)
    pipe.load_lora_weights(final)
    image = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=64).images[0]
    assert image.size == (32, 32)


def test_a_quantized_run_resumes_bitwise(tmp_path, tiny_flux2_klein, tiny_data):
    from safetensors.torch import load_file

    from test_training import straight_and_resumed

    straight, resumed = straight_and_resumed(tmp_path, tiny_flux2_klein, tiny_data, model__quantize_base="int8",
                                             train__max_steps=4, train__checkpointing_steps=2, **FAST)
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_errors_on_the_quantized_base_equal_the_live_ones(tmp_path, tiny_flux2_klein,
                                                                                 tiny_data):
    """The precomputed errors come from the same quantized base (adapters off) as the live reference; a table made
    without the quantization is refused in one line."""
    common = dict(FAST, cache__dir=tmp_path / "cache", cache__auto="true", train__max_steps=3, optim__lr="1e-3")
    train(make_cfg(tmp_path / "live", tiny_flux2_klein, tiny_data, model__quantize_base="int8", **common))
    train(make_cfg(tmp_path / "pre", tiny_flux2_klein, tiny_data, model__quantize_base="int8",
                   cache__reference="precomputed", **common))
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for key in ("ref_mse_w", "ref_mse_l", "loss"):
        assert [m[key] for m in live] == pytest.approx([m[key] for m in pre], rel=1e-5, abs=1e-7), key
    with pytest.raises(UserError, match="model.quantize_base") as exc:
        Trainer(make_cfg(tmp_path / "other", tiny_flux2_klein, tiny_data, cache__reference="precomputed",
                         **{**common, "cache__auto": "false"}))
    assert "\n" not in str(exc.value)


def test_fp8_needs_torchao_and_trains_where_it_is_installed(tmp_path, tiny_flux2_klein, tiny_data):
    pytest.importorskip("torchao")
    train(make_cfg(tmp_path / "run", tiny_flux2_klein, tiny_data, model__quantize_base="fp8",
                   train__mixed_precision="bf16", **FAST))
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_bad_settings_are_refused_in_one_line(tmp_path, tiny_flux2_klein, tiny_data):
    for overrides, message in (({"model__quantize_base": "int4"}, "model.quantize_base must be one of"),
                               ({"model__quantize_base": "int8", "lora__rank": "0"}, "needs lora.rank > 0")):
        with pytest.raises(UserError, match=message) as exc:
            make_cfg(tmp_path, tiny_flux2_klein, tiny_data, **{**FAST, **overrides})
        assert "\n" not in str(exc.value)
