"""final/README.md: the model card of a training run, written beside the weights (and pushed with them).

The metadata block is what the hub indexes: the base model, `library_name: diffusers`, and the tags diffusers' own
training scripts write (text-to-image, diffusers, diffusers-training, the family's, lora + template:sd-lora for
adapters). The body says what was trained on what, with which objective and beta (and its convention), for how long,
at which effective batch and learning rate, shows the last validation grid (copied into final/) and how to load it.
Built with huggingface_hub's ModelCard offline: nothing is fetched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffusion_dpo.config import Config

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
    pairs: int  # usable pairs in the data
    steps: int  # optimizer steps taken
    skipped_steps: int
    pairs_per_step: int  # effective batch: per-device batch x accumulation x processes
    lr: float  # after scale_lr
    grid: Optional[Path] = None  # the last validation grid, if any


def tags(cfg: Config, facts: RunFacts) -> list[str]:
    """The card's tags: diffusers' training-script set for this family and adapter type, then ours."""
    out = ["text-to-image", "diffusers", "diffusers-training", *facts.family_tags]
    if cfg.lora.rank > 0:
        out += ["lora", "template:sd-lora"]
    return out + ["diffusion-dpo", cfg.loss.name]


def card_text(cfg: Config, facts: RunFacts, repo_id: Optional[str] = None) -> str:
    """The whole README.md (metadata + body) as a string."""
    from huggingface_hub import ModelCard, ModelCardData

    lora = cfg.lora.rank > 0
    what = f"LoRA (rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank:g})" if lora else "full fine-tune"
    name = repo_id or Path(cfg.output_dir).name
    data = ModelCardData(base_model=cfg.model.pretrained, library_name="diffusers", tags=tags(cfg, facts),
                         inference=True)
    from diffusion_dpo.losses import LOSSES

    spec = LOSSES[cfg.loss.name]
    rows = [
        ("base model", f"`{cfg.model.pretrained}` ({facts.family_title})"),
        ("method", f"{spec.title}" + (" with the winner safeguard (Diffusion-SDPO, mu "
                                      f"{cfg.loss.safeguard_mu:g})" if cfg.loss.safeguard else "") + f", {what}"),
        ("preference data", f"`{cfg.data.path or 'an in-memory dataset'}` ({facts.pairs} pairs used)"),
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
    if cfg.train.ema_decay > 0:
        rows.append(("weights", f"the exponential moving average of the trained weights (decay {cfg.train.ema_decay:g})"))
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    if lora:
        usage = (f"pipe = {facts.pipeline_class}.from_pretrained(\"{cfg.model.pretrained}\")\n"
                 f"pipe.load_lora_weights(\"{name}\")")
    else:
        usage = f"pipe = {facts.pipeline_class}.from_pretrained(\"{name}\")"
    grid = (f"\n## Validation samples\n\nReference (the base) and the tuned model on the same prompts and seeds, at "
            f"step {facts.steps}:\n\n![validation grid]({GRID_FILE})\n" if facts.grid is not None else "")
    body = f"""# {name}

A {what} of `{cfg.model.pretrained}` aligned with preference pairs by the diffusion-dpo library
({spec.title}).

## Training

{table}

The run's full configuration is in `config.yaml` of its output directory; every step's metrics in `metrics.jsonl`.
{grid}
## Use

```python
from diffusers import {facts.pipeline_class}

{usage}
image = pipe("a photo of a cat").images[0]
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
