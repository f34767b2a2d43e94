"""The command line: entry points in a subprocess, and every user mistake as one line with exit 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_dpo.cli import main
from diffusion_dpo.models import FAMILIES
from pickapic_fixtures import GARBAGE, row, truncated_jpeg, write_pickapic

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "diffusion_dpo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def fast(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "--output_dir", str(out), "--model.pretrained", str(model),
            "--data.path", str(data), "--train.max_steps", "2", "--validation.every_steps", "-1",
            "--data.num_workers", "0", "--train.report_to", "none", *extra]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16)


def test_help_for_every_command(capsys):
    res = run_cli("--help")  # the entry point itself, once in a subprocess
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr
    helps = {}
    for command in ("train", "cache", "bench", "make-tiny", "demo", "push", "generate", "score", "compare", "relabel"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        helps[command] = capsys.readouterr().out
        assert info.value.code == 0 and "usage:" in helps[command], command
    assert "--loss.beta" in helps["train"]
    assert "diffusers' SD1.5 DPO script's beta is half of ours" in " ".join(helps["train"].split())
    assert "--cache-dir" in helps["demo"] and "--repo-id" in helps["push"]


def test_make_tiny_then_train_the_tiny_config_in_a_subprocess(tmp_path):
    res = run_cli("make-tiny", "--output-dir", str(tmp_path / "tiny"), "--num-pairs", "12")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run"
    res = run_cli(*fast(out, tmp_path / "tiny" / "sdxl", tmp_path / "tiny" / "pickapic",
                        "--lora.rank", "4", "--data.num_workers", "2"))
    assert res.returncode == 0, res.stderr
    assert "done:" in res.stdout and "pairs used" in res.stdout
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    for kind in [f.name for f in FAMILIES if f.denoiser_role == "transformer"]:  # every other family make-tiny
        # writes trains through the same command (in-process)
        assert main(fast(tmp_path / kind, tmp_path / "tiny" / kind, tmp_path / "tiny" / "pickapic",
                         "--model.max_sequence_length", "8")) == 0
        first = json.loads((tmp_path / kind / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert (tmp_path / kind / "final" / "transformer").is_dir()


def test_bad_data_in_a_subprocess_is_one_line(tmp_path, tiny_sd):
    bad = write_pickapic(tmp_path / "bad.parquet", [row(), row(jpg_1=GARBAGE)])
    res = run_cli(*fast(tmp_path / "run", tiny_sd, bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"diffusion-dpo: error: {bad} row 1: jpg_1 cannot be decoded as an image "
                     "(cannot identify image file)"], res.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the data is known good


def _bad_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    imgs = tmp / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(imgs / "red.png")
    cases = {
        "missing column": (write_pickapic(tmp / "a.parquet", [row()], drop=("label_0",)), "missing column(s) label_0"),
        "undecodable": (write_pickapic(tmp / "b.parquet", [row(), row(jpg_0=truncated_jpeg())]),
                        "row 1: jpg_0 cannot be decoded as an image (image file is truncated"),
        "bad label": (write_pickapic(tmp / "c.parquet", [row(label_0=2.0, label_1=-1.0)]),
                      "row 0: label_0 is 2, expected 0, 0.5 or 1"),
        "empty": (write_pickapic(tmp / "d.parquet", []), "has no usable pairs: 0 rows"),
        "all ties": (write_pickapic(tmp / "e.parquet", [row(label_0=0.5)] * 2), "all 2 pairs are ties"),
        "null caption": (write_pickapic(tmp / "f.parquet", [row(), row(), row(caption=None)]),
                         "row 2: caption is null"),
    }
    (tmp / "g.jsonl").write_text('{"prompt": "p", "chosen": "imgs/red.png", "rejected": "imgs/gone.png"}\n')
    cases["missing image file"] = (tmp / "g.jsonl", "line 1: image file 'imgs/gone.png' not found")
    (tmp / "h.jsonl").write_text('{"prompt": "p", "chosen": "imgs/red.png", "rejected": "imgs/red.png"}\n{oops\n')
    cases["malformed jsonl"] = (tmp / "h.jsonl", "line 2: invalid JSON")
    return cases


def test_every_bad_data_case_is_one_line_exit_2(tmp_path, tiny_sd, capsys):
    for name, (data, expected) in _bad_cases(tmp_path).items():
        out = tmp_path / f"run-{name.replace(' ', '_')}"
        rc = main(fast(out, tiny_sd, data))
        err = capsys.readouterr().err.strip()
        assert rc == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("diffusion-dpo: error: "), (name, err)
        assert str(data) in err and expected in err, (name, err)
        assert not out.exists(), name


def test_skip_bad_rows_reports_the_count(tmp_path, tiny_sd, capsys):
    data = write_pickapic(tmp_path / "mixed.parquet", [row(), row(label_0=0.0), row(jpg_1=GARBAGE), row(),
                                                       row(label_0=0.5)])
    rc = main(fast(tmp_path / "run", tiny_sd, data, "--data.skip_bad_rows", "--data.batch_size", "1"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "5 rows, 3 pairs used, 1 ties dropped, 1 bad rows skipped" in out


@pytest.mark.parametrize("args,expected", [
    (["--bogus", "1"], "error: train: unrecognized arguments: --bogus 1 (see --help)"),
    (["--loss.beta", "0"], "loss.beta must be > 0"),
    (["--loss.beta", "high"], "bad value for 'loss.beta'"),
    (["--model.pretrained", "/no/such/model"], "model.pretrained '/no/such/model' does not exist"),
    (["--data.path", "/no/such/data.parquet"], "data.path '/no/such/data.parquet' not found"),
    (["--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
    (["--config", "/"], "config file / is a directory; give a YAML file"),
    (["--optim.name", "sgd"], "optim.name must be adamw, adamw8bit or adafactor"),
    (["--train.resume", "/no/ckpt"], "train.resume: '/no/ckpt' is not a checkpoint directory"),
    (["--model.pretrained", "someone/no_such_model"], "model.pretrained 'someone/no_such_model' is not a local"),
    (["--model.vae", "someone/no_vae"], "model.vae 'someone/no_vae' is not a local directory"),
])
def test_config_and_path_mistakes_are_one_line(tmp_path, tiny_sd, tiny_data, capsys, args, expected):
    rc = main(fast(tmp_path / "run", tiny_sd, tiny_data) + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another
@pytest.mark.parametrize("family,role", [("sd", "unet"), ("flux", "transformer")])
def test_two_cpu_processes_match_one_process_with_twice_the_batch(request, tmp_path, tiny_data, family, role):
    """DDP over gloo through `accelerate launch`: 2 processes x batch 2 reach the weights of 1 process x batch 4
    and of 1 process x batch 2 x 2 accumulation steps; metrics are averaged over processes and files are
    written once. For a UNet and for a flow-matching transformer, with a weight average (train.ema_decay)."""
    import torch
    from safetensors.torch import load_file

    tiny_sd = request.getfixturevalue(f"tiny_{family}")
    # eps = 1: Adam ~ SGD with momentum, so fp32 reduction-order noise is not amplified (see test_training)
    sgd_like = ["--optim.lr", "0.1", "--optim.adam_epsilon", "1.0", "--optim.weight_decay", "0",
                "--train.checkpointing_steps", "1",
                # final/ holds the weight average, which each DDP process keeps of its identical weights
                "--train.ema_decay", "0.5"] + (["--model.max_sequence_length", "8"] if role == "transformer" else [])
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # --multi_gpu is accelerate's name for its torch.distributed launcher; without GPUs it runs gloo on the CPU
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                          "diffusion_dpo", *fast(out, tiny_sd, tiny_data, "--data.batch_size", "2", *sgd_like)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done:") == 1
    single = tmp_path / "single"
    assert main(fast(single, tiny_sd, tiny_data, "--data.batch_size", "4", *sgd_like)) == 0
    accum = tmp_path / "accum"
    assert main(fast(accum, tiny_sd, tiny_data, "--data.batch_size", "2", "--train.gradient_accumulation_steps", "2",
                     *sgd_like)) == 0

    ddp_m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one_m = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_m] == [1, 2]
    assert ddp_m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("loss", "model_mse_w", "model_mse_l", "reward_margin"):
        assert [m[key] for m in ddp_m] == pytest.approx([m[key] for m in one_m], rel=1e-4, abs=1e-6), key
    a = load_file(out / "final" / role / "diffusion_pytorch_model.safetensors")
    for other in (single, accum):
        b = load_file(other / "final" / role / "diffusion_pytorch_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{other.name}: {k}")
    assert (out / "checkpoint-1").is_dir() and not list(out.glob("*.tmp"))


@pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another
def test_two_cpu_processes_generate_the_images_of_one(tmp_path, tiny_sd):
    """`accelerate launch -m diffusion_dpo generate` (gloo on the CPU): the two processes share the batches and
    the run is the one-process run, byte for byte, each image listed once (both processes writing every image would
    list each twice), the summary printed once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n")
    gen = ["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--seeds", "0", "1", "--steps", "2",
           "--batch-size", "2", "--device", "auto"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                          "diffusion_dpo", *gen, "--output-dir", str(two)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("6 images in") == 1
    one = tmp_path / "one"
    assert main([*gen, "--output-dir", str(one)]) == 0
    lines = (two / "manifest.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted((one / "manifest.jsonl").read_text().splitlines()) and len(lines) == 6
    assert {p.name: p.read_bytes() for p in (two / "images").iterdir()} == \
        {p.name: p.read_bytes() for p in (one / "images").iterdir()}
    assert not list(two.glob("manifest.shard-*")) and not list(two.glob(".*.tmp"))


def test_pipeline_missing_a_component_folder_is_named(tmp_path, tiny_sd, tiny_data, capsys):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "unet")
    rc = main(fast(tmp_path / "run", broken, tiny_data))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("missing component folder(s) unet/"), err


def test_resume_latest_without_checkpoints(tmp_path, tiny_sd, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(fast(out, tiny_sd, tiny_data, "--overwrite", "false")) == 0  # no checkpoint at max_steps
    rc = main(fast(out, tiny_sd, tiny_data, "--overwrite", "false", "--train.resume", "latest"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds a finished run (final) but no checkpoint to resume from" in err, err
    fresh = tmp_path / "fresh"
    assert main(fast(fresh, tiny_sd, tiny_data, "--train.resume", "latest")) == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_generate_and_compare_through_main(tmp_path, tiny_sd, capsys):
    """The evaluation commands are wired into the same entry point: success is 0, a mistake one line and 2."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for name in ("a", "b"):
        assert main(["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--seeds", "0", "--output-dir",
                     str(tmp_path / name), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    (tmp_path / "bright_reward.py").write_text(
        "import numpy as np\n"
        "def score(images, prompts):\n"
        "    return [float(np.asarray(im.convert('L')).mean()) for im in images]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--reward",
                     "bright_reward:score", "--output-dir", str(tmp_path / "cmp")]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert "win_rate" in json.dumps(result)
    capsys.readouterr()
    (tmp_path / "b" / "images").joinpath("00000_0.png").unlink()
    rc = main(["compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--reward", "bright_reward:score",
               "--output-dir", str(tmp_path / "cmp2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not found" in err, err


@pytest.mark.parametrize("args, expected", [
    (["train", "--lora.r", "3"], "train: unrecognized arguments: --lora.r 3; did you mean --lora.rank?"),
    (["train", "--train.max_step", "3"], "train: unrecognized arguments: --train.max_step 3; did you mean "
                                         "--train.max_steps?"),
    (["generate", "--model", "m", "--prompts", "p", "--output-dir", "o", "--seed", "1"],
     "generate: unrecognized arguments: --seed 1; did you mean --seeds?"),
    (["demo", "--output-dir", "d", "--fam", "sd3"], "demo: unrecognized arguments: --fam sd3; did you mean --family?"),
    (["demo"], "demo: the following arguments are required: --output-dir (see --help)"),
])
def test_abbreviated_options_are_refused_in_one_line(capsys, args, expected):
    """argparse would take a unique prefix as the option (--lora.r as --lora.rank): options are spelled out."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffusion-dpo: error: {expected}"), err


def test_both_spellings_of_every_option(tmp_path, tiny_sd, tiny_data):
    """--output-dir and --output_dir (and every other option, config flags included) work both ways; --help lists
    the documented one only."""
    from diffusion_dpo.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--output-dir", "a", "--train.max-steps", "3", "--lora.rank",
                              "2"])
    assert (vars(args)["output_dir"], vars(args)["train.max_steps"], vars(args)["lora.rank"]) == ("a", "3", "2")
    assert parser.parse_args(["generate", "--model", "m", "--prompts", "p", "--output_dir", "o",
                              "--guidance_scale", "2"]).output_dir == "o"
    assert parser.parse_args(["compare", "--a", "x", "--b", "y", "--reward", "r", "--output_dir", "o"]).output_dir == "o"
    for command in parser.command_parsers.values():  # every long option has both spellings
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and ("-" in option[2:] or "_" in option[2:]):
                    other = option[:2] + (option[2:].replace("-", "_") if "-" in option[2:]
                                          else option[2:].replace("_", "-"))
                    assert other in command._option_string_actions, (command.prog, option)
    help_text = parser.command_parsers["generate"].format_help()
    assert "--output-dir" in help_text and "--output_dir" not in help_text
    # end to end: train with the dashed spelling of its output directory
    out = tmp_path / "run"
    assert main(fast(out, tiny_sd, tiny_data)[:3] + ["--output-dir", str(out)] + fast(out, tiny_sd, tiny_data)[5:]) == 0
    assert (out / "final").is_dir()
