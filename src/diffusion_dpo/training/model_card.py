"""final/README.md: the model card of a training run, written beside the weights (and pushed with them).

The metadata block is what the hub indexes: the base model, `library_name: diffusers`, and the tags diffusers' own
training scripts write (text-to-image, diffusers, diffusers-training, the family's, lora + template:sd-lora for
adapters). The body says what was trained on what, with which objective and beta (and its convention), for how long,
at which effective batch and learning rate, shows the last validation grid (copied into final/) and how to load it.
Built with huggingface_hub's ModelCard offline: nothing is fetched.

The card is published, so it names no local path: a hub id (the base model, the data) is written as itself, a
local directory or file as its basename only; a local base model is left out of the metadata (base_model must be a
hub id).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffusion_dpo.config import Config
from diffusion_dpo.errors import is_local_path

GRID_FILE = "validation_grid.png"
BETA_CONVENTION = ("the official DiffusionDPO code's convention: inside = -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l)), "
                   "each error the mean over all latent elements (diffusers' SD1.5 DPO script's beta is half of "
                   "this one; its SDXL script's is the same)")


@dataclass
class RunFacts:
    """What the card reports that the config alone does not say."""

    family_title: str  # "Stable Diffusion XL"
    family_tags: tuple[str, ...]  # ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    pipeline_class: str  # "StableDiffusionXLPipeline"
    pairs: Optional[int]  # usable pairs in the data (None: streamed, not counted)
    steps: int  # optimizer steps taken
    skipped_steps: int
    pairs_per_step: int  # effective batch: per-device batch x accumulation x processes
    lr: float  # after scale_lr
    grid: Optional[Path] = None  # the last validation grid, if any


def is_local(spec: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when `spec` names a local directory or file rather than a hub id (as the loaders tell them apart)."""
    return Path(spec).expanduser().exists() or is_local_path(spec, suffixes)


def public_name(spec: str, suffixes: tuple[str, ...] = ()) -> str:
    """`spec` as a published card may name it: a hub id as itself, a local path as its basename."""
    return basename(spec) if spec and is_local(spec, suffixes) else spec


def basename(path: str | Path) -> str:
    """The last part of a local path ('runs/x/' -> 'x', '.' -> the working directory's name)."""
    return Path(os.path.abspath(os.path.expanduser(path))).name or "a local directory"


def at_commit(spec: Optional[str], revision: Optional[str]) -> str:
    """", commit `sha`" for a hub source read at a revision (the run pins hub sources to commits), else ""."""
    return f", commit `{revision}`" if spec and revision and not is_local(spec) else ""


def tags(cfg: Config, facts: RunFacts) -> list[str]:
    """The card's tags: diffusers' training-script set for this family and adapter type, then ours."""
    out = ["text-to-image", "diffusers", "diffusers-training", *facts.family_tags]
    if cfg.lora.rank > 0:
        out += ["lora", "template:sd-lora"]
    return out + ["diffusion-dpo", cfg.loss.name]


def card_text(cfg: Config, facts: RunFacts, repo_id: Optional[str] = None) -> str:
    """The whole README.md (metadata + body) as a string."""
    from huggingface_hub import ModelCard, ModelCardData

    from diffusion_dpo.data.pairs import LOCAL_SUFFIXES

    lora = cfg.lora.rank > 0
    what = f"LoRA (rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank:g})" if lora else "full fine-tune"
    name = repo_id or basename(cfg.output_dir)
    base = public_name(cfg.model.pretrained)  # published: a local path only as its basename
    pairs_from = public_name(cfg.data.path, LOCAL_SUFFIXES + (".parquet", ".arrow")) or "an in-memory dataset"
    data = ModelCardData(base_model=None if is_local(cfg.model.pretrained) else cfg.model.pretrained,
                         library_name="diffusers", tags=tags(cfg, facts), inference=True)
    from diffusion_dpo.training.losses import LOSSES

    spec = LOSSES[cfg.loss.name]
    rows = [
        ("base model", f"`{base}` ({facts.family_title}{at_commit(cfg.model.pretrained, cfg.model.revision)})"),
        ("method", f"{spec.title}" + (" with the winner safeguard (Diffusion-SDPO, mu "
                                      f"{cfg.loss.safeguard_mu:g})" if cfg.loss.safeguard else "") + f", {what}"),
        ("preference data", f"`{pairs_from}` ({'streamed' if facts.pairs is None else f'{facts.pairs} pairs used'}{at_commit(cfg.data.path, cfg.data.revision)})"),
        ("beta", "not used (SFT)" if cfg.loss.name == "sft" else
         f"{cfg.loss.beta:g}, MaPO's beta_mapo (the weight of its margin term; no reference)" if cfg.loss.name == "mapo"
         else f"{cfg.loss.beta:g}, in {BETA_CONVENTION}"),
        ("label smoothing", f"{cfg.loss.label_smoothing:g}"),
        ("steps", f"{facts.steps}" + (f" ({facts.skipped_steps} skipped)" if facts.skipped_steps else "")),
        ("effective batch", f"{facts.pairs_per_step} pairs per step"),
        ("learning rate", f"{facts.lr:g} ({cfg.optim.name}, {cfg.optim.lr_scheduler}, "
                          f"{cfg.optim.lr_warmup_steps} warm-up steps)"),
        ("resolution", f"{cfg.data.resolution} px"),
        ("precision", cfg.train.mixed_precision),
        ("seed", f"{cfg.train.seed}"),
    ]
    for what_, spec_, revision in (("VAE", cfg.model.vae, cfg.model.vae_revision),
                                   ("reference model", cfg.model.reference, cfg.model.reference_revision)):
        if spec_:
            rows.insert(1, (what_, f"`{public_name(spec_)}`{at_commit(spec_, revision)}"))
    if cfg.train.ema_decay > 0:
        rows.append(("weights", f"the exponential moving average of the trained weights (decay {cfg.train.ema_decay:g})"))
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    if lora:
        pinned = f", revision=\"{cfg.model.revision}\"" if at_commit(cfg.model.pretrained, cfg.model.revision) else ""
        usage = (f"pipe = {facts.pipeline_class}.from_pretrained(\"{base}\"{pinned})\n"
                 f"pipe.load_lora_weights(\"{name}\")")
    else:
        usage = f"pipe = {facts.pipeline_class}.from_pretrained(\"{name}\")"
    grid = (f"\n## Validation samples\n\nReference (the base) and the tuned model on the same prompts and seeds, at "
            f"step {facts.steps}:\n\n![validation grid]({GRID_FILE})\n" if facts.grid is not None else "")
    body = f"""# {name}

A {what} of `{base}` aligned with preference pairs by the diffusion-dpo library
({spec.title}).

## Training

{table}

The run's full configuration is in `config.yaml` of its output directory; every step's metrics in `metrics.jsonl`.
{grid}
## Use

```python
from diffusers import {facts.pipeline_class}

{usage}
image = pipe(prompt="a photo of a cat").images[0]
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))  # parsed once: the metadata must be valid


def write_card(directory: Path, cfg: Config, facts: RunFacts, repo_id: Optional[str] = None) -> Path:
    """Write `directory`/README.md (and copy the last validation grid beside it); return the card's path."""
    if facts.grid is not None and facts.grid.is_file():
        shutil.copyfile(facts.grid, directory / GRID_FILE)
    else:
        facts.grid = None
    path = directory / "README.md"
    path.write_text(card_text(cfg, facts, repo_id), encoding="utf-8")
    return path
