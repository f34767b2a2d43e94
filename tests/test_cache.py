"""The pre-encoding cache and the precomputed reference: exactness against the on-the-fly run, no frozen
encoders in training, refusals of mismatched caches as one line, resume."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ALL_FAMILIES, tiny_family
from diffusion_dpo.cache.build import build_cache as build_cache_from
from diffusion_dpo.cache.store import Cache
from diffusion_dpo.cli import main
from diffusion_dpo.errors import UserError
from diffusion_dpo.training import Trainer, train
from test_training import make_cfg, read_metrics, straight_and_resumed

# Flip on and half the captions dropped: both the flipped encodings and the empty-prompt row are exercised.
def _text_length(kind: str) -> dict:
    """The flow families' T5/LLM length at 8 tokens; the UNet families have none (refused: they would ignore it)."""
    return {} if kind.removeprefix("tiny_") in ("sd", "sdxl") else {"model__max_sequence_length": 8}


COMMON = dict(data__random_flip="true", data__proportion_empty_prompts="0.5", data__batch_size=3,
              train__max_steps=3, cache__shard_pairs=5, cache__batch_size=4)



def build_cache(cfg):
    """The cache a run's config names (the function takes the config sections it reads)."""
    return build_cache_from(cfg.model, cfg.data, cfg.cache, cfg.flow, mixed_precision=cfg.train.mixed_precision)


def open_cache(cfg) -> Cache:
    return Cache.open(cfg.model, cfg.data, cfg.cache, cfg.train.mixed_precision)

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=14, seed=3)


@pytest.fixture(scope="module")
def sd_cache(tmp_path_factory, tiny_sd, tiny_data):
    out = tmp_path_factory.mktemp("cache")
    return build_cache(make_cfg(out / "run", tiny_sd, tiny_data, cache__dir=out / "sd", **COMMON))


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


@pytest.mark.parametrize("fixture,precision", [("tiny_sdxl", "no"), ("tiny_sd3", "no"), ("tiny_flux", "no"),
                                               ("tiny_sd3", "bf16")])
def test_cached_items_equal_encoding_on_the_fly(request, tmp_path, tiny_data, fixture, precision):
    """Same keys, same draws: the cached posterior, caption encodings (or the empty prompt) and SDXL time ids are
    those the uncached path computes, in both orientations, for every family's conditioning. Under bf16 too (with a
    float32 cache, so storage rounds nothing): the VAE encodes in fp32 and the text encoders run in bf16 on both
    paths (they ran in bf16 and fp32 before, and the latents differed by 1e-2)."""
    import dataclasses

    from diffusion_dpo.cache.store import CachedPairs, cached_inputs
    from diffusion_dpo.data.items import PreferenceDataset, collate_pairs
    from diffusion_dpo.data.pairs import load_preference_pairs
    from diffusion_dpo.models import load_components
    from diffusion_dpo.randomness import item_draws, pair_noise

    cfg = make_cfg(tmp_path / "run", request.getfixturevalue(fixture), tiny_data, cache__dir=tmp_path / "cache",
                   train__mixed_precision=precision, cache__dtype="float32", **_text_length(fixture), **COMMON)
    build_cache(cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    comp = load_components(cfg.model, dtype)
    plain = PreferenceDataset(load_preference_pairs(cfg.data), cfg.data, comp.tokenizer)
    cached = CachedPairs(open_cache(cfg), cfg.data.random_flip, cfg.data.proportion_empty_prompts)
    keys = [(i, 1000 + i) for i in range(len(cached))]
    draws = [item_draws(s, True, False, 0.5) for _, s in keys]
    assert {d.flip for d in draws} == {True, False} and {d.empty_prompt for d in draws} == {True, False}
    a, b = collate_pairs([plain[k] for k in keys]), collate_pairs([cached[k] for k in keys])
    eps = pair_noise(a["sample_seed"].tolist(), comp.draw_timestep, comp.latent_shape(32), "cpu").posterior
    pixels = torch.cat([a["pixel_values"][:, 0], a["pixel_values"][:, 1]])
    expected = comp.encode_images(pixels, eps)
    ids = {k: v for k, v in a.items() if k.startswith("input_ids")}
    cond = comp.conditioning(comp.encode_prompt(ids), a["original_sizes"], a["crop_top_lefts"], 32)
    latents, cached_cond = cached_inputs(b, eps, comp, 32, torch.device("cpu"), dtype)
    # the cache's VAE batches hold other images than this one: equal up to float noise
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    fields = {f.name for f in dataclasses.fields(cond)}
    assert fields >= {"hidden_states"} and ({"added"} <= fields or {"pooled"} <= fields)
    for name in fields:  # every tensor the denoiser sees: hidden states, pooled, SDXL's time ids, FLUX's guidance
        x, y = getattr(cached_cond, name), getattr(cond, name)
        for u, v in zip(*(list(t.values()) if isinstance(t, dict) else [t] for t in (x, y))):
            assert (u is None) == (v is None), name
            if u is not None:
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)
    if fixture == "tiny_sdxl":
        assert torch.equal(cached_cond.added["time_ids"], cond.added["time_ids"])
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["sample_seed"], b["sample_seed"])


@pytest.mark.parametrize("kind", ALL_FAMILIES)
def test_cached_run_equals_uncached_run(tmp_path, request, tiny_data, kind):
    model = tiny_family(request, kind)
    # eps = 1 makes Adam ~ SGD with momentum: plain Adam would turn float noise in near-zero gradients into
    # +-lr updates, and beta = 5000 amplifies what is left; this compares the inputs, not Adam.
    common = dict(COMMON, train__max_steps=2, optim__lr="0.1", optim__adam_epsilon="1.0", optim__weight_decay="0",
                  **_text_length(kind))
    train(make_cfg(tmp_path / "plain", model, tiny_data, **common))
    # (a sample grid at the end: it loads the VAE and text encoders for the grid only)
    cached = Trainer(make_cfg(tmp_path / "cached", model, tiny_data, cache__dir=tmp_path / "cache",
                              cache__auto="true", validation__every_steps=0, validation__num_inference_steps=2,
                              validation__prompts='["a red circle"]', **common))
    # the frozen encoders are never loaded: nothing to encode with, and no parameters of theirs in memory
    assert cached.components.vae is None and cached.components.text_encoders == []
    cached.run()
    assert (tmp_path / "cached" / "samples" / "step-000002.png").is_file()
    assert cached.components.vae is None
    plain, from_cache = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached")
    assert plain[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # training moved
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert [m[key] for m in plain] == pytest.approx([m[key] for m in from_cache], rel=1e-5), key
    # beta = 5000 turns ~1e-7 relative float noise in the errors into ~1e-4 in the loss (measured: 1e-4)
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in from_cache], abs=1e-3)
    if kind in ("zimage", "qwenimage"):  # an LLM's masked encodings: stored at each caption's own length
        from safetensors import safe_open

        with safe_open(str(tmp_path / "cache" / "text-00000.safetensors"), framework="pt") as f:
            assert "hidden@tokens" in f.keys() and "length" in f.keys() and "mask" not in f.keys()


# the LoRA ranks (0: a full fine-tune) each family's precomputed reference is checked with (SDXL's path is SD's)
PRECOMPUTED_RANKS = {"sd": (0, 4), "sdxl": (), "sd3": (0,), "flux": (4,), "zimage": (4,), "flux2-klein": (0,),
                     "flux2": (4,), "qwenimage": (4,)}


@pytest.mark.parametrize("kind,rank", [(f, r) for f in ALL_FAMILIES for r in PRECOMPUTED_RANKS[f]])
def test_precomputed_reference_equals_live_reference(request, tmp_path, tiny_data, kind, rank, monkeypatch):
    """The reference errors computed ahead (other batches, no training) give the live run's losses; training
    then holds no reference copy (full) and never switches the adapters off (LoRA)."""
    model = tiny_family(request, kind)
    cache = request.getfixturevalue("sd_cache") if kind == "sd" else tmp_path / "cache"
    common = dict(COMMON, cache__dir=cache, cache__auto="true", lora__rank=rank, **_text_length(kind),
                  optim__lr="0.1" if rank == 0 else "1.0", optim__adam_epsilon="1.0", optim__weight_decay="0",
                  train__max_steps=2, cache__reference_file=tmp_path / "ref.safetensors")
    train(make_cfg(tmp_path / "live", model, tiny_data, **common))
    cfg = make_cfg(tmp_path / "pre", model, tiny_data, cache__reference="precomputed", **common)
    trainer = Trainer(cfg)
    assert (tmp_path / "ref.safetensors").is_file()
    if rank:
        unet = trainer.accelerator.unwrap_model(trainer.denoiser)
        monkeypatch.setattr(unet, "disable_adapters", lambda: pytest.fail("adapters-off forward with precomputed"))
    else:
        assert trainer.reference is None  # no frozen copy of the UNet in memory
    trainer.run()
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for key in ("ref_mse_w", "ref_mse_l", "model_mse_w", "model_mse_l"):
        assert [m[key] for m in live] == pytest.approx([m[key] for m in pre], rel=1e-5), key
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in pre], abs=1e-3)
    assert live[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("opts", [dict(loss__name="mapo", loss__beta=0.1),
                                  dict(loss__safeguard="true", cache__reference="precomputed")],
                         ids=["mapo-cache", "safeguard-precomputed"])
def test_mapo_and_the_safeguard_from_the_cache_equal_the_live_run(tmp_path, tiny_sd, tiny_data, sd_cache, opts):
    """MaPO from the cache (no reference file is made: it has no reference), and the safeguard from the cache with
    the precomputed reference: the same errors, losses and loser scales as on the fly."""
    common = dict(COMMON, train__max_steps=2, optim__lr="0.1", optim__adam_epsilon="1.0", optim__weight_decay="0",
                  **{k: v for k, v in opts.items() if k != "cache__reference"})
    train(make_cfg(tmp_path / "live", tiny_sd, tiny_data, **common))
    ref_file = tmp_path / "ref.safetensors"
    cached = dict(common, cache__dir=sd_cache, cache__reference_file=ref_file, cache__auto="true")
    train(make_cfg(tmp_path / "cached", tiny_sd, tiny_data, cache__reference=opts.get("cache__reference", "live"),
                   **cached))
    assert ref_file.is_file() == ("cache__reference" in opts)
    live, cached = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    keys = ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l") + (("loser_scale",) if "loss__safeguard" in opts
                                                                       else ())
    for key in keys:
        assert [m[key] for m in live] == pytest.approx([m[key] for m in cached], rel=1e-5), key
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in cached], abs=1e-3)


def cli_args(command: str, out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [command, "--output_dir", str(out), "--model.pretrained", str(model), "--data.path", str(data),
            "--data.resolution", "32", "--data.batch_size", "3", "--data.num_workers", "0",
            "--data.proportion_empty_prompts", "0.5", "--cache.shard_pairs", "5", "--train.max_steps", "2",
            "--train.report_to", "none", "--validation.every_steps", "-1", "--train.checkpointing_steps", "0",
            *extra]


def test_mismatches_are_refused_in_one_line(tmp_path, tiny_sd, tiny_sdxl, tiny_data, sd_cache, capsys):
    """A cache or reference file made with other settings is refused before training, naming the setting."""
    ref = tmp_path / "ref.safetensors"
    assert main(cli_args("cache", tmp_path / "unused", tiny_sd, tiny_data, "--cache.dir", str(sd_cache),
                         "--reference", "--cache.reference_file", str(ref))) == 0
    assert ref.is_file() and "up to date" in capsys.readouterr().out  # the cache itself was reused
    from diffusers import AutoencoderKL

    retrained = tmp_path / "retrained_vae"  # the same family and architecture, other VAE weights
    shutil.copytree(tiny_sd, retrained)
    vae = AutoencoderKL.from_pretrained(retrained, subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)
    vae.save_pretrained(retrained / "vae")
    cases = [
        (["--data.resolution", "64"], "was made with data.resolution = 32, this run has 64"),
        (["--model.pretrained", str(tiny_sdxl)], "was made with model family = 'sd', this run has 'sdxl'"),
        (["--model.pretrained", str(retrained)], "was made with model (VAE, text encoders, tokenizers) = "),
        (["--cache.dtype", "bfloat16"], "was made with cache.dtype = 'float32', this run has 'bfloat16'"),
        (["--data.max_pairs", "4"], "was made with data.max_pairs = None, this run has 4"),
        (["--data.random_crop"], "data.random_crop: the cache stores center crops"),
        (["--cache.dir", str(tmp_path / "empty")], "holds no cache (no manifest.json)"),
        (["--cache.reference", "precomputed", "--cache.reference_file", str(tmp_path / "nope.safetensors")],
         "nope.safetensors not found"),
        (["--cache.reference", "precomputed", "--train.seed", "1"], "was computed with train.seed = 0, this run has 1"),
        (["--cache.reference", "precomputed", "--data.proportion_empty_prompts", "0.2"],
         "was computed with data.proportion_empty_prompts = 0.5, this run has 0.2"),
        (["--cache.reference", "precomputed", "--train.max_steps", "3"],  # too short: 6 pairs held, 9 needed
         "holds reference errors for 6 pairs (2 steps on 1 process(es)), this run needs 9"),
        (["--cache.reference", "precomputed", "--data.batch_size", "4"], "this run needs 8"),
    ]
    for extra, expected in cases:
        out = tmp_path / "run"
        args = cli_args("train", out, tiny_sd, tiny_data, "--cache.dir", str(sd_cache),
                        "--cache.reference_file", str(ref))
        rc = main(args + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("diffusion-dpo: error: "), (extra, err)
        assert expected in err, (extra, err)
        assert not out.exists(), extra  # nothing written before the refusal
    # a cache without flipped encodings cannot serve a run that flips (one with them serves both)
    no_flip = tmp_path / "no_flip"
    assert main(cli_args("cache", tmp_path / "unused", tiny_sd, tiny_data, "--cache.dir", str(no_flip),
                         "--data.random_flip", "false")) == 0
    capsys.readouterr()
    assert main(cli_args("train", tmp_path / "run", tiny_sd, tiny_data, "--cache.dir", str(no_flip))) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("was made with data.random_flip = false (no flipped encodings), this run has true; rebuild "
                        "it with data.random_flip=true or set data.random_flip=false"), err
    # a file that covers the run (here: fewer steps than computed for) is accepted
    assert main(cli_args("train", tmp_path / "ok", tiny_sd, tiny_data, "--cache.dir", str(sd_cache),
                         "--cache.reference_file", str(ref), "--cache.reference", "precomputed",
                         "--train.max_steps", "1")) == 0


def test_a_seed_missing_from_the_file_fails_never_falls_back(tiny_sd, tiny_data, sd_cache, tmp_path):
    from diffusion_dpo.cache.reference import ReferenceTable, precompute_reference

    cfg = make_cfg(tmp_path / "run", tiny_sd, tiny_data, cache__dir=sd_cache, train__max_steps=1,
                   cache__reference_file=tmp_path / "ref.safetensors", **{k: v for k, v in COMMON.items()
                                                                          if k != "train__max_steps"})
    sections = (cfg.model, cfg.lora, cfg.flow, cfg.data, cfg.train, cfg.cache)
    precompute_reference(*sections)
    table = ReferenceTable.open(*sections, open_cache(cfg), 1, "cpu")
    assert len(table.seeds) == 3
    table.lookup(int(table.seeds[0]))
    with pytest.raises(UserError, match="no reference errors for the pair with sample seed 12345"):
        table.lookup(12345)


def test_resume_with_cache_and_precomputed_reference(tmp_path, tiny_sd, tiny_data, sd_cache, monkeypatch):
    """Kill after step 3 (checkpoint at 2), resume latest: bitwise the weights of the uninterrupted run. The VAE
    and the text encoder cannot even be loaded here."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    for cls in (AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("frozen encoder loaded")))
    common = dict(COMMON, cache__dir=sd_cache, cache__reference="precomputed", cache__auto="true",
                  cache__reference_file=tmp_path / "ref.safetensors", train__max_steps=4,
                  train__checkpointing_steps=2, lora__rank=4)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    from safetensors.torch import load_file

    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


@pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another
@pytest.mark.slow
def test_two_processes_with_cache_and_precomputed_reference(tmp_path, tiny_sd, tiny_data, sd_cache):
    """torchrun, 2 processes x batch 2, each looking up its own pairs' precomputed errors (computed for
    --num-processes 2 in batches of 4), matches 1 process x batch 4 with the live reference."""
    import os
    import subprocess
    import sys

    ref = tmp_path / "ref.safetensors"
    common = ["--cache.dir", str(sd_cache), "--cache.reference_file", str(ref), "--data.batch_size", "2",
              "--optim.lr", "0.1", "--optim.adam_epsilon", "1.0", "--optim.weight_decay", "0"]
    assert main(cli_args("cache", tmp_path / "unused", tiny_sd, tiny_data, *common, "--reference",
                         "--num-processes", "2")) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffusion_dpo",
                          *cli_args("train", tmp_path / "ddp", tiny_sd, tiny_data, *common, "--data.num_workers", "1",
                                    "--cache.reference", "precomputed")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert main(cli_args("train", tmp_path / "one", tiny_sd, tiny_data, *common, "--data.batch_size", "4")) == 0
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert len(ddp) == len(one) == 2
    for key in ("ref_mse_w", "ref_mse_l", "model_mse_w", "model_mse_l"):
        assert [m[key] for m in ddp] == pytest.approx([m[key] for m in one], rel=1e-5), key
    assert [m["loss"] for m in ddp] == pytest.approx([m["loss"] for m in one], abs=1e-3)


@pytest.mark.slow
def test_compile_and_channels_last_train_like_the_plain_run(tmp_path, tiny_sd, tiny_data, sd_cache, monkeypatch):
    """train.compile (traced by dynamo; the eager backend stands in for inductor, whose CPU compile takes minutes)
    and train.channels_last give the plain run's losses, and final/ keeps the UNet's parameter names."""
    from diffusers import UNet2DConditionModel

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="eager"))
    common = dict(COMMON, cache__dir=sd_cache, train__max_steps=2, optim__lr="0.1", optim__adam_epsilon="1.0",
                  optim__weight_decay="0")
    train(make_cfg(tmp_path / "plain", tiny_sd, tiny_data, **common))
    trainer = Trainer(make_cfg(tmp_path / "fast", tiny_sd, tiny_data, train__compile="true",
                               train__channels_last="true", **common))
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    assert unet._compiled_call_impl is not None and unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    final = trainer.run()
    plain, fast = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fast")
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert [m[key] for m in plain] == pytest.approx([m[key] for m in fast], rel=1e-5), key
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in fast], abs=1e-3)
    tuned = UNet2DConditionModel.from_pretrained(final, subfolder="unet")  # the usual names, no _orig_mod
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert not torch.equal(tuned.conv_in.weight, base.conv_in.weight)


def test_an_interrupted_build_resumes_after_its_finished_chunks(tmp_path, tiny_sd, tiny_data, sd_cache, monkeypatch):
    """Killed while encoding image 12 of 22 (chunks of 5: images 0-9 written): no cache.dir appears; the next build
    encodes only images 10.. and writes the files of an uninterrupted build, bit for bit (every chunk is encoded in
    the same batches whoever encodes it, and whenever)."""
    from safetensors.torch import load_file

    from diffusion_dpo.cache import build as cache_module

    original = cache_module._ImagesToEncode.__getitem__
    seen = []

    def killed_at_12(self, row):
        if row == 12 and not seen.count("resumed"):
            raise KeyboardInterrupt
        seen.append(row)
        return original(self, row)

    monkeypatch.setattr(cache_module._ImagesToEncode, "__getitem__", killed_at_12)
    cfg = make_cfg(tmp_path / "run", tiny_sd, tiny_data, cache__dir=tmp_path / "cache", **COMMON)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg)
    tmp = tmp_path / "cache.tmp"
    assert not (tmp_path / "cache").exists() and (tmp / "images-00001.safetensors").is_file()
    assert not (tmp / "images-00002.safetensors").exists()
    seen[:] = ["resumed"]
    build_cache(cfg)
    assert seen[1:] == list(range(10, 22))  # images 0-9 were not encoded again
    assert not tmp.exists()
    fresh = json.loads((sd_cache / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    for key in ("pair_files", "text_files", "image_files", "identity", "num_images"):
        assert resumed[key] == fresh[key], key
    for f in fresh["pair_files"] + fresh["text_files"] + fresh["image_files"]:
        assert (sd_cache / f["file"]).read_bytes() == (tmp_path / "cache" / f["file"]).read_bytes(), f["file"]
    assert load_file(tmp_path / "cache" / "images-00004.safetensors")["mean"].shape[0] == 2  # 22 = 4 x 5 + 2


def _shared_image_pairs(out: Path) -> Path:
    """10 pairs: every two of 5 PNG files, two of which hold the same bytes (4 distinct images), as the local
    JSONL format (a path per image)."""
    import itertools

    from PIL import Image

    from diffusion_dpo.testing.tiny_data import draw_shape

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for j, (colour, shape) in enumerate([((200, 0, 0), "circle"), ((0, 0, 200), "square"), ((0, 150, 0), "circle"),
                                         ((120, 0, 120), "square")]):
        draw_shape((32, 32), colour, shape, rng).save(out / f"{j}.png")
    shutil.copyfile(out / "0.png", out / "copy-of-0.png")
    files = ["0.png", "1.png", "2.png", "3.png", "copy-of-0.png"]
    rows = [{"prompt": f"a shape {a} {b}", "chosen": a, "rejected": b} for a, b in itertools.combinations(files, 2)]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert Image.open(out / "copy-of-0.png").tobytes() == Image.open(out / "0.png").tobytes()
    return out / "pairs.jsonl"


def test_an_image_in_several_pairs_is_encoded_and_stored_once(tmp_path, tiny_sd3, monkeypatch):
    """Images are keyed by their bytes: 10 pairs over 5 files (two of them equal) store 4 images; every cached pair
    still gives the posteriors the on-the-fly path computes for its own two images. A build killed after its
    first image chunk resumes with the same image table, encoding only the images not yet written."""
    from safetensors.torch import load_file

    from diffusion_dpo.cache import build as cache_module
    from diffusion_dpo.cache.store import CachedPairs
    from diffusion_dpo.data.items import PreferenceDataset, collate_pairs
    from diffusion_dpo.data.pairs import load_preference_pairs
    from diffusion_dpo.models import Family, load_components

    data = _shared_image_pairs(tmp_path / "data")
    opts = dict(COMMON, model__max_sequence_length=8, data__resolution=32, cache__shard_pairs=2, cache__batch_size=3)
    cfg = make_cfg(tmp_path / "run", tiny_sd3, data, cache__dir=tmp_path / "cache", **opts)
    encoded = []
    original_posterior = Family.posterior

    def counting(self, pixels):
        encoded.append(len(pixels))
        return original_posterior(self, pixels)

    monkeypatch.setattr(Family, "posterior", counting)
    build_cache(cfg)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["format"] == 3 and manifest["num_pairs"] == 10 and manifest["num_images"] == 4
    assert sum(encoded) == 4 * 2  # 4 images x 2 orientations (random_flip), each encoded once
    table = [load_file(tmp_path / "cache" / f["file"]) for f in manifest["image_files"]]
    assert [len(t["mean"]) for t in table] == [2, 2] and table[0]["mean"].shape[1] == 2  # (m, V, C, h, w)

    comp = load_components(cfg.model)
    plain = PreferenceDataset(load_preference_pairs(cfg.data), cfg.data, comp.tokenizer)
    cached = CachedPairs(open_cache(cfg), True, 0.5)
    keys = [(i, 1000 + i) for i in range(10)]
    a, b = collate_pairs([plain[k] for k in keys]), collate_pairs([cached[k] for k in keys])
    for g in range(2):  # the winner's and the loser's posterior, each as the VAE gives it for that pair's pixels
        mean, std = original_posterior(comp, a["pixel_values"][:, g])
        torch.testing.assert_close(b["latent_mean"][:, g], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["latent_std"][:, g], std, rtol=1e-5, atol=1e-5)
    assert torch.equal(a["original_sizes"], b["original_sizes"]) and torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])

    # killed while encoding image 2: the first image chunk (images 0-1) is written
    original = cache_module._ImagesToEncode.__getitem__

    def killed_at_2(self, row):
        if row == 2:
            raise KeyboardInterrupt
        return original(self, row)

    resumed_cfg = make_cfg(tmp_path / "run", tiny_sd3, data, cache__dir=tmp_path / "resumed", **opts)
    with monkeypatch.context() as m:
        m.setattr(cache_module._ImagesToEncode, "__getitem__", killed_at_2)
        with pytest.raises(KeyboardInterrupt):
            build_cache(resumed_cfg)
    assert (tmp_path / "resumed.tmp" / "images-00000.safetensors").is_file()
    encoded.clear()
    build_cache(resumed_cfg)
    again = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert again["num_images"] == 4 and encoded == [2 * 2]  # images 2 and 3, both orientations: 0 and 1 are kept
    for f in manifest["pair_files"] + manifest["image_files"]:
        assert (tmp_path / "cache" / f["file"]).read_bytes() == (tmp_path / "resumed" / f["file"]).read_bytes()


def test_a_read_fetches_only_the_orientation_it_uses(tmp_path, sd_cache, tiny_sd, tiny_data):
    """A cache with flips stores both orientations; an item reads the bytes of its own: half the posterior bytes of
    reading whole rows, and the same item as the whole rows give."""
    from diffusion_dpo.cache.store import CachedPairs

    store = open_cache(make_cfg(tmp_path / "run", tiny_sd, tiny_data, cache__dir=sd_cache, **COMMON))
    fetched = []

    class Counted:  # a shard whose reads count the bytes they copy out of the map
        def __init__(self, f):
            self.f = f

        def keys(self):
            return self.f.keys()

        def _count(self, key, t):
            fetched.append((key, t.numel() * t.element_size()))
            return t

        def row(self, key, index, sub=None):
            return self._count(key, self.f.row(key, index, sub))

        def rows(self, key, start, stop):
            return self._count(key, self.f.rows(key, start, stop))

    opened = store._file
    store._file = lambda name: Counted(opened(name))
    item = CachedPairs(store, True, 0.0)[(3, 11)]
    mean_bytes = sum(n for key, n in fetched if key == "mean")
    c, h, w = item["latent_mean"].shape[1:]
    assert mean_bytes == 2 * c * h * w * 4  # winner and loser, one orientation, float32 (both would be twice)
    from safetensors.torch import load_file

    from diffusion_dpo.randomness import item_draws

    table = {k: torch.cat([load_file(sd_cache / f["file"])[k] for f in store.manifest["image_files"]])
             for k in ("mean", "std")}  # (m, V, C, h, w)
    rows = load_file(sd_cache / store.manifest["pair_files"][0]["file"])["image"][3]  # pair 3: shard 0's 4th row
    o = 1 if item_draws(11, True, False, 0.0).flip else 0
    assert torch.equal(item["latent_mean"], table["mean"][rows, o]) and torch.equal(item["latent_std"], table["std"][rows, o])


def test_cache_dtype_auto_stores_the_dtype_training_casts_to_and_takes_any_cache(tmp_path, tiny_sd, tiny_data,
                                                                               sd_cache):
    """cache.dtype auto (the default): a build for a bf16 run stores bfloat16 (a float32 run's: float32, as
    sd_cache); an auto run opens a cache of either storage dtype; an explicit dtype refuses the other one in one line;
    the captions were encoded in the run's precision, so a float32 run refuses a bf16 run's cache and the reverse."""
    from dataclasses import replace

    from safetensors import safe_open

    cfg = make_cfg(tmp_path / "run", tiny_sd, tiny_data, cache__dir=tmp_path / "bf16", train__mixed_precision="bf16",
                   **COMMON)
    assert cfg.cache.dtype == "auto"
    build_cache_from(cfg.model, cfg.data, cfg.cache, cfg.flow, mixed_precision="bf16")
    made = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert made["identity"]["cache.dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / made["image_files"][0]["file"]), framework="pt") as f:
        assert f.get_slice("mean").get_dtype() == "BF16"
    assert json.loads((sd_cache / "manifest.json").read_text())["identity"]["cache.dtype"] == "float32"
    stored_fp32 = replace(cfg.cache, dir=str(tmp_path / "fp32"), dtype="float32")
    build_cache_from(cfg.model, cfg.data, stored_fp32, cfg.flow, mixed_precision="bf16")
    for directory in (tmp_path / "bf16", tmp_path / "fp32"):
        Cache.open(cfg.model, cfg.data, replace(cfg.cache, dir=str(directory)), "bf16")  # auto: either
    with pytest.raises(UserError, match="was made with cache.dtype = 'bfloat16', this run has 'float32'"):
        Cache.open(cfg.model, cfg.data, replace(cfg.cache, dtype="float32"), "bf16")
    text = r"was made with text encoders' dtype \(train.mixed_precision\) = '{}', this run has '{}'"
    with pytest.raises(UserError, match=text.format("bfloat16", "float32")):
        Cache.open(cfg.model, cfg.data, cfg.cache, "no")
    with pytest.raises(UserError, match=text.format("float32", "bfloat16")):
        Cache.open(cfg.model, cfg.data, replace(cfg.cache, dir=str(sd_cache)), "bf16")
    # the bf16 run trains from it (its items cast to bf16 as they are read)
    assert len(read_metrics(Path(train(cfg)).parent)) == 3


def test_a_format_2_cache_is_still_read(tmp_path, sd_cache, tiny_sd, tiny_data):
    """A cache made before the image table (each pair storing its own posteriors, format 2) gives the same items."""
    from safetensors.torch import load_file, save_file

    from diffusion_dpo.cache.store import CachedPairs

    old = tmp_path / "old"
    shutil.copytree(sd_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    table = {k: torch.cat([load_file(old / f["file"])[k] for f in manifest["image_files"]])
             for k in ("mean", "std", "crop_top_lefts", "original_sizes")}
    for f in manifest.pop("image_files"):
        (old / f["file"]).unlink()
    for f in manifest["pair_files"]:  # each pair's two images copied in, as format 2 laid them out
        pairs = load_file(old / f["file"])
        rows = pairs.pop("image")  # (n, 2)
        save_file({"mean": table["mean"][rows].transpose(1, 2).contiguous(),  # (n, V, 2, C, h, w)
                   "std": table["std"][rows].transpose(1, 2).contiguous(),
                   "crop_top_lefts": table["crop_top_lefts"][rows].transpose(1, 2).contiguous(),  # (n, V, 2, 2)
                   "original_sizes": table["original_sizes"][rows].contiguous(), **pairs}, old / f["file"])
    manifest["format"] = 2
    del manifest["num_images"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    open_at = lambda d: open_cache(make_cfg(tmp_path / "run", tiny_sd, tiny_data, cache__dir=d, **COMMON))  # noqa: E731
    new_items, old_items = CachedPairs(open_at(sd_cache), True, 0.5), CachedPairs(open_at(old), True, 0.5)
    for i in range(len(new_items)):
        a, b = new_items[(i, 7 + i)], old_items[(i, 7 + i)]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (i, key)


def test_masked_caption_encodings_are_stored_at_their_own_lengths():
    """An LLM's encodings with a mask (real tokens anywhere: right or left padding) are stored as the tokens the mask
    keeps and read back as those tokens first, zero-padded, with their mask: what conditioning keeps is unchanged."""
    from safetensors.torch import save_file

    from diffusion_dpo.cache.mapped import MappedFile
    from diffusion_dpo.cache.store import _read_ragged, pack_ragged

    hidden = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    packed = pack_ragged({"hidden": hidden * mask[..., None], "mask": mask, "pooled": torch.randn(3, 2)})
    assert packed["hidden@tokens"].shape == (8, 4) and packed["length"].tolist() == [3, 4, 1]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_file(packed, f"{tmp}/t.safetensors")
        f = MappedFile(Path(tmp) / "t.safetensors")
        for i in range(3):
            row = _read_ragged(f, i)
            k = int(mask[i].sum())
            assert row["mask"].tolist() == [1.0] * k + [0.0] * (6 - k)
            assert torch.equal(row["hidden"][row["mask"] > 0.5], hidden[i][mask[i] > 0.5])
            assert not row["hidden"][k:].any()


def test_a_mapped_shard_reads_what_safetensors_wrote(tmp_path):
    """`MappedFile` (the reader's memory map) gives back, row by row and whole, exactly what `save_file` stored: every
    dtype a cache holds, and tensors whose bytes start at offsets no wider dtype is aligned to."""
    from safetensors.torch import load_file, save_file

    from diffusion_dpo.cache.mapped import MappedFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a_odd": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g),  # 15 bytes: the rest unaligned
               "b_mean": torch.randn(4, 2, 3, 2, 2, generator=g), "c_bf16": torch.randn(4, 7, generator=g).bfloat16(),
               "d_half": torch.randn(4, 3, generator=g).half(), "e_ids": torch.arange(8).view(4, 2),
               "f_mask": torch.tensor([[True, False], [False, True], [True, True], [False, False]]),
               "g_scalar": torch.tensor(3.5)}
    save_file(tensors, tmp_path / "shard.safetensors", metadata={"rows": "4"})
    f, stored = MappedFile(tmp_path / "shard.safetensors"), load_file(tmp_path / "shard.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"rows": "4"}
    for key, t in stored.items():
        assert f.tensor(key).dtype == t.dtype and torch.equal(f.tensor(key), t)
        if t.dim():
            assert torch.equal(f.row(key, t.shape[0] - 1), t[-1]) and torch.equal(f.rows(key, 1, 3), t[1:3])
    assert torch.equal(f.row("b_mean", 2, 1), stored["b_mean"][2, 1])  # one orientation of one row
