"""Config loading: YAML + dotted overrides, one-line errors, the shipped recipes."""

from pathlib import Path

import pytest

from diffusion_dpo.config import Config, iter_fields, load_config, to_yaml
from diffusion_dpo.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REQUIRED = {"model.pretrained": "m", "data.path": "d"}


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_by_dotted_name_take_precedence(tmp_path):
    p = _write(tmp_path, "model: {pretrained: base}\ndata: {path: d, batch_size: 2}\nloss: {beta: 100}\n")
    cfg = load_config(p, {"data.batch_size": "4", "loss.beta": "2500", "lora.rank": "8", "output_dir": "out",
                          "validation.seeds": "[1,2]", "train.resume": "latest"})
    assert (cfg.data.batch_size, cfg.loss.beta, cfg.lora.rank, cfg.output_dir) == (4, 2500.0, 8, "out")
    assert cfg.validation.seeds == [1, 2] and cfg.train.resume == "latest"
    assert cfg.model.pretrained == "base" and isinstance(cfg, Config)


def test_contract_fields_exist():
    names = {n for n, _ in iter_fields()}
    for required in ("model.pretrained", "data.path", "data.batch_size", "output_dir", "train.max_steps",
                     "train.seed", "train.checkpointing_steps", "train.resume", "lora.rank"):
        assert required in names
    assert all(f.metadata.get("help") for _, f in iter_fields())


@pytest.mark.parametrize("text,overrides,match", [
    ("model: {pretrained: m}\ndata: {path: d, batchsize: 2}\n", {}, r"c.yaml: unknown config key 'data.batchsize'"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"loss.betaa": "1"}, "command line: unknown config key 'loss.betaa'"),
    ("model: {pretrained: m}\ndata: {path: d, batch_size: two}\n", {}, "bad value for 'data.batch_size'"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"loss.beta": "0"}, "loss.beta must be > 0"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"loss.beta": "-5"}, "loss.beta must be > 0"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"loss.label_smoothing": "0.5"}, "loss.label_smoothing must be in"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"train.ema_decay": "1"}, r"train.ema_decay must be in \[0, 1\)"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"train.ema_decay": "-0.1"}, r"train.ema_decay must be in \[0, 1\)"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"optim.step_in_backward": "true"},
     "optim.step_in_backward cannot clip by the global gradient norm"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"optim.step_in_backward": "true", "optim.max_grad_norm": "0",
                                                    "train.gradient_accumulation_steps": "2"},
     "optim.step_in_backward needs train.gradient_accumulation_steps 1"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"optim.step_in_backward": "true", "optim.max_grad_norm": "0",
                                                    "train.mixed_precision": "fp16"}, "use bf16"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"optim.step_in_backward": "true", "optim.max_grad_norm": "0",
                                                    "train.skip_nonfinite": "true"}, "cannot skip a non-finite step"),
    ("data: {path: d}\n", {}, "model.pretrained is required"),
    ("model: {pretrained: m}\n", {}, "data.path is required"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"loss.name": "kto2"}, "loss.name must be one of"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"train.mixed_precision": "fp8"}, "train.mixed_precision"),
    ("model: {pretrained: m}\ndata: {path: d}\n", {"data.resolution": "500"}, "multiple of 8"),
    ("model: [unclosed\n", {}, "invalid YAML"),
    ("- a list\n", {}, "expected a mapping"),
    ("model: {pretrained: m}\nbogus_section: {a: 1}\n", {}, "unknown config key 'bogus_section'"),
])
def test_config_errors_are_one_line(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match) as exc:
        load_config(_write(tmp_path, text), overrides)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {**REQUIRED, "lora.rank": "4"})
    again = load_config(_write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(tmp_path, name):
    import yaml

    iterate = name.startswith("iterate_")
    cfg = load_config(CONFIGS / name, iterate=iterate)
    assert isinstance(cfg, Config)
    # what loads is the file: each value it sets, every other field at its default
    in_file, todo = {}, [("", yaml.safe_load((CONFIGS / name).read_text()))]
    while todo:
        prefix, node = todo.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                todo.append((f"{prefix}{key}.", value))
            else:
                in_file[f"{prefix}{key}"] = value
    names = [n for n, _ in iter_fields()]
    assert in_file and set(in_file) <= set(names), set(in_file) - set(names)

    def value(c, dotted):
        for part in dotted.split("."):
            c = getattr(c, part)
        return c
    default = Config()
    for dotted in names:
        assert value(cfg, dotted) == in_file.get(dotted, value(default, dotted)), dotted
    assert load_config(_write(tmp_path, to_yaml(cfg)), iterate=iterate) == cfg  # and it is saved as it loads


def test_paper_recipes():
    sd15 = load_config(CONFIGS / "sd15_pickapic.yaml")
    assert sd15.lora.rank == 0 and sd15.loss.name == "dpo" and sd15.loss.beta == 5000
    assert sd15.data.batch_size * sd15.train.gradient_accumulation_steps == 2048  # per single process
    assert sd15.optim.lr == 1e-8 and sd15.optim.scale_lr and sd15.optim.name == "adamw"
    assert (sd15.train.max_steps, sd15.optim.lr_warmup_steps, sd15.data.resolution) == (2000, 500, 512)
    assert sd15.data.proportion_empty_prompts == 0.2
    sdxl = load_config(CONFIGS / "sdxl_pickapic.yaml")
    assert sdxl.optim.name == "adafactor" and sdxl.train.gradient_checkpointing
    assert (sdxl.data.resolution, sdxl.optim.lr_warmup_steps, sdxl.loss.beta) == (1024, 200, 5000)
    assert sdxl.data.batch_size * sdxl.train.gradient_accumulation_steps == 2048
    # the official run: constant time ids; clips the gradient norm at 1.0 (launcher: --sdxl, not --use_adafactor)
    assert sdxl.model.sdxl_time_ids == "constant" and sdxl.optim.max_grad_norm == 1.0
    lora = load_config(CONFIGS / "sd15_lora.yaml")
    assert lora.lora.rank > 0


def test_flow_recipes():
    sd35 = load_config(CONFIGS / "sd35_medium_lora.yaml")
    assert (sd35.lora.rank, sd35.lora.alpha, sd35.loss.beta, sd35.data.resolution) == (32, 64, 100, 512)
    assert sd35.lora.target_modules is None and sd35.flow.timestep_sampling == "logit_normal"
    assert sd35.flow.shift is None and sd35.flow.weighting == "none"
    full = load_config(CONFIGS / "sd35_full.yaml")
    assert full.lora.rank == 0 and full.optim.name == "adafactor" and full.optim.max_grad_norm == 0
    assert full.data.batch_size * full.train.gradient_accumulation_steps == 2048 and full.optim.scale_lr
    flux = load_config(CONFIGS / "flux_dev_lora.yaml")
    assert (flux.loss.beta, flux.model.guidance, flux.lora.rank) == (2000, 3.5, 64)
    assert {"add_q_proj", "to_add_out", "ff.net.0.proj", "ff_context.net.2"} <= set(flux.lora.target_modules)
    zimage = load_config(CONFIGS / "zimage_lora.yaml")
    assert (zimage.loss.beta, zimage.lora.rank, zimage.lora.alpha, zimage.flow.shift) == (100, 64, 128, None)
    assert {"attention.to_q", "feed_forward.w3"} <= set(zimage.lora.target_modules)
    klein, klein_full = (load_config(CONFIGS / f"flux2_klein_{m}.yaml") for m in ("lora", "full"))
    assert (klein.lora.rank, klein.lora.alpha, klein.lora.target_modules, klein.loss.beta) == (64, 128, None, 100)
    assert klein_full.lora.rank == 0 and klein_full.optim.name == "adafactor" and klein_full.optim.scale_lr
    qwen = load_config(CONFIGS / "qwenimage_lora.yaml")
    assert (qwen.lora.rank, qwen.lora.alpha, qwen.lora.target_modules, qwen.loss.beta) == (64, 128, None, 100)
    dev = load_config(CONFIGS / "flux2_dev_lora.yaml")
    assert (dev.lora.rank, dev.lora.alpha, dev.lora.target_modules, dev.loss.beta, dev.model.guidance) == \
        (64, 128, None, 100, None) and dev.cache.auto


@pytest.mark.parametrize("recipe,fixture", [("sd35_medium_lora.yaml", "tiny_sd3"), ("sd35_full.yaml", "tiny_sd3"),
                                            ("flux_dev_lora.yaml", "tiny_flux"), ("zimage_lora.yaml", "tiny_zimage"),
                                            ("flux2_klein_lora.yaml", "tiny_flux2_klein"),
                                            ("flux2_klein_full.yaml", "tiny_flux2_klein"),
                                            ("flux2_dev_lora.yaml", "tiny_flux2"),
                                            ("qwenimage_lora.yaml", "tiny_qwenimage")])
def test_flow_recipes_train_their_familys_architecture(request, tmp_path, recipe, fixture):
    """The recipe as shipped (its LoRA targets, optimizer, schedule, guidance), on the tiny model of its family:
    every target module exists in the architecture and the first step is log 2."""
    import json
    import math

    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic
    from diffusion_dpo.training import train

    data = build_tiny_pickapic(tmp_path / "data", num_pairs=8, seed=2)
    cfg = load_config(CONFIGS / recipe, {
        "model.pretrained": str(request.getfixturevalue(fixture)), "data.path": str(data), "output_dir":
        str(tmp_path / "run"), "data.resolution": "32", "data.batch_size": "2", "data.num_workers": "0",
        "train.gradient_accumulation_steps": "1", "train.max_steps": "2", "train.mixed_precision": "no",
        "train.report_to": "none", "validation.every_steps": "-1", "model.max_sequence_length": "8",
        **({"cache.dir": str(tmp_path / "cache")} if "cache:" in (CONFIGS / recipe).read_text() else {})})
    train(cfg)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_mixed_precision_no_works_as_written_in_yaml_and_on_the_command_line(tmp_path):
    """YAML 1.1 reads `no` as false; the documented value must reach the field as the string 'no'."""
    f = tmp_path / "c.yaml"
    f.write_text("model: {pretrained: m}\ndata: {path: d, random_flip: off}\ntrain: {mixed_precision: no}\n"
                 "optim: {lr: 1e-5}\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.data.random_flip is False and cfg.optim.lr == 1e-5
    cfg = load_config(f, {"train.mixed_precision": "no", "data.random_flip": "yes", "optim.lr": "3e-4",
                          "validation.prompts": "[no, a cat]", "data.max_pairs": "null"})
    assert cfg.train.mixed_precision == "no" and cfg.data.random_flip is True and cfg.optim.lr == 3e-4
    assert cfg.validation.prompts == ["no", "a cat"] and cfg.data.max_pairs is None


def test_a_config_built_in_code_is_checked_like_yaml():
    from diffusion_dpo.config import Config, check_config

    cfg = Config()
    cfg.model.pretrained, cfg.data.path = "m", "d"
    cfg.data.batch_size = "4"  # converted as YAML would
    assert check_config(cfg).data.batch_size == 4
    cfg.train.max_step = 3  # a misspelt field: refused, as on the command line
    with pytest.raises(UserError, match=r"^config: unknown config key 'train.max_step'$"):
        check_config(cfg)
    del cfg.train.max_step
    cfg.lora.rank = "four"
    with pytest.raises(UserError, match=r"^config: bad value for 'lora.rank'"):
        check_config(cfg)
    cfg.lora.rank = -1
    with pytest.raises(UserError, match=r"^config: lora.rank must be >= 0"):
        check_config(cfg)
    cfg.lora.rank = 0
    with pytest.raises(UserError, match="data.path must be empty when a dataset is passed in memory"):
        check_config(cfg, data_in_memory=True)
    cfg.data.path = ""
    assert check_config(cfg, data_in_memory=True).data.path == ""
    with pytest.raises(UserError, match="data.path is required"):
        check_config(cfg)


def test_the_package_exports_its_api_lazily():
    import subprocess
    import sys

    code = ("import sys, diffusion_dpo as dd; assert 'torch' not in sys.modules, 'eager import'; "
            "assert set(dd.__all__) >= {'Config', 'load_config', 'train', 'Trainer', 'generate', 'compare', 'relabel', "
            "'load_reward', 'LOSSES'}; assert callable(dd.train) and dd.LOSSES['dpo'].needs_reference; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr


def test_report_to_names_any_accelerate_tracker():
    from diffusion_dpo.training.trackers import init_kwargs, parse_report_to

    assert load_config(None, {**REQUIRED, "train.report_to": "tensorboard,mlflow"}).train.report_to == \
        "tensorboard,mlflow"
    with pytest.raises(UserError, match="train.report_to must be tracker names"):
        load_config(None, {**REQUIRED, "train.report_to": "tensorbored"})
    assert parse_report_to("none") is None and parse_report_to("tensorboard") == ["tensorboard"]
    assert "tensorboard" in parse_report_to("all")
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(UserError, match=r"^train.report_to=mlflow needs the mlflow package: pip install mlflow"):
            parse_report_to("tensorboard,mlflow")
    assert init_kwargs(["tensorboard", "wandb", "mlflow"], "run-7") == {"wandb": {"name": "run-7"},
                                                                         "mlflow": {"run_name": "run-7"}}


def test_validation_grids_go_to_every_tracker_that_takes_images(tmp_path):
    from PIL import Image

    from diffusion_dpo.training.trackers import log_image

    Image.new("RGB", (6, 4), "red").save(tmp_path / "grid.png")

    class Tracker:
        def __init__(self, name):
            self.name, self.calls = name, []

        def log_images(self, values, step, **kwargs):
            self.calls.append((values, step, kwargs))

    tb, wandb, aim = Tracker("tensorboard"), Tracker("wandb"), Tracker("aim")
    log_image([tb, wandb, aim, object()], "validation/grid", tmp_path / "grid.png", 7)
    (values, step, kwargs), = tb.calls
    assert values["validation/grid"].shape == (1, 4, 6, 3) and step == 7 and kwargs == {"dataformats": "NHWC"}
    (values, step, kwargs), = wandb.calls
    assert isinstance(values["validation/grid"], list) and values["validation/grid"][0].size == (6, 4) and not kwargs
    assert aim.calls[0][0]["validation/grid"].size == (6, 4)
