"""`diffusion-dpo iterate`: on-policy rounds of Diffusion-DPO, the model aligned on its own samples.

    diffusion-dpo iterate --config configs/iterate_sd15_lora.yaml --output_dir runs/online

Round r = 1..R, each in OUT/round-<r>/, each stage built from the library's own commands:

    samples/      `generate`: the current policy, K = iterate.samples_per_prompt images per training prompt at seeds
                  iterate.seed + (r-1)K ... + rK - 1 (in the manifest), at the training resolution
    labels.jsonl  the training reward (`iterate.reward`, as `relabel` takes it) of every sample
    pairs/        Pick-a-Pic parquet by `iterate.pairing` (pairing.py), both scores kept; pairs.json: counts
    train/        `train` continuing the policy: a full fine-tune starts from round r-1's final/ (model.pretrained),
                  LoRA from its adapters (lora.init_from); the reference is round r-1's policy (the round's own start,
                  default: flow_grpo's refreshed reference) or the base (`iterate.reference base`: model.reference)
    eval/         `generate` on the held-out prompts and seeds, `compare` with the base and with round r-1
                  (round 1: with the start), under the training reward and `iterate.heldout_rewards`
    round.json    the round's summary, written last: it marks the round done

OUT/eval/base (and OUT/eval/start when iterate.start is set) hold those models' evaluation images, made once.
OUT/iterate.json holds the settings; report.json, report.md and report.png (iterate_report.py) are rewritten after
every round: per-round win rates against the base and the round before with 95% intervals, the training reward
beside the held-out rewards (their gap is the over-optimisation), diversity against the base's, and the best round
by the held-out mean ("best": the stop rule ends the rounds, but the best model need not be the last).

Resume. Every output appears under its final name only once complete (generate's per-image renames, temporary
files renamed, train's checkpoints and final/), so rerunning the same command skips what is done and continues the
first unfinished stage; a killed training continues from its last checkpoint (train.checkpointing_steps) or starts
that round's training over. Each stage is deterministic on one machine, so the last round's weights equal those of
an uninterrupted run, bit for bit. Raising iterate.rounds continues a finished run; any other change of settings
in an existing OUT is refused (`overwrite: true` starts over).

Several processes (`accelerate launch -m diffusion_dpo iterate ...`): sampling (the round's samples and the
evaluation images), scoring and training run on all of them, the samples split by batch as `generate` splits them
(generate.generate_on_all: the same images as one process makes), the images to score split in chunks
(compare.Scorer.fill: each process scores its share, the main process appends them all to the score caches);
then the main process alone reads those scores to write the labels, pairs and comparisons (seconds).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from omegaconf import OmegaConf

from diffusion_dpo.training.checkpoint import list_checkpoints
from diffusion_dpo.config import Config, check_config
from diffusion_dpo.training.losses import get_loss
from diffusion_dpo.errors import UserError
from diffusion_dpo.iterate_report import write_text_atomic
from diffusion_dpo.pinning import pin_once, write_pins

SETTINGS_FILE = "iterate.json"
REWARD_PINS_FILE = "reward_pins.json"  # {hub id: commit} the rewards' weights are read at
ROUND_FILE = "round.json"
# Settings that may change between invocations of one run: how many rounds, when to stop, how it is logged.
VOLATILE = ("output_dir", "overwrite", "iterate.rounds", "iterate.stop_patience", "iterate.stop_min_delta",
            "train.report_to", "train.tracker_project", "train.run_name", "train.resume", "data.num_workers",
            "train.push_to_hub")
GEN_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    """The JSON object in `path`, or {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def _check_settings(out: Path, cfg: Config) -> None:
    """Refuse an OUT made by other settings (naming the first one), or one that is not an iterate run; start over
    with `overwrite`. Writes iterate.json for a new run."""
    settings = {k: v for k, v in _flat(cfg).items() if k not in VOLATILE}
    file = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file")
    if file.is_file() and cfg.overwrite:
        for path in out.iterdir():  # only an iterate run's own directory is ever cleared
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif file.is_file():
        old = json.loads(file.read_text())
        for key in [*settings, *(k for k in old if k not in settings)]:
            if old.get(key) != settings.get(key):
                raise UserError(f"output_dir '{out}' holds an iterate run made with {key} = {old.get(key)!r}, not "
                                f"{settings.get(key)!r}; use another output_dir, or overwrite: true to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"output_dir '{out}' holds files that are not an iterate run's; choose an empty or new one")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(file, settings)


@dataclass(frozen=True)
class Policy:
    """A model as `generate` loads it: a pipeline (model) and optionally LoRA weights for it."""

    model: str
    lora: Optional[str] = None


class Rounds:
    """One `iterate` run: the settings, the loaded rewards, the prompts, and a method per stage."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        from diffusion_dpo.evaluation.compare import Scorer, parse_rewards
        from diffusion_dpo.processes import process_state
        from diffusion_dpo.models import describe
        from diffusion_dpo.evaluation.prompts import load_prompts
        from diffusion_dpo.evaluation.rewards.common import preset_pins

        cfg = check_config(cfg, iterate=True)  # a Config built in code is checked as a YAML one is
        self.cfg, self.it, self.log = cfg, cfg.iterate, log
        self.out = Path(cfg.output_dir)
        self.state = process_state(cfg.train.process_group_timeout_minutes)
        self.main = self.state.is_main_process
        self.lora = cfg.lora.rank > 0
        # Everything a round needs is checked before the first image: the model, the start, both prompt sets, the
        # rewards (loaded: a reward that cannot load fails here), the output directory.
        _, self.family = describe(cfg.model)
        self.base = cfg.model.pretrained
        self.start = self._check_start(self.it.start) if self.it.start else None
        self.prompts = load_prompts(self.it.prompts)
        self.eval_prompts = load_prompts(self.it.eval_prompts)
        self.specs = parse_rewards([self.it.reward, *self.it.heldout_rewards])
        self.train_label = self.specs[0].label
        self.heldout_label = self.specs[1].label if len(self.specs) > 1 else self.train_label
        # Every process loads the rewards (each scores its share of the images: `Scorer.fill`), at the commits the
        # main process reads them at: a resumed run's, else the ones it resolves now.
        if self.main and not cfg.overwrite:  # a resumed run reads the reward weights at the commits it began with
            preset_pins(_read_json(self.out / REWARD_PINS_FILE))
        if self.main:
            self.scorer = Scorer(self.specs, device=str(self.state.device))
            _check_settings(self.out, cfg)
            _write_json(self.out / REWARD_PINS_FILE, {k: v for r in self.scorer.rewards.values()
                                                      for k, v in sorted(r.commits.items())})
        self.state.wait_for_everyone()
        if not self.main:
            preset_pins(_read_json(self.out / REWARD_PINS_FILE))
            self.scorer = Scorer(self.specs, device=str(self.state.device))
        # the base model (and a hub reference) read at one commit for every round, resumes included
        self.pins = pin_once(cfg, self.out)
        if self.main:
            write_pins(self.out, self.pins)
        self.state.wait_for_everyone()

    # ------------------------------------------------------------------ models
    def _check_start(self, start: str) -> Policy:
        from diffusion_dpo.config import ModelConfig
        from diffusion_dpo.models import family_class, read_model_index
        from diffusion_dpo.models.lora import lora_file

        if self.lora:
            lora_file(start, "iterate.start")
            return Policy(self.base, start)
        index = read_model_index(ModelConfig(pretrained=start), "iterate.start")
        if family_class(index, f"iterate.start '{start}'") is not self.family:
            raise UserError(f"iterate.start '{start}' is not a {self.family.title} pipeline like model.pretrained")
        return Policy(start)

    def policy_before(self, r: int) -> Policy:
        """The model round r samples with and trains from: round r-1's output, the start, or the base."""
        if r > 1:
            final = str(round_dir(self.out, r - 1) / "train" / "final")
            return Policy(self.base, final) if self.lora else Policy(final)
        return self.start or Policy(self.base)

    def _generate(self, policy: Policy, prompts: list[dict], seeds: list[int], out: Path) -> None:
        """`generate` into `out` on every process, unless it is complete already (a resumed run need not load the
        model for it). Every process calls it."""
        from diffusion_dpo.evaluation.compare import load_run
        from diffusion_dpo.evaluation.generate import MANIFEST, generate_on_all

        if (out / MANIFEST).is_file():
            try:
                if len(load_run(out)) == len(prompts) * len(seeds):
                    return
            except UserError:  # e.g. an image deleted by hand: generate redoes it
                pass
        it = self.it
        revision = self.cfg.model.revision if policy.model == self.base else None  # the base's pinned commit
        generate_on_all(self.state, policy.model, prompts, seeds, out, lora=policy.lora, revision=revision,
                        scheduler=it.scheduler,
                        steps=it.steps, guidance_scale=it.guidance_scale, height=self.cfg.data.resolution,
                        width=self.cfg.data.resolution, batch_size=it.batch_size, device=str(self.state.device),
                        dtype=GEN_DTYPES[self.cfg.train.mixed_precision],
                        max_sequence_length=self.cfg.model.max_sequence_length)

    def sample_seeds(self, r: int) -> list[int]:
        k = self.it.samples_per_prompt
        return [self.it.seed + (r - 1) * k + j for j in range(k)]

    # ------------------------------------------------------------------ stages
    def sample(self, r: int) -> Path:
        """The round's samples (every process)."""
        gen = round_dir(self.out, r) / "samples"
        if not (round_dir(self.out, r) / "pairs.json").is_file():  # the samples are read only to make the pairs
            self._generate(self.policy_before(r), self.prompts, self.sample_seeds(r), gen)
        return gen

    def label(self, r: int, samples: Path) -> Path:
        """labels.jsonl: every sample's training reward (file, prompt_index, seed, score); every process scores its
        share, the main process writes the file."""
        from diffusion_dpo.evaluation.compare import load_run
        from diffusion_dpo.processes import decide_once

        file = round_dir(self.out, r) / "labels.jsonl"
        if decide_once(self.state, lambda: file.is_file()):
            return file
        self.scorer.fill(self.state, samples, only=[self.train_label])
        if self.main:
            rows = load_run(samples)
            scores = self.scorer(samples, rows, [self.train_label])[self.train_label]
            write_text_atomic(file, "".join(json.dumps({"file": row["file"], "prompt_index": row["prompt_index"],
                                                        "seed": row["seed"], "score": float(s)}) + "\n"
                                            for row, s in zip(rows, scores)))
        return file

    def pair(self, r: int, samples: Path, labels: Path) -> dict:
        from diffusion_dpo.evaluation.compare import load_run
        from diffusion_dpo.pairing import make_pairs, write_pairs

        rd = round_dir(self.out, r)
        summary_file = rd / "pairs.json"
        if summary_file.is_file():
            return json.loads(summary_file.read_text())
        rows = load_run(samples)
        scores = {row["file"]: row["score"] for row in map(json.loads, labels.read_text().splitlines())}
        pairs = make_pairs(rows, [scores[row["file"]] for row in rows], self.it.pairing, self.it.margin)
        need = self.cfg.data.batch_size * self.state.num_processes
        if len(pairs) < need:
            raise UserError(f"round {r}: {len(pairs)} pairs from {len(self.prompts)} prompts x "
                            f"{self.it.samples_per_prompt} samples (scores closer than iterate.margin "
                            f"{self.it.margin} give none), fewer than one batch ({need}); lower the margin or add "
                            "prompts or samples")
        write_pairs(samples, pairs, scores, rd / "pairs", "policy", r)
        summary = {"pairs": len(pairs), "prompts": len(self.prompts),
                   "prompts_with_a_pair": len({p.prompt_index for p, _, _ in pairs}),
                   "mean_margin": float(np.mean([p.margin for p, _, _ in pairs])),
                   "train_reward_mean": float(np.mean(list(scores.values())))}
        _write_json(summary_file, summary)
        return summary

    def train_config(self, r: int) -> Config:
        """Round r's `train` config: the user's, continuing the policy, on the round's pairs."""
        cfg = copy.deepcopy(self.cfg)
        rd = round_dir(self.out, r)
        start = self.policy_before(r)
        cfg.output_dir = str(rd / "train")
        cfg.data.path = str(rd / "pairs")
        cfg.data.unpaired = get_loss(cfg.loss.name).unpaired  # kto: each pair's best and worst as two thumbs
        # continue a killed round's last checkpoint, else start the round's training over
        cfg.overwrite = True
        cfg.train.resume = "latest" if list_checkpoints(Path(cfg.output_dir)) else None
        cfg.train.seed = self.cfg.train.seed + r - 1  # another noise stream per round
        cfg.train.push_to_hub = None
        cfg.train.run_name = f"{self.cfg.train.run_name or self.out.resolve().name}-round-{r}"
        if self.lora:
            cfg.model.pretrained, cfg.lora.init_from = self.base, start.lora
        else:
            cfg.model.pretrained = start.model
        # the base is read at the commit pinned when the run began (a round's model is a local folder: no commit)
        cfg.model.revision = self.cfg.model.revision if cfg.model.pretrained == self.base else None
        # iterate.reference only matters to a loss with a reference (mapo and sft have none)
        needs_reference = get_loss(cfg.loss.name).needs_reference
        cfg.model.reference = self.base if self.it.reference == "base" and needs_reference else None
        cfg.model.reference_revision = self.cfg.model.revision if cfg.model.reference else None
        if self.cfg.cache.dir:  # a cache per round: each round has new pairs
            cfg.cache.dir, cfg.cache.auto, cfg.cache.reference_file = str(rd / "cache"), True, None
        return cfg

    def train(self, r: int) -> Path:
        from diffusion_dpo.training.trainer import train

        final = round_dir(self.out, r) / "train" / "final"
        if final.is_dir():
            return final
        return train(self.train_config(r))

    def base_eval(self) -> dict[str, Path]:
        """The evaluation images of the base (and of the start), made once (every process)."""
        gens = {"base": self.out / "eval" / "base"}
        self._generate(Policy(self.base), self.eval_prompts, self.it.eval_seeds, gens["base"])
        if self.start is not None:
            gens["start"] = self.out / "eval" / "start"
            self._generate(self.start, self.eval_prompts, self.it.eval_seeds, gens["start"])
        return gens

    def eval_images(self, r: int) -> Path:
        """Round r's evaluation images: its trained policy on the held-out prompts and seeds (every process)."""
        gen = round_dir(self.out, r) / "eval" / "gen"
        self._generate(self.policy_before(r + 1), self.eval_prompts, self.it.eval_seeds, gen)
        return gen

    def evaluate(self, r: int, gens: dict[str, Path]) -> dict:
        """Round r's comparisons with the base and with round r-1, and its diversity (the main process, once every
        process has made `eval_images`)."""
        from diffusion_dpo.evaluation.diversity import diversity
        from diffusion_dpo.evaluation.compare import compare

        rd = round_dir(self.out, r)
        gen = rd / "eval" / "gen"
        previous = round_dir(self.out, r - 1) / "eval" / "gen" if r > 1 else gens.get("start", gens["base"])
        labels = [s.label for s in self.specs]
        result = {}
        for name, other in (("vs_base", gens["base"]), ("vs_previous", previous)):
            report = compare(gen, other, labels, rd / "eval" / name, scorer=self.scorer)
            result[name] = {label: _brief(report["rewards"][label]) for label in labels}
        result["means"] = {label: r_["mean_a"] for label, r_ in result["vs_base"].items()}
        result["diversity"] = diversity(gen)
        return result

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from diffusion_dpo.iterate_report import base_summary, stop_reason, write_report
        from diffusion_dpo.metrics import read_metrics, training_summary

        summaries: list[dict] = []
        base, report = None, {}
        gens = self.base_eval()  # every process
        for gen in gens.values():  # scored by every process, each its share
            self.scorer.fill(self.state, gen)
        if self.main:
            base = base_summary(gens, self.specs, self.scorer)
        for r in range(1, self.it.rounds + 1):
            done = round_dir(self.out, r) / ROUND_FILE
            if not done.is_file():
                if self.main:
                    self.log(f"iterate: round {r}/{self.it.rounds}")
                samples = self.sample(r)  # every process
                labels = self.label(r, samples)  # every process, each its share of the samples
                if self.main:
                    pairs = self.pair(r, samples, labels)
                self.state.wait_for_everyone()
                final = self.train(r)  # every process
                self.state.wait_for_everyone()
                self.scorer.fill(self.state, self.eval_images(r))  # every process, then scored by each its share
                if self.main:
                    _write_json(done, {"round": r, "start": vars(self.policy_before(r)), "seeds": self.sample_seeds(r),
                                       **pairs, "train": training_summary(read_metrics(final.parent)), "final": str(final),
                                       "eval": self.evaluate(r, gens)})
            reason = None
            if self.main:
                summaries.append(json.loads(done.read_text()))
                reason = stop_reason(base, summaries, self.heldout_label, self.it.stop_patience,
                                     self.it.stop_min_delta)
                report = write_report(self.out, base, summaries, self.train_label, self.heldout_label, reason)
            if self.state.num_processes > 1:
                reason = _broadcast(reason)
            if reason:
                self.log(f"iterate: stopping after round {r}: {reason}")
                break
        self.state.wait_for_everyone()
        return report


def _broadcast(value: Optional[str]) -> Optional[str]:
    """The main process's stop decision, on every process."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box)
    return box[0]


def _brief(r: dict) -> dict:
    keys = ("image_win_rate", "image_ci_low", "image_ci_high", "win_rate", "ci_low", "ci_high", "mean_a", "mean_b",
            "mean_diff", "mean_diff_ci_low", "mean_diff_ci_high", "effect_size", "n_images", "n_prompts")
    return {k: r[k] for k in keys}


def iterate(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) the rounds of `cfg.iterate` into cfg.output_dir; return the report (report.json)."""
    return Rounds(cfg, log).run()
