"""Training SD3 and FLUX end to end on tiny pipelines: log 2 at step 1, outputs the diffusers pipelines load
(full: from_pretrained; LoRA: load_lora_weights), a learnt preference, exact resume, SD3 without T5."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FLOW_FAMILIES, tiny_family
from diffusion_dpo.models import FAMILIES
from diffusion_dpo.training import Trainer, train
from test_training import make_cfg, read_metrics, straight_and_resumed

# the tiny T5 at 8 tokens: the same code, a shorter joint attention; Z-Image's chat template alone is ~20 tokens
LENGTH = {"sd3": 8, "flux": 8, "zimage": 64, "flux2-klein": 64, "flux2": 64, "qwenimage": 256}
TEXT_PARTS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "flux": ("text_encoder", "text_encoder_2"),
              "zimage": ("text_encoder",), "flux2-klein": ("text_encoder",), "flux2": ("text_encoder",),
              "qwenimage": ("text_encoder",)}
# a weight of the LoRA file from each kind of layer the family adapts by default
LORA_KEYS = {"sd3": (".to_q.", "add_q_proj"), "flux": (".to_q.", "add_q_proj"),
             "zimage": ("attention.to_q.", "feed_forward.w1."), "flux2-klein": ("attn.to_q.", "to_qkv_mlp_proj"),
             "flux2": ("attn.to_q.", "ff.linear_in", "to_qkv_mlp_proj"),
             "qwenimage": ("attn.add_q_proj", "img_mlp.net.0.proj", "txt_mlp.net.2")}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=24, seed=1)


def _model(request, family):
    """The family's tiny pipeline directory and its diffusers pipeline class."""
    import diffusers

    pipeline = next(f for f in FAMILIES if f.name == family).pipelines[0]
    return tiny_family(request, family), getattr(diffusers, pipeline)


def _load(pipeline_class, path):
    """`from_pretrained`, a processor slot (FLUX.2 [dev]'s PixtralProcessor, which needs torchvision) given as its
    tokenizer, as `generate` loads it."""
    from diffusion_dpo.models.components import load_pipeline_class

    return load_pipeline_class(pipeline_class, str(path), json.loads((Path(path) / "model_index.json").read_text()))


def _fast(family):
    return dict(model__max_sequence_length=LENGTH[family])


def _sample(pipe, seed=0, length=8):
    """One 32 px image (2 steps) as a float tensor (H, W, 3)."""
    image = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(seed), max_sequence_length=length).images[0]
    return torch.tensor(np.array(image), dtype=torch.float32)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_full_fine_tune_outputs_load_in_the_family_pipeline(request, tmp_path, tiny_data, family):
    model, pipeline_class = _model(request, family)
    out = tmp_path / "run"
    final = train(make_cfg(out, model, tiny_data, train__max_steps=3, train__checkpointing_steps=2,
                           validation__every_steps=0, validation__num_inference_steps=2,
                           validation__prompts='["a red circle"]', **_fast(family)))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics[0]["implicit_acc"] == 0.5
    assert metrics[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "grad_norm", "model_mse_w", "ref_mse_l"))
    assert (out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "samples" / "step-000003.png").is_file()
    pipe, base = _load(pipeline_class, final), _load(pipeline_class, model)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(),
                                                     base.transformer.state_dict().values()))
    for part in ("vae",) + TEXT_PARTS[family]:
        for a, b in zip(getattr(pipe, part).state_dict().values(), getattr(base, part).state_dict().values()):
            assert torch.equal(a, b), part
    assert _sample(pipe, length=LENGTH[family]).shape == (32, 32, 3)
    # final/ names the classes its base did (FLUX.2 [dev]'s PixtralProcessor folder kept as it was)
    assert json.loads((final / "model_index.json").read_text())["tokenizer"] == \
        json.loads((model / "model_index.json").read_text())["tokenizer"]


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_lora_loads_with_load_lora_weights_and_changes_samples(request, tmp_path, tiny_data, family):
    model, pipeline_class = _model(request, family)
    trainer = Trainer(make_cfg(tmp_path / "run", model, tiny_data, lora__rank=4, lora__alpha=8, optim__lr="1e-2",
                               train__max_steps=3, **_fast(family)))
    before = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters()}
    final = trainer.run()
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    after = dict(trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora" in n for n in changed)
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]  # + the card
    with safe_open(str(final / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") for k in keys)
    assert all(any(part in k for k in keys) for part in LORA_KEYS[family])  # e.g. the joint attention included
    pipe = _load(pipeline_class, model)
    base = _sample(pipe, length=LENGTH[family])
    pipe.load_lora_weights(final)
    assert not torch.equal(_sample(pipe, length=LENGTH[family]), base)
    # every adapter came back, scale included: the loaded transformer predicts what the trained one does
    family = trainer.components
    cond = family.conditioning(family.encode_prompt(family.tokenizer(["a red circle"])), torch.zeros(1, 2, 2), None,
                               32)  # (B, G, 2) sizes: two images, as noisy holds
    noisy = torch.randn(2, *family.latent_shape(32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.4, 0.4])
    with torch.no_grad():
        trained = family.predict(trainer.accelerator.unwrap_model(trainer.denoiser), noisy, sigma, cond)
        torch.testing.assert_close(family.predict(pipe.transformer, noisy, sigma, cond), trained, rtol=1e-4,
                                   atol=1e-5)


# full fine-tune (0) or a LoRA rank per family, so that both are covered; FLUX.2 [dev] shares klein's transformer
# inputs (models/flux2.py): klein's run stands for both here (None: not run)
LEARNS = {"sd3": 0, "flux": 8, "zimage": 4, "flux2-klein": 0, "flux2": None, "qwenimage": 4}
RESUMES = {"sd3": 0, "flux": 4, "zimage": 0, "flux2-klein": 4, "flux2": 0, "qwenimage": 0}


@pytest.mark.parametrize("family,rank", [(f, LEARNS[f]) for f in FLOW_FAMILIES if LEARNS[f] is not None])
def test_a_flow_model_learns_a_preference(request, tmp_path, tiny_data, family, rank):
    """Same 4 pairs, same sigma and noise every step: Flow-DPO drives the implicit accuracy to 1."""
    model, _ = _model(request, family)
    trainer = Trainer(make_cfg(tmp_path, model, tiny_data, data__batch_size=4, data__max_pairs=4,
                               data__random_flip="false", data__proportion_empty_prompts=0, lora__rank=rank,
                               optim__lr="1e-4" if rank == 0 else "1e-3", **_fast(family)))
    _, batch = next(trainer.batches())
    history = []
    for _ in range(25):
        out = trainer.step(batch, micro_step=0)
        trainer.accelerator.backward(out.loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        history.append({k: v.item() for k, v in out.metrics.items()})
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = history[-1]
    assert last["implicit_acc"] == 1.0 and last["loss"] < 0.1 * math.log(2) and last["reward_margin"] > 0
    assert (last["model_mse_w"] - last["model_mse_l"]) < (last["ref_mse_w"] - last["ref_mse_l"])


@pytest.mark.parametrize("family,rank", [(f, RESUMES[f]) for f in FLOW_FAMILIES])
def test_resume_is_bitwise_equal(request, tmp_path, tiny_data, family, rank):
    model, _ = _model(request, family)
    common = dict(train__max_steps=5, train__checkpointing_steps=2, lora__rank=rank, data__batch_size=3,
                  data__proportion_empty_prompts=0.5, **_fast(family))
    straight, resumed = straight_and_resumed(tmp_path, model, tiny_data, **common)
    name = "pytorch_lora_weights.safetensors" if rank else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


def test_sd3_without_t5_trains_and_caches_without_it(tmp_path, tiny_sd3, tiny_data):
    """model.t5 false: zeros in T5's place (as the pipeline without text_encoder_3), no T5 loaded or cached; the
    validation grid samples without it; final/ keeps the base's T5 so that from_pretrained loads it, and loads
    without it as the model was trained."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    trainer = Trainer(make_cfg(out, tiny_sd3, tiny_data, model__t5="false", cache__dir=tmp_path / "cache",
                               cache__auto="true", train__max_steps=2, validation__every_steps=0,
                               validation__num_inference_steps=2, validation__prompts='["a red circle"]', **_fast("sd3")))
    assert trainer.components.tokenizer.lengths == (16, 16)  # no T5 tokens
    with safe_open(str(tmp_path / "cache" / "text-00000.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip", "pooled"]
    final = trainer.run()
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "samples" / "step-000002.png").is_file()
    assert StableDiffusion3Pipeline.from_pretrained(final).text_encoder_3 is not None
    pipe = StableDiffusion3Pipeline.from_pretrained(final, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and _sample(pipe).shape == (32, 32, 3)
