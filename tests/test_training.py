"""The training loop on tiny SD/SDXL pipelines: invariants, outputs diffusers loads, LoRA, overfit, resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALL_FAMILIES, tiny_family
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import UserError
from diffusion_dpo.training import Trainer, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=24, seed=1)


def make_cfg(out: Path, model: Path, data: Path, **overrides):
    base = {"output_dir": str(out), "model.pretrained": str(model), "data.path": str(data),
            "data.resolution": "32", "data.batch_size": "2", "data.num_workers": "0",
            "optim.lr": "1e-4", "optim.scale_lr": "false", "optim.lr_warmup_steps": "0",
            "train.max_steps": "2", "train.checkpointing_steps": "0", "train.report_to": "none",
            "validation.every_steps": "-1"}
    base.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return load_config(None, base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_full_fine_tune_outputs(tmp_path, tiny_sd, tiny_data):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    cfg = make_cfg(out, tiny_sd, tiny_data, train__max_steps=3, train__checkpointing_steps=2,
                   validation__every_steps=2, validation__num_inference_steps=2, validation__prompts='["a red circle"]',
                   train__report_to="tensorboard", train__tracker_project="my-project")
    final = train(cfg)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # θ = ref at step 1
    assert metrics[0]["implicit_acc"] == 0.5 and metrics[0]["reward_margin"] == 0.0
    for key in ("loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l",
                "grad_norm", "lr", "pairs_per_s"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert metrics[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the policy moved
    assert (out / "checkpoint-2" / "unet").is_dir() and (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert not list(out.glob("*.tmp"))
    assert (out / "samples" / "step-000002.png").is_file() and (out / "samples" / "step-000003.png").is_file()
    events = list((out / "logs" / "my-project").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    assert {"loss", "implicit_acc"} <= set(logged.Tags()["scalars"])
    grids = logged.Images("validation/reference_vs_policy")  # the grids reach the tracker as images
    assert [g.step for g in grids] == [2, 3] and grids[0].width > 0
    assert (out / "config.yaml").is_file()
    # final/ is a pipeline diffusers loads; only the UNet changed
    pipe = StableDiffusionPipeline.from_pretrained(final)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), base.unet.state_dict().values()))
    for a, b in zip(pipe.text_encoder.state_dict().values(), base.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(pipe.vae.state_dict().values(), base.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    # final/README.md: a model card the hub reads, with what was trained and the last grid beside it
    from huggingface_hub import ModelCard

    card = ModelCard.load(final / "README.md")
    assert card.data.base_model is None and card.data.library_name == "diffusers"  # a local base is no hub id
    assert str(tiny_sd) not in card.content and f"`{tiny_sd.name}`" in card.text  # published: basenames only
    assert {"text-to-image", "diffusers-training", "stable-diffusion", "diffusion-dpo"} <= set(card.data.tags)
    assert "lora" not in card.data.tags
    for fact in ("| steps | 3 |", "| effective batch | 2 pairs per step |", "| beta | 5000, in the official DiffusionDPO",
                 "| learning rate | 0.0001 (adamw", "![validation grid](validation_grid.png)", "StableDiffusionPipeline"):
        assert fact in card.text, fact
    assert (final / "validation_grid.png").is_file()


def test_sdxl_lora_changes_only_lora_weights_and_loads(tmp_path, tiny_sdxl, tiny_data):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    trainer = Trainer(make_cfg(out, tiny_sdxl, tiny_data, lora__rank=4, lora__alpha=8, optim__lr="1e-3"))
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    final = trainer.run()
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]  # + the card
    from huggingface_hub import ModelCard

    card = ModelCard.load(final / "README.md")
    assert {"lora", "template:sd-lora", "stable-diffusion-xl"} <= set(card.data.tags)
    assert "LoRA (rank 4" in card.text and "pipe.load_lora_weights(" in card.text
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(final)
    assert pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)


@pytest.mark.parametrize("rank", [0, 8])
def test_overfit_a_fixed_batch(tmp_path, tiny_sd, tiny_data, rank):
    """Same 4 pairs, same noise and timesteps every step: DPO must drive implicit accuracy to 1."""
    lr = "1e-4" if rank == 0 else "1e-3"
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, data__batch_size=4, data__max_pairs=4,
                               data__random_flip="false", data__proportion_empty_prompts=0,
                               lora__rank=rank, optim__lr=lr))
    _, batch = next(trainer.batches())
    history = []
    for _ in range(25):
        out = trainer.step(batch, micro_step=0)  # the batch's sample seeds fix timesteps and noise
        trainer.accelerator.backward(out.loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        history.append({k: v.item() for k, v in out.metrics.items()})
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["implicit_acc"] == 1.0
    assert history[-1]["loss"] < 0.1 * math.log(2)
    assert history[-1]["reward_margin"] > 0
    # the winners' error fell relative to the losers' compared with the reference
    last = history[-1]
    assert (last["model_mse_w"] - last["model_mse_l"]) < (last["ref_mse_w"] - last["ref_mse_l"])


@pytest.mark.parametrize("loss", ["hinge", "ipo", "sft", "mapo"])
def test_other_losses_train(tmp_path, tiny_sd, tiny_data, loss):
    # MaPO's batch loss is no function of the batch's mean errors: one pair per step makes it one of the logged ones
    batch = {"data__batch_size": 1} if loss == "mapo" else {}
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, loss__name=loss, loss__beta=100, **batch))
    if loss in ("sft", "mapo"):
        assert trainer.reference is None  # the SFT baseline and MaPO never run a reference model
    trainer.run()
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    first = metrics[0]  # step 1: θ = ref, every pair decided (p = 1)
    if loss == "hinge":
        assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-6)  # relu(1 - 0) at θ = ref
    if loss == "ipo":
        # h = 0 at θ = ref: (h - (2p - 1)/(2β))² = (0 - 1/200)² = 0.005² = 2.5e-5 for every pair
        assert first["loss"] == pytest.approx(2.5e-5, rel=1e-3)
    if loss in ("hinge", "ipo"):
        assert first["implicit_acc"] == 0.5 and first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    if loss in ("sft", "mapo"):  # reference-free: the logged reference errors are the model's own
        assert first["ref_mse_w"] == first["model_mse_w"] and first["ref_mse_l"] == first["model_mse_l"]
    if loss == "sft":
        # p·mse_w + (1 - p)·mse_l with p = 1: the winners' mean error (the losers are never run: null)
        assert first["loss"] == pytest.approx(first["model_mse_w"], rel=1e-6) and first["model_mse_l"] is None
        assert first["reward_margin"] == 0.0 and first["implicit_acc"] == 0.5  # no margin: inside is 0
    if loss == "mapo":
        # the logged margin is T·(f(e_w) - f(e_l)), f(e) = (e/2)/(exp(e/2) - 1), T = 1000; the loss with p = 1 is
        # e_w - β log σ(T·m) = e_w + 100·log(1 + exp(-T·m))
        e_w, e_l = first["model_mse_w"], first["model_mse_l"]
        f = lambda e: (e / 2) / math.expm1(e / 2)  # noqa: E731
        assert first["reward_margin"] == pytest.approx(1000 * (f(e_w) - f(e_l)), abs=1e-3)
        assert first["loss"] == pytest.approx(e_w + 100 * math.log1p(math.exp(-first["reward_margin"])), rel=1e-5)
        assert first["implicit_acc"] == (1.0 if first["reward_margin"] > 0 else 0.0)


def test_v_prediction_bf16_and_accumulation(tmp_path, tiny_sd_vpred, tiny_data):
    out = tmp_path / "run"
    train(make_cfg(out, tiny_sd_vpred, tiny_data, lora__rank=4, train__mixed_precision="bf16",
                   train__gradient_accumulation_steps=2, data__batch_size=1, optim__scale_lr="true",
                   optim__lr="1e-4"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["lr"] == pytest.approx(1e-4 * 1 * 2 * 1)  # scale_lr: lr x batch x accumulation x processes
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


class _Killed(Exception):
    pass


class _KilledAfter(Trainer):
    """A trainer that dies right after finishing optimizer step `kill_at` (its checkpoint, if any, is written)."""

    kill_at = 0

    def _maybe_checkpoint(self):
        super()._maybe_checkpoint()
        if self.state.step == self.kill_at:
            raise _Killed


def straight_and_resumed(tmp_path: Path, model: Path, data: Path, **common) -> tuple[Path, Path]:
    """The final/ of a straight run in tmp_path/a, and of one in tmp_path/b killed after step 3 (its checkpoint
    at step 2 written, no final/) and resumed from the latest checkpoint. `common` must checkpoint every 2 steps."""
    straight = train(make_cfg(tmp_path / "a", model, data, **common))
    _KilledAfter.kill_at = 3
    with pytest.raises(_Killed):
        _KilledAfter(make_cfg(tmp_path / "b", model, data, **common)).run()
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "final").exists()
    resuming = Trainer(make_cfg(tmp_path / "b", model, data, train__resume="latest", **common))
    ran = []  # the optimizer step (1-based) each loss computation of the resumed run belongs to
    real_step = resuming.step
    resuming.step = lambda batch, micro_step: ran.append(resuming.state.step + 1) or real_step(batch, micro_step)
    resumed = resuming.run()
    # training is deterministic, so equal weights alone cannot tell an exact resume from a silent restart at step
    # 0: the resumed run must compute steps 3.. only (once per accumulation micro-step)
    accum = int(common.get("train__gradient_accumulation_steps", 1))
    assert ran == [s for s in range(3, int(common["train__max_steps"]) + 1) for _ in range(accum)], ran
    return straight, resumed


@pytest.mark.parametrize("rank,optim", [(0, "adamw"), (4, "adamw"), (0, "adamw8bit")])
def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_sd, tiny_data, rank, optim):
    """Kill after step 3 (checkpoint at 2, mid-epoch), resume latest: the final weights are bitwise equal."""
    common = dict(train__max_steps=5, train__checkpointing_steps=2, lora__rank=rank, data__proportion_empty_prompts=0.5,
                  data__random_crop="true", data__batch_size=3, optim__name=optim)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    if optim == "adamw8bit":  # the checkpoint holds bitsandbytes' quantized moments, not fp32 ones
        state = torch.load(tmp_path / "b" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
        tensors = [t for s in state.values() for v in s.values() for t in (v.values() if isinstance(v, dict) else [v])
                   if torch.is_tensor(t)]  # bitsandbytes nests each parameter's state in one more dict
        assert any(t.dtype == torch.uint8 for t in tensors)

    if rank:
        a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, resumed))
    else:
        a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5]  # the crashed run's step 3 is replaced, not duplicated
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def test_sdxl_recipe_features_adafactor_checkpointing_separate_vae(tmp_path, tiny_sdxl, tiny_data):
    """The SDXL recipe's switches on the tiny SDXL: Adafactor, gradient checkpointing, a VAE from elsewhere."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae_dir = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # recognisably different from the pipeline's own VAE
    vae.save_pretrained(vae_dir)
    out = tmp_path / "run"
    trainer = Trainer(make_cfg(out, tiny_sdxl, tiny_data, optim__name="adafactor", train__gradient_checkpointing="true",
                               model__vae=str(vae_dir)))
    assert trainer.accelerator.unwrap_model(trainer.denoiser).is_gradient_checkpointing
    assert torch.equal(trainer.components.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    final = trainer.run()
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = StableDiffusionXLPipeline.from_pretrained(final)
    assert torch.equal(pipe.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)  # final/ ships the VAE used


def test_missing_optional_packages_are_user_errors(tmp_path, tiny_sd, tiny_data, monkeypatch):
    import sys

    from diffusion_dpo.errors import UserError

    # None in sys.modules makes both `import x` and find_spec("x") fail, as if the package were not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="pip install wandb"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__report_to="wandb"))
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, optim__name="adamw8bit"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_without_a_gpu_is_refused_up_front(tmp_path, tiny_sd, tiny_data):
    from diffusion_dpo.errors import UserError

    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__mixed_precision="fp16"))


def test_accumulation_matches_a_larger_batch(tmp_path, tiny_sd, tiny_data):
    """Batch 4 vs batch 2 x 2 accumulation steps: the same pairs with the same noise -> the same weights."""
    # eps = 1 makes Adam ~ SGD with momentum: plain Adam turns fp32 rounding noise in near-zero gradients
    # into ±lr updates, which would test Adam, not the batching.
    common = dict(train__max_steps=3, data__random_crop="true", optim__lr="0.1", optim__adam_epsilon="1.0",
                  optim__weight_decay="0")
    big = train(make_cfg(tmp_path / "big", tiny_sd, tiny_data, data__batch_size=4, **common))
    acc = train(make_cfg(tmp_path / "acc", tiny_sd, tiny_data, data__batch_size=2,
                         train__gradient_accumulation_steps=2, **common))
    a, b = unet_weights(big), unet_weights(acc)
    base = unet_weights(tiny_sd)
    assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    la = [m["loss"] for m in read_metrics(tmp_path / "big")]
    lb = [m["loss"] for m in read_metrics(tmp_path / "acc")]
    # the loss multiplies fp32 noise in the error differences by beta (5000): 1.7e-4 apart with one thread
    assert la == pytest.approx(lb, rel=1e-3)


def test_same_seed_same_lora_initialisation(tmp_path, tiny_sd, tiny_data):
    """LoRA's A matrices are random at init: they must come from train.seed, not from whatever ran before."""
    torch.manual_seed(123)
    a = Trainer(make_cfg(tmp_path / "a", tiny_sd, tiny_data, lora__rank=4))
    torch.manual_seed(456)
    b = Trainer(make_cfg(tmp_path / "b", tiny_sd, tiny_data, lora__rank=4))
    for (n, p), (_, q) in zip(a.accelerator.unwrap_model(a.denoiser).named_parameters(),
                              b.accelerator.unwrap_model(b.denoiser).named_parameters()):
        assert torch.equal(p, q), n
    c = Trainer(make_cfg(tmp_path / "c", tiny_sd, tiny_data, lora__rank=4, train__seed=1))
    lora_a = [n for n, _ in a.denoiser.named_parameters() if "lora_A" in n][0]
    assert not torch.equal(dict(a.denoiser.named_parameters())[lora_a], dict(c.denoiser.named_parameters())[lora_a])


@pytest.mark.parametrize("rank,optim", [(0, "adamw"), (4, "adamw"), (0, "adafactor"), (0, "adamw8bit")])
def test_step_in_backward_equals_the_ordinary_step(tmp_path, tiny_sd, tiny_data, rank, optim):
    """optim.step_in_backward updates each parameter inside backward and frees its gradient at once: the same
    weights, losses and logged gradient norms as the ordinary step (both unclipped)."""
    # a warm-up: the scheduler's changing learning rate must reach the per-parameter optimizers
    common = dict(train__max_steps=3, lora__rank=rank, optim__name=optim, optim__max_grad_norm=0,
                  optim__lr_warmup_steps=2)
    plain = train(make_cfg(tmp_path / "plain", tiny_sd, tiny_data, **common))
    fused = train(make_cfg(tmp_path / "fused", tiny_sd, tiny_data, optim__step_in_backward="true", **common))
    if rank:
        a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (plain, fused))
    else:
        a, b = unet_weights(plain), unet_weights(fused)
        base = unet_weights(tiny_sd)
        assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    ma, mb = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fused")
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], rel=1e-5)
    assert [m["grad_norm"] for m in ma] == pytest.approx([m["grad_norm"] for m in mb], rel=1e-4)
    assert all(m["grad_norm"] > 0 for m in mb)


def test_step_in_backward_never_holds_two_gradients(tmp_path, tiny_sd, tiny_data):
    """When a parameter's update runs, every other gradient is already gone (the memory the mode saves)."""
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, optim__step_in_backward="true", optim__max_grad_norm=0))
    params = trainer.params
    live_grads = []
    for p in params:  # registered after the optimizer's own hooks, so it runs after the update freed p.grad
        p.register_post_accumulate_grad_hook(lambda _: live_grads.append(sum(q.grad is not None for q in params)))
    trainer.run()
    assert len(live_grads) == 2 * len(params)  # every parameter, every step
    assert max(live_grads) == 0
    assert all(p.grad is None for p in params)
    trainer.in_backward.remove_hooks()  # bench does this before timing its bare-compute floor
    before = [p.detach().clone() for p in params]
    sum(p.float().pow(2).sum() for p in params).backward()
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # no update ran


def test_step_in_backward_resumes_exactly(tmp_path, tiny_sd, tiny_data):
    """The per-parameter optimizer states go into the checkpoint and come back: bitwise equal to a straight run."""
    common = dict(train__max_steps=4, train__checkpointing_steps=2, optim__step_in_backward="true",
                  optim__max_grad_norm=0, optim__lr_warmup_steps=3)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from diffusion_dpo.errors import UserError

    # a checkpoint of the other kind of optimizer is refused, either way round, in one line
    plain = dict(common, optim__step_in_backward="false", train__max_steps=2)
    train(make_cfg(tmp_path / "c", tiny_sd, tiny_data, **plain))
    with pytest.raises(UserError, match="step_in_backward"):
        train(make_cfg(tmp_path / "c", tiny_sd, tiny_data, train__resume="latest", **common))
    with pytest.raises(UserError, match="not a usable checkpoint"):
        train(make_cfg(tmp_path / "b", tiny_sd, tiny_data, train__resume=str(tmp_path / "b" / "checkpoint-2"),
                       **dict(plain, train__max_steps=4)))


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_flux"])
def test_sft_runs_the_model_on_the_winners_only(request, tmp_path, tiny_data, family):
    """Issue 15 defect 8: SFT gives a decided pair's loser weight 0, so the model never runs on the losers (it did,
    forward and backward: half of SFT's compute); the loss is the winners' mean error and the loser errors are null."""
    extra = {"model__max_sequence_length": 8} if family == "tiny_flux" else {}
    trainer = Trainer(make_cfg(tmp_path, request.getfixturevalue(family), tiny_data, loss__name="sft", **extra))
    seen = []
    model = trainer.accelerator.unwrap_model(trainer.denoiser)
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    trainer.run()
    assert seen and all(n == 2 for n in seen), seen  # data.batch_size 2 pairs: 2 images, not 4
    for m in read_metrics(tmp_path):
        assert m["loss"] == pytest.approx(m["model_mse_w"], rel=1e-6)
        assert m["model_mse_l"] is None and m["ref_mse_l"] is None


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_flux"])
def test_the_winner_safeguard_scales_only_the_losers_gradient(request, tmp_path, tiny_data, family):
    """loss.safeguard: the forward (the loss) is the plain run's; the update differs; lambda is logged in [0, 1];
    mu = 1 leaves the loser no gradient wherever the two gradients agree."""
    extra = {"model__max_sequence_length": 8} if family == "tiny_flux" else {}
    model = request.getfixturevalue(family)
    runs, grads = {}, {}
    for name, opts in {"plain": {}, "guarded": {"loss__safeguard": "true"},
                       "mu1": {"loss__safeguard": "true", "loss__safeguard_mu": "1"}}.items():
        out = tmp_path / name
        trainer = Trainer(make_cfg(out, model, tiny_data, train__max_steps=1, optim__lr="1e-3", **extra, **opts))
        grads[name] = {}  # each parameter's gradient of the one step, before clipping
        for i, p in enumerate(trainer.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i, g=grads[name]: g.update({i: p.grad.detach().clone()}))
        trainer.run()
        denoiser = "unet" if family == "tiny_sd" else "transformer"
        runs[name] = (read_metrics(out)[0], load_file(next((out / "final" / denoiser).glob("*.safetensors"))))
    (plain, w_plain), (guarded, w_guarded), (mu1, _) = runs["plain"], runs["guarded"], runs["mu1"]
    assert guarded["loss"] == pytest.approx(plain["loss"], rel=1e-6) and "loser_scale" not in plain
    assert 0.0 < guarded["loser_scale"] < 1.0 and mu1["loser_scale"] == 0.0  # a pair's residuals share the noise
    assert any(not torch.equal(w_plain[k], w_guarded[k]) for k in w_plain)
    # the effect, numerically: the same forward, so the plain gradient is g_w + g_l (the winners' and the losers'
    # parts); mu = 1 gives lambda 0, i.e. g_w alone; the guarded step must be exactly g_w + lambda g_l
    lam = guarded["loser_scale"]
    g_plain, g_guarded, g_w = grads["plain"], grads["guarded"], grads["mu1"]
    assert g_plain.keys() == g_guarded.keys() == g_w.keys() and g_plain
    scale = max(g.abs().max().item() for g in g_plain.values())
    assert any((g_plain[i] - g_w[i]).abs().max() > 1e-3 * scale for i in g_plain)  # the losers' part is not nil
    for i in g_plain:
        torch.testing.assert_close(g_guarded[i], g_w[i] + lam * (g_plain[i] - g_w[i]), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("family,rank", [("tiny_sdxl", 4), ("tiny_sd3", 4), ("tiny_flux", 0)])
def test_mapo_trains_every_family_without_a_reference_forward(request, tmp_path, tiny_data, family, rank):
    """MaPO on SDXL/SD3 with LoRA and full FLUX: no reference forward and no second model, and each step's loss
    is the authors' formula of that step's logged errors (one pair per step; the SD case: test_other_losses_train)."""
    from diffusion_dpo.training.losses import mapo_loss

    extra = {"model__max_sequence_length": 8} if family in ("tiny_sd3", "tiny_flux") else {}
    trainer = Trainer(make_cfg(tmp_path, request.getfixturevalue(family), tiny_data, loss__name="mapo",
                               loss__beta=0.1, lora__rank=rank, optim__lr="1e-3", data__batch_size=1, **extra))
    # no second model: a full fine-tune builds no reference, LoRA keeps its adapters-off view for the sample grids
    assert (trainer.reference is None) == (rank == 0)
    assert trainer.reference is None or trainer.reference.copy is None
    # and no reference forward: one forward of the policy (both images of the step's pair) per step, none of them
    # with the adapters off (LoRA's reference view of the same denoiser)
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = trainer.accelerator.unwrap_model(trainer.denoiser)
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert bool(tuners) == bool(rank)
    forwards = []  # (images, adapters off) of every denoiser forward
    model.register_forward_hook(lambda module, args, kwargs, out: forwards.append(
        ((args[0] if args else kwargs["hidden_states"]).shape[0], any(t.disable_adapters for t in tuners))),
        with_kwargs=True)
    trainer.run()
    assert forwards == [(2, False)] * 2, forwards  # train.max_steps 2
    for m in read_metrics(tmp_path):
        # reference-free: the logged reference errors are the model's own (the trainer's convention, as for sft)
        assert m["ref_mse_w"] == m["model_mse_w"] and m["ref_mse_l"] == m["model_mse_l"]
        by_hand = mapo_loss(torch.tensor([m["model_mse_w"]], dtype=torch.float64),
                            torch.tensor([m["model_mse_l"]], dtype=torch.float64), None, None, beta=0.1).loss
        assert m["loss"] == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("opts", [dict(loss__name="mapo", loss__beta=0.1), dict(loss__safeguard="true", lora__rank=4)],
                         ids=["mapo", "safeguard-lora"])
def test_mapo_and_the_safeguard_resume_exactly(tmp_path, tiny_sd, tiny_data, opts):
    """Killed after step 3 (checkpoint at 2), resumed: the straight run's losses and weights, bit for bit."""
    common = dict(train__max_steps=5, train__checkpointing_steps=2, data__batch_size=3,
                  data__proportion_empty_prompts=0.5, **opts)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    if "lora__rank" in opts:
        a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, resumed))
    else:
        a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]
    if "loss__safeguard" in opts:
        assert [m["loser_scale"] for m in read_metrics(tmp_path / "a")] == \
            [m["loser_scale"] for m in read_metrics(tmp_path / "b")]


def test_the_safeguard_needs_a_pairwise_loss(tmp_path, tiny_sd, tiny_data):
    with pytest.raises(UserError, match="loss.safeguard applies to pairwise losses .* not sft"):
        make_cfg(tmp_path, tiny_sd, tiny_data, loss__name="sft", loss__safeguard="true")


def test_a_reference_free_loss_refuses_a_reference_model(tmp_path, tiny_sd, tiny_data):
    with pytest.raises(UserError, match=r"model.reference is not used by loss mapo \(it trains without a reference"):
        make_cfg(tmp_path, tiny_sd, tiny_data, loss__name="mapo", model__reference=str(tiny_sd))


def test_lazy_image_check_trains_past_a_broken_image_and_counts_it(tmp_path, tiny_sd, capsys):
    """data.image_check lazy: nothing is decoded before training; the epoch's one broken pair is replaced by the next
    pair when the loader meets it, the run finishes, and metrics.jsonl counts it (cumulative, over processes)."""
    from pickapic_fixtures import GARBAGE, row, write_pickapic

    data = write_pickapic(tmp_path / "data.parquet", [row(f"p{i}", jpg_0=GARBAGE if i == 5 else None)
                                                       for i in range(8)])
    out = tmp_path / "run"
    train(make_cfg(out, tiny_sd, data, data__image_check="lazy", train__max_steps=4))  # 4 x 2 = the whole epoch
    skipped = [m["bad_pairs_skipped"] for m in read_metrics(out)]
    assert skipped[-1] == 1 and skipped == sorted(skipped)
    assert "data.image_check lazy: 1 pairs with an image that does not decode were replaced" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"data.parquet row 5: jpg_0 cannot be decoded"):  # checked before: one line
        train(make_cfg(tmp_path / "checked", tiny_sd, data, train__max_steps=4))


# each family's shortest text length that holds its chat template (none for the UNet families)
TEXT_LENGTH = {"sd": None, "sdxl": None, "sd3": 8, "flux": 8, "zimage": 64, "flux2-klein": 64, "flux2": 64,
               "qwenimage": 256}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_trained_parameter_gets_a_gradient(request, tmp_path, tiny_data, family):
    """DDP waits for the gradient of every parameter it trains and fails at the second step when one never comes (Qwen-
    Image's last block updates text tokens the transformer never returns): after one step every parameter the
    optimizer holds has a gradient, in a full fine-tune and in LoRA (the family's `unused_parameters` are frozen)."""
    length = {} if TEXT_LENGTH[family] is None else {"model__max_sequence_length": TEXT_LENGTH[family]}
    for rank in (0, 4):
        trainer = Trainer(make_cfg(tmp_path / str(rank), tiny_family(request, family), tiny_data, lora__rank=rank,
                                   **length))
        _, batch = next(trainer.batches())
        trainer.accelerator.backward(trainer.step(batch, micro_step=0).loss)
        named = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.denoiser).named_parameters()}
        missing = [named[id(p)] for p in trainer.params if p.grad is None]
        assert trainer.params and not missing, f"rank {rank}: {missing[:4]}"
