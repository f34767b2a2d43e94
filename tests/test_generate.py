"""evaluation.generate and evaluation.prompts: same seeds -> same bytes, batch-size invariance, resume, LoRA, prompt sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FLOW_FAMILIES, tiny_family
from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.generate import generate, image_name, initial_latents, merge_shards
from diffusion_dpo.evaluation.prompts import load_prompts

PROMPTS = ["a red cat", "a blue dog", "a green tree"]
FAST = dict(steps=2, guidance_scale=5.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine torch's spinning worker
    threads slow them down a hundredfold when another process competes for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "images").glob("*.png"))}


def _manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def _max_pixel_diff(a: Path, b: Path) -> int:
    """Largest per-pixel difference over the images of two runs (same file names)."""
    names = sorted(p.name for p in (a / "images").glob("*.png"))
    assert names == sorted(p.name for p in (b / "images").glob("*.png"))
    return max(int(np.abs(np.asarray(Image.open(a / "images" / n), dtype=int)
                          - np.asarray(Image.open(b / "images" / n), dtype=int)).max()) for n in names)


def test_same_seeds_same_bytes_and_batch_size_invariance(tiny_sd, tmp_path):
    a = generate(str(tiny_sd), PROMPTS, [0, 1], tmp_path / "a", batch_size=2, **FAST).parent
    again = generate(str(tiny_sd), PROMPTS, [0, 1], tmp_path / "again", batch_size=2, **FAST).parent
    assert len(_images(a)) == 6 and _images(a) == _images(again)
    # another batch size: the same noise; batched kernels may round one float bit differently (<= 1 level)
    b = generate(str(tiny_sd), PROMPTS, [0, 1], tmp_path / "b", batch_size=3, **FAST).parent
    assert _max_pixel_diff(a, b) <= 1
    rows = _manifest(a)
    assert [(r["prompt_index"], r["seed"]) for r in rows] == [(i, s) for i in range(3) for s in (0, 1)]
    assert rows[0] == {"prompt": "a red cat", "prompt_index": 0, "seed": 0, "file": "images/00000_0.png",
                       "model": str(tiny_sd), "model_revision": None, "requested_revision": None, "lora": None,
                       "scheduler": "PNDMScheduler", "steps": 2,
                       "guidance_scale": 5.0, "height": 32, "width": 32, "dtype": "float32",
                       "max_sequence_length": None}
    assert json.loads((a / "run.json").read_text())["steps"] == 2
    images = _images(a)
    assert images["00000_0.png"] != images["00000_1.png"]  # another seed, another image


def test_initial_noise_depends_only_on_seed():
    x, _ = initial_latents(3, (4, 8, 8))
    y, _ = initial_latents(3, (4, 8, 8))
    z, _ = initial_latents(4, (4, 8, 8))
    assert torch.equal(x, y) and not torch.equal(x, z) and x.dtype == torch.float32


def test_ancestral_sampler_is_batch_invariant_and_sdxl_runs(tiny_sdxl, tmp_path):
    kw = dict(scheduler="euler_a", steps=2, guidance_scale=3.0)
    a = generate(str(tiny_sdxl), PROMPTS[:2], [5], tmp_path / "a", batch_size=1, **kw).parent
    b = generate(str(tiny_sdxl), PROMPTS[:2], [5], tmp_path / "b", batch_size=2, **kw).parent
    assert len(_images(a)) == 2 and _max_pixel_diff(a, b) <= 1
    assert _manifest(a)[0]["scheduler"] == "EulerAncestralDiscreteScheduler"


def test_resume_regenerates_only_missing_images(tiny_sd, tmp_path):
    run = generate(str(tiny_sd), PROMPTS, [0, 1], tmp_path / "r", batch_size=3, **FAST).parent
    before = _images(run)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")}
    (run / image_name(1, 1)).unlink()
    with open(run / "manifest.jsonl", "a") as f:
        f.write('{"prompt": "torn')  # a kill mid-write leaves half a line: cut off on resume
    generate(str(tiny_sd), PROMPTS, [0, 1], run, batch_size=3, **FAST)
    after = _images(run)
    assert {k: v for k, v in after.items() if k != "00001_1.png"} == \
        {k: v for k, v in before.items() if k != "00001_1.png"}
    changed = [p.name for p in (run / "images").glob("*.png") if p.stat().st_mtime_ns != mtimes[p.name]]
    assert changed == ["00001_1.png"]
    assert len(_manifest(run)) == 6  # no duplicate line for the regenerated image
    # more seeds extend the run; other settings are refused
    generate(str(tiny_sd), PROMPTS, [0, 1, 2], run, batch_size=3, **FAST)
    assert len(_manifest(run)) == 9
    with pytest.raises(UserError, match="steps=2, not 3"):
        generate(str(tiny_sd), PROMPTS, [0], run, steps=3, guidance_scale=5.0)
    with pytest.raises(UserError, match="prompt 0 was 'a red cat'"):
        generate(str(tiny_sd), ["another"], [0], run, **FAST)


def _rows(run: Path) -> list[tuple]:
    return sorted((r["prompt_index"], r["seed"], r["file"]) for r in _manifest(run))


def test_shards_make_the_same_images_as_one_process(tiny_sd, tmp_path):
    """Process p of n makes batches p, p + n, ... of what is left (each batch as one process cuts it), into its
    own shard manifest; merged, the run is the one-process run: same rows, same bytes."""
    one = generate(str(tiny_sd), PROMPTS, [0, 1, 2], tmp_path / "one", batch_size=2, **FAST).parent
    run = tmp_path / "sharded"
    generate(str(tiny_sd), PROMPTS, [0, 1, 2], run, batch_size=2, shard=(1, 3), **FAST)
    # batch 1 of [(0,0),(0,1)] [(0,2),(1,0)] [(1,1),(1,2)] [(2,0),(2,1)] [(2,2)]: shard 1 of 3 makes batches 1 and 4
    assert sorted(p.name for p in (run / "images").glob("*.png")) == ["00000_2.png", "00001_0.png", "00002_2.png"]
    assert not (run / "manifest.jsonl").exists() or not _manifest(run)
    assert len((run / "manifest.shard-1.jsonl").read_text().splitlines()) == 3
    for p in (0, 2):
        generate(str(tiny_sd), PROMPTS, [0, 1, 2], run, batch_size=2, shard=(p, 3), **FAST)
    assert merge_shards(run) == 9 and not list(run.glob("manifest.shard-*"))
    assert _rows(run) == _rows(one) and _images(run) == _images(one)
    assert merge_shards(run) == 0 and len(_manifest(run)) == 9
    with pytest.raises(ValueError, match="shard"):
        generate(str(tiny_sd), PROMPTS, [0], run, shard=(2, 2), **FAST)


def test_a_killed_sharded_run_is_finished_by_one_process(tiny_sd, tmp_path):
    """Shard lines a killed run of several processes left (one of them torn) join the manifest when one
    process resumes; it makes only what no shard finished, and nothing is listed twice."""
    one = generate(str(tiny_sd), PROMPTS, [0, 1], tmp_path / "one", batch_size=2, **FAST).parent
    run = tmp_path / "killed"
    generate(str(tiny_sd), PROMPTS, [0, 1], run, batch_size=2, shard=(0, 2), **FAST)  # shard 1 never ran
    with open(run / "manifest.shard-0.jsonl", "a") as f:
        f.write('{"prompt": "torn')
    made = {p.name: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")}
    assert sorted(made) == ["00000_0.png", "00000_1.png", "00002_0.png", "00002_1.png"]
    generate(str(tiny_sd), PROMPTS, [0, 1], run, batch_size=2, **FAST)
    assert _rows(run) == _rows(one) and _images(run) == _images(one)
    assert all((run / "images" / n).stat().st_mtime_ns == t for n, t in made.items())  # not made again
    assert not list(run.glob("manifest.shard-*"))


def test_lora_weights_load_and_change_images(tiny_sd, tmp_path):
    from diffusion_dpo.config import LoraConfig, ModelConfig
    from diffusion_dpo.models import add_lora, load_components

    components = load_components(ModelConfig(pretrained=str(tiny_sd)))
    add_lora(components.denoiser, LoraConfig(rank=4), components.default_lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in components.denoiser.named_parameters():
            if "lora_B" in name:  # B starts at zero (adapter = identity): make it do something
                p.normal_(0, 0.5)
    components.save_lora(components.denoiser, tmp_path / "lora")
    base = generate(str(tiny_sd), PROMPTS[:1], [0], tmp_path / "base", **FAST).parent
    by_dir = generate(str(tiny_sd), PROMPTS[:1], [0], tmp_path / "dir", lora=str(tmp_path / "lora"), **FAST).parent
    weights = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    by_file = generate(str(tiny_sd), PROMPTS[:1], [0], tmp_path / "file", lora=str(weights), **FAST).parent
    assert _images(by_dir) == _images(by_file) != _images(base)
    assert _manifest(by_dir)[0]["lora"] == str(tmp_path / "lora")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora="/nowhere/lora.safetensors"), "lora weights '/nowhere/lora.safetensors' do not exist"),
    (dict(scheduler="warp"), "unknown scheduler 'warp'"),
    (dict(dtype="float8"), "dtype 'float8'"),
    (dict(height=30), "multiples of 8"),
    (dict(max_sequence_length=16), "applies to models with a T5 or LLM text encoder; Stable Diffusion 1.x/2.x has neither"),
])
def test_bad_generate_input_is_one_line(tiny_sd, tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        generate(str(tiny_sd), PROMPTS[:1], [0], tmp_path / "x", **{**FAST, **kwargs})
    assert "\n" not in str(err.value)


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        generate(str(tmp_path / "no_model"), PROMPTS, [0], tmp_path / "x")
    with pytest.raises(UserError, match="no model_index.json"):
        generate(str(tmp_path), PROMPTS, [0], tmp_path / "x")


# ---------------------------------------------------------------- prompt sets

def test_text_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_prompts(f) == [{"prompt": "a cat"}, {"prompt": "a dog"}, {"prompt": "a cat"}]
    assert load_prompts(f, limit=1) == [{"prompt": "a cat"}]


def test_jsonl_prompts_as_the_project_writes_them(tmp_path):
    """Issue 35 (5): the demo's eval_prompts.jsonl and a generate manifest are prompt files too."""
    f = tmp_path / "eval_prompts.jsonl"
    f.write_text('{"prompt": "a 3", "digit": 3, "category": "digits"}\n\n'
                 '{"prompt": " a 7 ", "file": "images/00001_0.png", "seed": 0, "prompt_index": 1, "ok": true}\n')
    assert load_prompts(f) == [{"prompt": "a 3", "digit": 3, "category": "digits"}, {"prompt": "a 7"}]
    f.write_text('{"prompt": "a 3"}\n["a 7"]\n')
    with pytest.raises(UserError, match="eval_prompts.jsonl' line 2: expected an object with a non-empty"):
        load_prompts(f)
    f.write_text('{"prompt": "a 3"\n')
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        load_prompts(f)


def test_parti_tsv(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text('Prompt\tCategory\tChallenge\tNote\n'
                 'a "quoted" sign\tWorld Knowledge\tSimple Detail\t\n'
                 'two cats\tAnimals\tCounting\tsome note\n')
    assert load_prompts(f) == [
        {"prompt": 'a "quoted" sign', "category": "World Knowledge", "challenge": "Simple Detail"},
        {"prompt": "two cats", "category": "Animals", "challenge": "Counting"}]
    f.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(UserError, match="line 1: a PartiPrompts TSV needs a 'Prompt' column"):
        load_prompts(f)
    f.write_text("Prompt\tCategory\nx\ty\nonly one field\n")
    with pytest.raises(UserError, match="line 3: 1 tab-separated fields"):
        load_prompts(f)


def test_hpsv2_json(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "anime.json").write_text(json.dumps(["a girl", "a robot"]))
    (tmp_path / "bench" / "photo.json").write_text(json.dumps(["a street"]))
    assert load_prompts(tmp_path / "bench" / "anime.json") == [
        {"prompt": "a girl", "category": "anime"}, {"prompt": "a robot", "category": "anime"}]
    assert [p["category"] for p in load_prompts(tmp_path / "bench")] == ["anime", "anime", "photo"]
    obj = tmp_path / "all.json"
    obj.write_text(json.dumps({"paintings": ["a lake"]}))
    assert load_prompts(obj) == [{"prompt": "a lake", "category": "paintings"}]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n"a",\n')
    with pytest.raises(UserError, match=r"bad.json' line \d+: not valid JSON"):
        load_prompts(bad)
    bad.write_text(json.dumps(["ok", 3]))
    with pytest.raises(UserError, match="item 1 is not a non-empty string"):
        load_prompts(bad)


def test_pickapic_captions_deduplicated_in_order(tmp_path):
    from pickapic_fixtures import row, write_pickapic

    rows = [row("a cat"), row("a dog"), row("a cat"), row(""), row(None), row(" a bird ")]
    f = write_pickapic(tmp_path / "shards" / "test-00000.parquet", rows)
    expected = [{"prompt": "a cat"}, {"prompt": "a dog"}, {"prompt": "a bird"}]
    assert load_prompts(f) == expected
    assert load_prompts(tmp_path / "shards") == expected  # a directory of shards
    assert load_prompts(f, kind="pickapic", limit=2) == expected[:2]
    with pytest.raises(UserError, match="cannot read a 'caption' column"):
        write_pickapic(tmp_path / "nocap.parquet", [row()], drop=("caption",))
        load_prompts(tmp_path / "nocap.parquet")


def test_prompt_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(UserError, match="cannot tell its kind"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(UserError, match="unknown prompt kind 'csv'"):
        load_prompts(tmp_path / "p.csv", kind="csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_flow_families_generate_the_pipelines_own_images_byte_identically(request, tmp_path, family):
    """x_T from the seed alone, handed over in the family's layout (FLUX.1, Qwen-Image: packed; FLUX.2: patchified):
    the images are the pipeline's own for that seed, the same bytes on a rerun, and within one level for another
    batch size."""
    from diffusers import DiffusionPipeline

    from diffusion_dpo.models.components import load_pipeline_class

    model = str(tiny_family(request, family))
    kw = dict(steps=2, guidance_scale=3.0, height=32, width=32)
    a = generate(model, PROMPTS[:2], [0, 1], tmp_path / "a", batch_size=2, **kw).parent
    again = generate(model, PROMPTS[:2], [0, 1], tmp_path / "again", batch_size=2, **kw).parent
    assert len(_images(a)) == 4 and _images(a) == _images(again)
    b = generate(model, PROMPTS[:2], [0, 1], tmp_path / "b", batch_size=1, **kw).parent
    assert _max_pixel_diff(a, b) <= 1
    pipe = load_pipeline_class(DiffusionPipeline, model, json.loads((Path(model) / "model_index.json").read_text()))
    own = pipe(prompt=PROMPTS[1], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
               generator=torch.Generator().manual_seed(1)).images[0]
    ours = np.asarray(Image.open(b / image_name(1, 1)), dtype=int)
    assert np.abs(ours - np.asarray(own, dtype=int)).max() <= 1


def test_pipeline_defaults_and_the_t5_length(tiny_sd3, tmp_path):
    """steps/guidance None are the pipeline's own call defaults (what `pipe(prompt)` gives), recorded in run.json;
    max_sequence_length reaches the pipeline (the image equals its own call at that length) and is recorded."""
    from diffusers import DiffusionPipeline

    kw = dict(height=32, width=32)
    short = generate(str(tiny_sd3), PROMPTS[:1], [3], tmp_path / "short", steps=2, guidance_scale=3.0,
                     max_sequence_length=8, **kw).parent
    assert _manifest(short)[0]["max_sequence_length"] == 8
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd3))
    own = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=3.0, max_sequence_length=8,
               generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert np.abs(np.asarray(Image.open(short / image_name(0, 3)), dtype=int) - np.asarray(own, dtype=int)).max() <= 1
    default_length = generate(str(tiny_sd3), PROMPTS[:1], [3], tmp_path / "long", steps=2, guidance_scale=3.0,
                              **kw).parent
    assert _manifest(default_length)[0]["max_sequence_length"] == 256
    assert _images(default_length) != _images(short)  # T5's padding is attended: the length changes the image
    run = json.loads((generate(str(tiny_sd3), PROMPTS[:1], [3], tmp_path / "defaults", steps=None,
                               guidance_scale=None, **kw).parent / "run.json").read_text())
    assert (run["steps"], run["guidance_scale"], run["max_sequence_length"]) == (28, 7.0, 256)


def test_a_lora_of_another_family_is_refused(tiny_sd, tiny_flux, tmp_path):
    """diffusers only warns when no weight of a LoRA fits the pipeline (and the images stay the base's)."""
    from diffusion_dpo.config import LoraConfig, ModelConfig
    from diffusion_dpo.models import add_lora, load_components

    sd = load_components(ModelConfig(pretrained=str(tiny_sd)))
    add_lora(sd.denoiser, LoraConfig(rank=4), sd.default_lora_targets)
    sd.save_lora(sd.denoiser, tmp_path / "sd_lora")
    with pytest.raises(UserError, match="none of its weights fit this model's transformer"):
        generate(str(tiny_flux), PROMPTS[:1], [0], tmp_path / "x", lora=str(tmp_path / "sd_lora"), height=32,
                 width=32, steps=1)


def test_qwenimage_guidance_is_its_true_cfg_with_a_negative_prompt(tiny_qwenimage, tmp_path):
    """Qwen-Image's guidance is true_cfg_scale (its guidance_scale is for distilled checkpoints and is ignored):
    unset, the pipeline's own 4.0 is recorded and applied (a negative prompt given, so the pipeline runs it); 1.0
    turns it off, and the images differ."""
    kw = dict(steps=2, height=32, width=32, max_sequence_length=256)  # the byte-level tiny tokenizer: the system
    # prompt alone fills the first ~130 tokens after the template's 34
    default = generate(str(tiny_qwenimage), PROMPTS[:1], [0], tmp_path / "default", guidance_scale=None, **kw).parent
    assert json.loads((default / "run.json").read_text())["guidance_scale"] == 4.0
    off = generate(str(tiny_qwenimage), PROMPTS[:1], [0], tmp_path / "off", guidance_scale=1.0, **kw).parent
    assert _images(default) != _images(off)
