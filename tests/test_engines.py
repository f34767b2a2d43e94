"""Scale-out engines: the shipped accelerate configs, DeepSpeed's filled-in values, sharded checkpoints.

DDP itself (2 processes = 1 process with a 2x batch = 2 accumulation steps) is tested in test_cli.py
over gloo. FSDP and DeepSpeed need GPUs (accelerate runs them only on accelerators): those tests are
marked `gpu` and skipped here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_dpo.errors import UserError

pytestmark = pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=12, seed=3)


def test_shipped_accelerate_configs_parse_as_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(ACCELERATE.glob("*.yaml"))}
    assert set(configs) == {"multi_gpu", "multi_node", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert configs["multi_gpu"].distributed_type == DistributedType.MULTI_GPU
    nodes = configs["multi_node"]
    assert nodes.distributed_type == DistributedType.MULTI_GPU and nodes.num_machines == 2
    assert nodes.num_processes == 16 and nodes.main_process_ip and nodes.main_process_port
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    for name, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        ds = configs[name]
        assert ds.distributed_type == DistributedType.DEEPSPEED and ds.deepspeed_config["zero_stage"] == stage
        # accumulation and clipping come from the training config; accelerate's launcher would pass an
        # 'auto' here on as an environment variable that Accelerator() cannot parse
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(ds.deepspeed_config)
    assert configs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    for cfg in configs.values():  # precision is the training config's (train.mixed_precision)
        assert cfg.mixed_precision in (None, "no")


def test_deepspeed_gets_the_values_accelerate_cannot_infer(tmp_path, tiny_sd, tiny_data):
    from diffusion_dpo.config import load_config
    from diffusion_dpo.training.setup import configure_deepspeed

    cfg = load_config(None, {"model.pretrained": str(tiny_sd), "data.path": str(tiny_data),
                             "data.batch_size": "3", "optim.max_grad_norm": "0.5"})
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 2}}
    configure_deepspeed(ds, cfg.data, cfg.optim)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
    assert "train_batch_size" not in ds and ds["zero_allow_untested_optimizer"] is True
    given = {"train_micro_batch_size_per_gpu": 7, "gradient_clipping": 2.0}
    configure_deepspeed(given, cfg.data, cfg.optim)  # values the user wrote in a DeepSpeed file are kept
    assert given["train_micro_batch_size_per_gpu"] == 7 and given["gradient_clipping"] == 2.0


def test_a_sharded_checkpoint_is_not_resumed_by_a_plain_run(tmp_path, tiny_sd, tiny_data):
    from test_training import make_cfg

    from diffusion_dpo.training import Trainer
    from diffusion_dpo.training.checkpoint import ENGINE_DIR

    out = tmp_path / "run"
    Trainer(make_cfg(out, tiny_sd, tiny_data, train__max_steps=2, train__checkpointing_steps=1)).run()
    (out / "checkpoint-1" / ENGINE_DIR).mkdir()  # what an FSDP/DeepSpeed run leaves in its checkpoints
    trainer = Trainer(make_cfg(out, tiny_sd, tiny_data, train__max_steps=3, train__resume=str(out / "checkpoint-1")))
    with pytest.raises(UserError, match="written by an FSDP/DeepSpeed run; resume it under the same accelerate --config_file"):
        trainer.run()


def _launch(config: str, out: Path, model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
           "--num_processes", "1", "-m", "diffusion_dpo", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--output_dir", str(out), "--model.pretrained", str(model), "--data.path", str(data),
           "--data.num_workers", "0", "--train.report_to", "none", "--validation.every_steps", "-1",
           "--train.mixed_precision", "bf16", *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP/DeepSpeed run only on GPUs under accelerate")
@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_engines_train_checkpoint_resume_and_save_a_pipeline(tmp_path, tiny_sd, tiny_data, config):
    import importlib.util

    from diffusers import StableDiffusionPipeline

    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--train.max_steps", "4", "--train.checkpointing_steps", "2", "--train.gradient_accumulation_steps", "2")
    res = _launch(config, straight, tiny_sd, tiny_data, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the frozen reference is a whole copy on every GPU" in res.stdout  # and how to hold none
    assert (straight / "checkpoint-2" / "engine").is_dir()
    StableDiffusionPipeline.from_pretrained(straight / "final")  # gathered into a normal pipeline
    res = _launch(config, resumed, tiny_sd, tiny_data, "--train.max_steps", "3", "--train.checkpointing_steps", "2",
                  "--train.gradient_accumulation_steps", "2")  # stands for a run killed after step 3
    assert res.returncode == 0, res.stderr[-3000:]
    res = _launch(config, resumed, tiny_sd, tiny_data, *args, "--train.resume", str(resumed / "checkpoint-2"))
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    def losses(out: Path) -> list[float]:
        return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-3)
