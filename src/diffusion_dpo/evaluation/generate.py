"""Generate images for evaluation: a model × a prompt set × seeds -> PNG files + a manifest.

    diffusion-dpo generate --model runs/dpo/final --prompts parti.tsv --seeds 0 1 --output-dir gen/dpo
    diffusion-dpo generate --model sd15 --lora runs/lora/final --prompts parti.tsv --seeds 0 1 --output-dir gen/lora

Equal terms for every model: the initial latents of image (prompt i, seed s) are drawn as

    x_T = N(0, I) of shape (C, H/f, W/f) from torch.Generator("cpu").manual_seed(s)

(C = the denoiser's latent channels, f = the VAE's downsampling factor) on the CPU, in float32, one
image at a time, and handed to the pipeline as `latents=` (in the layout the model family's pipeline
takes: FLUX's packed 2x2 tokens). So the noise depends on neither the batch size,
the device, the dtype nor the model: two models given the same prompts and seeds start from the
same x_T, and differences in their images come from the models alone. The same generator,
continuing after x_T, is passed per image for any randomness the sampler draws (ancestral / SDE
samplers), so those are batch-independent too. (Batched CPU/GPU kernels may still round the
last float bit differently for another batch size, which can move a pixel by one level; the same
settings on the same machine give byte-identical files.)

Output directory:

    run.json         the settings (model, lora, scheduler, steps, guidance, size, dtype, T5 length)
    manifest.jsonl   one line per image: prompt, prompt_index, seed, file, model, lora, scheduler,
                     steps, guidance_scale, height, width (+ category if the prompt set has one)
    images/{prompt_index:05d}_{seed}.png

Resumable: an image whose file exists and has a manifest line is not generated again. An image
is written to a temporary name and renamed, and then its manifest line is appended in one write,
so a run killed at any moment leaves only complete images and complete lines (a torn last line
is cut off on the next start). Re-running into a directory made with other settings is refused.

Several processes (`accelerate launch -m diffusion_dpo generate ...`, or `generate_on_all`): the images still
to make are cut into batches exactly as one process would cut them, and process p of n makes batches p, p + n,
..., each writing its lines to manifest.shard-<p>.jsonl; the main process then merges those into manifest.jsonl.
So every image is made in the same batch as by one process, and the files are the same bytes (same machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from diffusion_dpo.errors import UserError, is_local_path

MANIFEST = "manifest.jsonl"
SHARD_MANIFEST = "manifest.shard-{}.jsonl"  # one process's lines while several generate (merged by merge_shards)
RUN_FILE = "run.json"
IMAGE_DIR = "images"
LORA_FILE = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Short names for the usual samplers; any diffusers scheduler class name is accepted too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Settings that must agree for images in one directory to belong to one run.
RUN_KEYS = ("model", "model_revision", "lora", "scheduler", "steps", "guidance_scale", "height", "width", "dtype",
            "max_sequence_length")


def image_name(prompt_index: int, seed: int) -> str:
    """Deterministic file name of image (prompt_index, seed), relative to the run directory."""
    return f"{IMAGE_DIR}/{prompt_index:05d}_{seed}.png"


def initial_latents(seed: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Generator]:
    """x_T ~ N(0, I) of `shape` (C, h, w) from a CPU generator seeded by `seed`, and that generator
    (continued, for the sampler's own noise)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32), generator


def _check_model(model: str, revision: Optional[str] = None) -> tuple[dict, type]:
    """The checked model_index.json of `model` (local pipeline dir or hub id) and its model family; an
    unsupported family is a one-line error before anything loads."""
    from diffusion_dpo.config import ModelConfig
    from diffusion_dpo.models import family_class, read_model_index

    index = read_model_index(ModelConfig(pretrained=model, revision=revision), setting="model")
    return index, family_class(index, f"model '{model}'")


def _scheduler_class(name: str) -> type:
    import diffusers

    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)} "
                        "or a diffusers scheduler class name")
    return cls


def _load_lora(pipe: Any, lora: str, denoiser_role: str) -> None:
    """`pipe.load_lora_weights` from a directory holding pytorch_lora_weights.safetensors, a weights file,
    or a hub id; weights that fit nothing in the pipeline's denoiser (a LoRA of another family, which diffusers
    only warns about) are a one-line error."""
    path = Path(lora).expanduser()
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        elif path.is_dir():
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise UserError(f"lora '{lora}' holds no .safetensors weights file (expected {LORA_FILE})")
            pipe.load_lora_weights(str(path), weight_name=LORA_FILE if LORA_FILE in files else files[0])
        elif is_local_path(lora, (".safetensors",)):
            raise UserError(f"lora weights '{lora}' do not exist")
        else:
            pipe.load_lora_weights(lora)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - wrong base model, corrupt file, offline hub id
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"lora '{lora}': cannot load into this model: {first}") from None
    if not getattr(getattr(pipe, denoiser_role), "peft_config", None):
        raise UserError(f"lora '{lora}': none of its weights fit this model's {denoiser_role} (a LoRA made for "
                        "another model family?)")


def _dtype_keyword() -> str:
    """Recent diffusers take `dtype=` and warn on `torch_dtype=`; older ones know only `torch_dtype=`."""
    import diffusers.utils.deprecation_utils as deprecation

    return "dtype" if hasattr(deprecation, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_pipeline(model: str, lora: Optional[str] = None, scheduler: Optional[str] = None,
                  device: str = "cpu", dtype: str = "float32", revision: Optional[str] = None) -> Any:
    """The model's own pipeline class (from model_index.json, at hub `revision`), + LoRA, + another sampler; on
    `device`."""
    from diffusers import DiffusionPipeline

    from diffusion_dpo.models.components import load_pipeline_class

    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if lora is not None:
        path = Path(lora).expanduser()
        if not path.exists() and is_local_path(lora, (".safetensors",)):
            raise UserError(f"lora weights '{lora}' do not exist")  # before the minutes-long model load
    index, family = _check_model(model, revision)
    sampler = _scheduler_class(scheduler) if scheduler else None
    # no code from the checkpoint: model_index.json was checked (diffusers/transformers classes, no Auto*)
    kwargs: dict[str, Any] = {_dtype_keyword(): DTYPES[dtype], "trust_remote_code": False, "revision": revision}
    if "safety_checker" in index:
        # Evaluation scores what the model draws; a blacked-out image would score as the model's fault.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        # FLUX.2 [dev]'s PixtralProcessor loads as its tokenizer (models/loading.py)
        pipe = load_pipeline_class(DiffusionPipeline, model, index, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model '{model}': {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    if sampler is not None:
        pipe.scheduler = sampler.from_config(pipe.scheduler.config)
    if lora is not None:
        _load_lora(pipe, lora, family.denoiser_role)
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per batch
    return pipe.to(device), family


def _read_manifest(path: Path) -> dict[tuple[int, int], dict]:
    """(prompt_index, seed) -> manifest row; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    rows = {}
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[(int(row["prompt_index"]), int(row["seed"]))] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path} line {line_no}: not a manifest line") from None
    return rows


def _check_resume(out_dir: Path, settings: dict) -> None:
    """Refuse to mix settings in one directory; write run.json for a new run."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        for key in RUN_KEYS:
            if old.get(key) != settings[key]:
                raise UserError(f"{out_dir} holds a run with {key}={old.get(key)!r}, not {settings[key]!r}; "
                                "use another --output-dir")
    # atomically, under a name of this process's own: several processes of one run write it at once
    tmp = out_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, run_file)


def merge_shards(out_dir: str | Path) -> int:
    """Append the lines of every manifest.shard-<p>.jsonl in `out_dir` that manifest.jsonl lacks to it (in
    (prompt_index, seed) order, one write), then delete the shard files; return how many lines were added.
    Run by one process while no other writes there. Killed half-way, it is simply run again: lines already
    merged are not added twice."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob(SHARD_MANIFEST.format("*")))
    if not shards:
        return 0
    manifest = out_dir / MANIFEST
    done = _read_manifest(manifest)
    new: dict[tuple[int, int], dict] = {}
    for shard in shards:
        new |= {key: row for key, row in _read_manifest(shard).items() if key not in done}
    if new:
        with open(manifest, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(new[key]) + "\n" for key in sorted(new)))
    for shard in shards:
        shard.unlink()
    return len(new)


def pinned_revision(out_dir: Path, model: str, revision: Optional[str]) -> Optional[str]:
    """The commit a generation run of hub model `model` reads: the one its run.json recorded (a resume, same model
    and revision asked for), else what `revision` (default main) resolves to now (pinning). Local models: None."""
    from diffusion_dpo.pinning import Pin, is_hub_id, pin

    if not is_hub_id(model):
        return revision
    try:
        old = json.loads((Path(out_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        old = {}
    recorded = Pin("model", old.get("model"), old.get("requested_revision"), old.get("model_revision"))
    return pin("model", model, revision, previous=recorded).commit or revision


def generate_on_all(state: Any, model: str, prompts: Sequence[dict | str], seeds: Sequence[int],
                    out_dir: str | Path, **kwargs: Any) -> Path:
    """`generate` on every process of `state` (an accelerate `PartialState`), each making its share of the
    batches (`shard`), merged into one run by the main process; every process returns when the run is complete.
    Every process must call it (it waits for the others three times)."""
    if state.num_processes == 1:
        return generate(model, prompts, seeds, out_dir, **kwargs)
    from accelerate.utils import broadcast_object_list

    if state.is_main_process:
        merge_shards(out_dir)  # a killed earlier run's lines, so that every process sees the same work left
    # one process pins a hub model's commit for all (each resolving "main" could see another commit)
    shared = [pinned_revision(Path(out_dir), model, kwargs.get("revision")) if state.is_main_process else None]
    broadcast_object_list(shared)
    kwargs["commit"] = shared[0]
    state.wait_for_everyone()
    generate(model, prompts, seeds, out_dir, shard=(state.process_index, state.num_processes), **kwargs)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_shards(out_dir)
    state.wait_for_everyone()
    return Path(out_dir) / MANIFEST


def pipeline_defaults(pipe: Any, family: Any = None) -> dict[str, Any]:
    """The sampling settings a user gets from `pipe(prompt)`: the pipeline's own call defaults
    (steps, guidance scale (the family's `guidance_parameter`: Qwen-Image's true_cfg_scale), and the text length
    for pipelines that take one)."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    guidance = getattr(family, "guidance_parameter", "guidance_scale")
    defaults = {"steps": params["num_inference_steps"].default, "guidance_scale": params[guidance].default}
    if "max_sequence_length" in params:
        defaults["max_sequence_length"] = params["max_sequence_length"].default
    return defaults


def generate(model: str, prompts: Sequence[dict | str], seeds: Sequence[int], out_dir: str | Path,
             lora: Optional[str] = None, scheduler: Optional[str] = None, steps: Optional[int] = 30,
             guidance_scale: Optional[float] = 7.5, height: Optional[int] = None, width: Optional[int] = None,
             batch_size: int = 4, device: str = "cpu", dtype: str = "float32",
             max_sequence_length: Optional[int] = None, shard: tuple[int, int] = (0, 1),
             revision: Optional[str] = None, commit: Optional[str] = None) -> Path:
    """Generate image (i, s) for every prompt i and seed s that is not already done; return manifest.jsonl.

    height/width default to the model's native size (its pipeline's default); steps or guidance_scale None take
    the pipeline's own default (`pipeline_defaults`). max_sequence_length (T5 tokens; SD3 and FLUX only) defaults
    to the pipeline's: sample at the length the model was trained at (`model.max_sequence_length`).
    shard (p, n): make only batches p, p + n, ... of the images left, into manifest.shard-<p>.jsonl (module
    docstring; `generate_on_all` runs the n shards and merges them). One process (n = 1) first merges the shard
    lines a killed run of several left.
    revision: a hub model's revision (default main), pinned to its commit in run.json (`pinned_revision`), or
    `commit` when the caller pinned it already (`generate_on_all`).
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: need 0 <= p < n")
    prompts = [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise UserError("no prompts to generate")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be a non-empty list without repeats, got {seeds}")
    if batch_size < 1 or (steps is not None and steps < 1):
        raise UserError(f"batch size and steps must be positive, got {batch_size} and {steps}")
    if max_sequence_length is not None and max_sequence_length < 1:
        raise UserError(f"max sequence length must be positive, got {max_sequence_length}")
    out_dir = Path(out_dir)
    commit = commit or pinned_revision(out_dir, model, revision)
    pipe, family = load_pipeline(model, lora, scheduler, device, dtype, commit)
    defaults = pipeline_defaults(pipe, family)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    text_kwargs = {}
    if max_sequence_length is not None:
        if "max_sequence_length" not in defaults:
            raise UserError(f"max sequence length applies to models with a T5 or LLM text encoder; {family.title} "
                            "has neither")
        text_kwargs["max_sequence_length"] = max_sequence_length
    factor, multiple = family.latent_factor(pipe), family.size_multiple(pipe)
    default = family.native_size(pipe)
    height, width = height or default, width or default
    if height % multiple or width % multiple:
        raise UserError(f"height and width must be multiples of {multiple} for {family.title}, got {height}x{width}")
    settings = dict(model=model, model_revision=commit, requested_revision=revision, lora=lora,
                    scheduler=type(pipe.scheduler).__name__, steps=steps,
                    guidance_scale=float(guidance_scale), height=height, width=width, dtype=dtype,
                    max_sequence_length=defaults.get("max_sequence_length") if max_sequence_length is None
                    else max_sequence_length)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, settings)
    manifest = out_dir / MANIFEST
    if world == 1:
        merge_shards(out_dir)
    done = _read_manifest(manifest)  # while shards run, nobody writes it: every process sees the same work left
    for (i, _seed), row in done.items():
        if i < len(prompts) and row["prompt"] != prompts[i]["prompt"]:
            raise UserError(f"{manifest}: prompt {i} was {row['prompt']!r}, now {prompts[i]['prompt']!r}; "
                            "use another --output-dir for another prompt set")
    todo = [(i, s) for i in range(len(prompts)) for s in seeds
            if not ((i, s) in done and (out_dir / image_name(i, s)).is_file())]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)][rank::world]
    lines = manifest if world == 1 else out_dir / SHARD_MANIFEST.format(rank)
    shape = (family.latent_channels(pipe), height // factor, width // factor)
    with tqdm(total=sum(map(len, batches)), desc=f"generating {out_dir.name}", unit="img") as bar:
        for batch in batches:
            noise, generators = zip(*(initial_latents(s, shape) for _, s in batch))
            latents = family.pipeline_latents(torch.stack(noise)).to(device, DTYPES[dtype])  # (B, C, h, w) or packed
            with torch.no_grad():
                images = pipe(prompt=[prompts[i]["prompt"] for i, _ in batch], height=height, width=width,
                              num_inference_steps=steps, latents=latents, **family.guidance_kwargs(guidance_scale,
                                                                                                    len(batch)),
                              generator=list(generators), output_type="pil", **text_kwargs).images
            with open(lines, "a", encoding="utf-8") as f:
                for (i, s), image in zip(batch, images):
                    file = image_name(i, s)
                    tmp = out_dir / (file + ".tmp")
                    image.save(tmp, format="PNG")
                    os.replace(tmp, out_dir / file)  # atomic: a file under its final name is complete
                    if (i, s) not in done:  # an image deleted by hand keeps its old line
                        row = dict(prompt=prompts[i]["prompt"], prompt_index=i, seed=s, file=file, **settings)
                        row.update({k: v for k, v in prompts[i].items() if k not in row})  # e.g. category
                        f.write(json.dumps(row) + "\n")  # one write per whole line
                        f.flush()
            bar.update(len(batch))
    return manifest
