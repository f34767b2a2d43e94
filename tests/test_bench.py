"""`diffusion-dpo bench`: every mode trains through the real loop and is set against its compute floor."""

from pathlib import Path

import pytest

from diffusion_dpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16)


def test_bench_times_each_mode_against_the_floor_on_the_same_inputs(tmp_path, tiny_sd, tiny_data, capsys):
    import json

    out = tmp_path / "rows.json"
    code = main(["bench", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", str(tiny_sd),
                 "--data.path", str(tiny_data), "--data.batch_size", "3", "--data.num_workers", "0",
                 "--modes", "live", "lora+cache", "precomputed", "mapo+cache", "--steps", "2", "--warmup", "1",
                 "--floor-repeats", "2", "--lora-rank", "2", "--json", str(out), "--markdown", str(tmp_path / "t.md")])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["live", "lora+cache", "precomputed", "mapo+cache"]
    for r in rows:
        assert r["steps_timed"] == 2 and r["batch_pairs"] == 3
        # the floor ran on the policy's real inputs: 2B latents of the training resolution (32 px / 2 = 16)
        assert r["floor_latents"] == [6, 4, 16, 16]
        assert r["step_s"] > 0 and r["floor_s"] > 0
        assert r["step_over_floor"] == pytest.approx(r["step_s"] / r["floor_s"])
        assert r["model_tflop_per_step"] > 0 and r["peak_memory_mib"] > 0 and r["load_peak_memory_mib"] > 0
    live, lora, pre, mapo = rows
    assert live["encoders_loaded"] and live["vae_text_s_per_step"] > 0  # images are encoded every step
    for r in (lora, pre, mapo):  # from the cache: the VAE and text encoders are not even loaded
        assert not r["encoders_loaded"] and r["vae_text_s_per_step"] == 0 and r["cached"]
    assert live["lora_rank"] == 0 and lora["lora_rank"] == 2 and pre["lora_rank"] == 0
    # the floor counts the reference forward only where a reference model runs: live's is a third larger
    # (forward + backward ~ 3 forwards, + 1 reference forward); precomputed has none
    assert pre["precomputed_reference"] and live["model_tflop_per_step"] == pytest.approx(
        pre["model_tflop_per_step"] * 4 / 3, rel=0.1)
    # MaPO is reference-free: its floor, like precomputed's, is the policy's forward and backward alone
    assert mapo["loss"] == "mapo" and live["loss"] == "dpo" and not mapo["precomputed_reference"]
    assert mapo["model_tflop_per_step"] == pytest.approx(pre["model_tflop_per_step"], rel=0.01)
    table = (tmp_path / "t.md").read_text()
    assert table.count("\n") == 6 and "| live |" in table and "| lora+cache |" in table
    assert table in capsys.readouterr().out


def test_the_interleaved_floor_leaves_training_as_it_was(tmp_path, tiny_sd, tiny_data):
    """The floor runs between the training steps, on each step's own inputs, with the in-backward optimizer paused:
    the weights and losses are bitwise those of the same run without it, and each timed step has its floor."""
    import json

    import torch

    from diffusion_dpo.bench import InputRecorder, InterleavedFloor
    from diffusion_dpo.config import load_config
    from diffusion_dpo.training import Trainer

    def run(name, with_floor):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", {
            "model.pretrained": str(tiny_sd), "data.path": str(tiny_data), "output_dir": str(tmp_path / name),
            "data.num_workers": "0", "train.max_steps": "3", "train.checkpointing_steps": "0",
            "validation.every_steps": "-1", "train.report_to": "none", "optim.step_in_backward": "true",
            "optim.max_grad_norm": "0"})
        trainer = Trainer(cfg)
        trainer._save_final = lambda: trainer.output_dir
        floor = None
        if with_floor:
            recorder = InputRecorder(trainer.accelerator.unwrap_model(trainer.denoiser))
            floor = trainer.metrics.callback = InterleavedFloor(trainer, recorder, warmup=1, per_step=2)
        trainer.run()
        losses = [json.loads(line)["loss"] for line in trainer.metrics_path.read_text().splitlines()]
        return dict(trainer.denoiser.named_parameters()), losses, floor

    plain, plain_losses, _ = run("plain", False)
    timed, timed_losses, floor = run("timed", True)
    assert timed_losses == plain_losses
    assert all(torch.equal(plain[k], timed[k]) for k in plain)
    assert len(floor.step_seconds) == 2 and len(floor.floor_seconds) == 4 and floor.flops > 0  # after steps 1-2


def test_an_unknown_mode_is_one_line(capsys, tiny_sd, tiny_data):
    code = main(["bench", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", str(tiny_sd),
                 "--data.path", str(tiny_data), "--modes", "warp"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("diffusion-dpo: error: bench: unknown mode 'warp' (choose from "
                                               "live, live+cache, lora, lora+cache, precomputed, mapo, mapo+cache)")


def test_the_sd15_shaped_model_has_sd15s_architecture(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_dpo.testing.tiny import build_sd15_shaped_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(build_sd15_shaped_pipeline(tmp_path / "sd15", width=32,
                                                                              resolution=64))
    cfg = pipe.unet.config
    assert tuple(cfg.block_out_channels) == (32, 64, 128, 128) and cfg.layers_per_block == 2
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg.cross_attention_dim == 768 == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == 77 and pipe.vae_scale_factor == 8 and cfg.sample_size == 8
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sd15_shaped_pipeline(tmp_path / "bad", width=48)


def test_the_shaped_denoisers_have_the_published_sizes():
    """SDXL's UNet is 2.57B parameters, SD3.5-medium's MMDiT-X ~2.2B, FLUX.1-dev's transformer 11.9B (counted on the
    meta device)."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from diffusion_dpo.testing.tiny import SHAPED

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SHAPED["sdxl"])
        sd35 = SD3Transformer2DModel(**SHAPED["sd35-medium"])
        flux = FluxTransformer2DModel(**SHAPED["flux-dev"])
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet
    assert 2.0e9 < sum(p.numel() for p in sd35.parameters()) < 2.6e9
    assert 11.5e9 < sum(p.numel() for p in flux.parameters()) < 12.3e9
    assert sd35.config.joint_attention_dim == flux.config.joint_attention_dim == 4096  # T5-XXL's width


def test_mfu_peak_comes_from_the_flag_or_the_gpu_name(monkeypatch):
    import torch

    from diffusion_dpo import bench

    assert bench.peak_tflops(torch.device("cpu"), None) is None  # no peak known for a CPU
    assert bench.peak_tflops(torch.device("cpu"), 50.0) == 50.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.peak_tflops(torch.device("cuda"), None) == 989.4
    assert bench.peak_tflops(torch.device("cuda"), 400.0) == 400.0


def test_fused_attention_flops_are_counted_like_the_plain_matmuls():
    """MFU's numerator: the fused attention kernel counts what the plain matmuls count, forward and backward
    (torch's own counter skips the CPU kernel and adds the CUDA kernels' recomputation)."""
    import torch

    from diffusion_dpo import bench

    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))

    def plain() -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    def fused() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    counts = {}
    for name, attention in (("plain", plain), ("fused", fused)):
        with bench.model_flop_counter() as counter:
            forward_only = attention()
            forward_flops = counter.get_total_flops()
            forward_only.sum().backward()
        counts[name] = (forward_flops, counter.get_total_flops())
    assert counts["fused"][0] == counts["plain"][0] == 2 * (2 * 2 * 4 * 64 * 64 * 16)
    assert counts["fused"][1] == counts["plain"][1] == 3 * counts["plain"][0]  # backward: four matmuls


def test_the_peak_restarts_where_training_begins():
    """Training's peak excludes loading's transient: the peak is reset (to what is resident now) after loading."""
    import torch

    from diffusion_dpo import metrics

    if torch.cuda.is_available():
        pytest.skip("on CUDA the reset is torch.cuda.reset_peak_memory_stats")
    transient = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, then returned to the system
    del transient
    before = metrics._peak_rss_bytes()
    metrics.reset_peak_memory()
    assert metrics._peak_rss_bytes() < before - 48 * 2**20


def test_the_gpu_check_script_parses_and_names_what_exists():
    """benchmarks/gpu_check.sh (run where a GPU is lent) is valid bash, and every config, --shaped model and bench
    mode it names exists here."""
    import re
    import subprocess

    from diffusion_dpo.bench import MODES
    from diffusion_dpo.testing.tiny import SHAPED

    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for config in re.findall(r"configs/[\w.]+\.yaml", text):
        assert (ROOT / config).is_file(), config
    assert set(re.findall(r"--shaped ([\w-]+)", text)) <= set(SHAPED)
    listed = re.findall(r'(?:512|1024)\s*\\?\s*"([\w+ ]+)"', text)  # bench NAME ... RESOLUTION "MODES"
    assert len(listed) == 3 and all(set(modes.split()) <= set(MODES) for modes in listed), listed
