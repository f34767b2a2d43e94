"""The demo's settings, in one place: how big each demo is (`DemoSize`, `SIZES`), the seed ranges that keep
pairs, online rounds, tuning and evaluation apart, and the `train`, `iterate` and `generate` settings of every
stage. The demo (run.py, losses.py) and the tuning harness (scripts/demo_tune.py) read them here; how each value
was chosen, with the sweep tables, is in docs/demo.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffusion_dpo.config import Config, validate
from diffusion_dpo.demo import world
from diffusion_dpo.demo.base import BaseRecipe
from diffusion_dpo.demo.base_sd3 import SD3Recipe
from diffusion_dpo.demo.scorers import AI_REWARD, CROWD_REWARD, DEV_REWARD

MODELS = ("dpo", "dpo_ai", "sft", "dpo_online")  # tuned models, each compared with the base

# Seeds: pair samples 0..2K-1; online rounds from ONLINE_SEED; the tuning loop's dev seeds from DEV_SEED_START (the
# online trials' apart); the evaluation's from world.EVAL_SEED_START (1,000,000+). Tests check they never meet.
ONLINE_SEED = 100_000
DEV_SEED_START = 500_000
DEV_SEEDS = 4
ONLINE_DEV_SEEDS = [DEV_SEED_START + 100 + k for k in range(2)]  # the online trials' own, apart from DEV_SEEDS


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; `SIZES[family]["full"]` is the documented run (docs/demo.md), "tiny" the smoke test's (same code)."""

    base: Any = field(default_factory=BaseRecipe)  # BaseRecipe (UNet) or SD3Recipe (flow matching)
    pair_templates: int = len(world.PAIR_TEMPLATES)  # 8 templates x 2 forms x 10 digits = 160 pair prompts
    pairs_per_prompt: int = 18  # 2,880 pairs; ~10% crowd ties are dropped in training, as in Pick-a-Pic
    eval_templates: int = len(world.EVAL_TEMPLATES)  # 6 x 2 x 10 = 120 held-out prompts: CI half-width ~0.08
    eval_seeds: int = 4  # seeds per evaluation prompt (averaged per prompt by compare)
    sample_steps: int = 15  # DPM-Solver++ steps; the base's samples stop changing beyond ~12
    guidance_scale: float = 3.0  # moderate CFG: stronger guidance would hide the base's mistakes DPO fixes
    train_steps: int = 300
    batch_size: int = 32  # pairs per optimizer step
    beta: float = 250.0  # DPO on the crowd's labels; see train_config
    beta_ai: float = 1000.0  # DPO on the AI-feedback labels (cleaner labels take a larger beta; see train_config)
    lr: float = 1e-5
    caption_dropout: float = 0.0
    label_smoothing: float = 0.0  # conservative DPO's eps (loss.label_smoothing)
    train_seed: int = 0  # train.seed of every tuned model (the tuning loop varies it to see the spread)
    ema_decay: float = 0.0  # train.ema_decay of every tuned model (0: final/ holds the last weights)
    # steps of the "pipeline defaults" evaluation: None = the pipeline's own (the documented run); the tiny smoke
    # run takes 2 so that its 50-step SD default does not dominate the test suite (its guidance stays the default)
    default_steps: Optional[int] = None
    # the online stage (`iterate` from DPO-AI; see online_config for how these were chosen)
    online_rounds: int = 3
    online_samples: int = 8  # K samples per pair prompt and round, labelled by the AI reward
    online_pairing: str = "all"  # iterate.pairing: every two of a prompt's K samples (28 pairs at K = 8)
    online_steps: int = 150  # training steps per round (the reference is refreshed between rounds)
    online_beta: Optional[float] = None  # beta of the rounds; None: DPO-AI's (beta_ai)
    # the rounds sample (and iterate evaluates) at the pipeline's own defaults, where `pipe(prompt)` samples,
    # instead of at the demo's sampling settings (the flow demo; the UNet's defaults are 50 steps, 3.3x the cost)
    online_at_defaults: bool = False
    # the rounds' sampling steps, when not those of the setting above (None: its own; the pipeline's default is 28)
    online_sample_steps: Optional[int] = None

    @property
    def family(self) -> str:
        return getattr(self.base, "family", "sd")

    @property
    def max_sequence_length(self) -> Optional[int]:
        """T5 tokens the model is trained and sampled at (SD3; None for the UNet)."""
        return getattr(self.base, "t5_length", None)


_TINY = dict(pair_templates=1, pairs_per_prompt=1, eval_templates=1, eval_seeds=2, sample_steps=2, train_steps=2,
             batch_size=2, default_steps=2, online_rounds=2, online_samples=2, online_steps=2)
SIZES = {
    "sd": {
        "full": DemoSize(),
        "tiny": DemoSize(base=BaseRecipe(vae_steps=2, text_steps=2, unet_steps=2, vae_batch=8, unet_batch=8),
                         **_TINY),
    },
    "sd3": {
        # Flow-DPO settings chosen on the same judge-free dev metric as the UNet's (see train_config)
        "full": DemoSize(base=SD3Recipe(), beta=100.0, beta_ai=100.0, lr=3e-5, caption_dropout=0.1, online_beta=1000.0,
                          online_rounds=5, online_at_defaults=True),
        "tiny": DemoSize(base=SD3Recipe(vae_steps=2, text_steps=2, transformer_steps=2, vae_batch=8,
                                        transformer_batch=8), online_at_defaults=True, **_TINY),
    },
}
FAMILIES = tuple(SIZES)

OUTPUTS = ("base", "data", "train", "online", "eval", *MODELS, "eval_prompts.jsonl", "report.json", "report.md",
           "win_rates.png", "training_curves.png", "score_distributions.png", "grid.png")


def train_config(base: Path, data: Path, out: Path, size: DemoSize, loss: str, labels: str = "crowd") -> Config:
    """The `train` config of one tuned model (full fine-tune; the reference is a frozen copy of the base);
    `labels` ("crowd" or "ai") says whose labels `data` holds, which picks beta. How each value was chosen (on a
    judge-free dev metric, rules fixed before each trial): docs/demo.md, "How the settings were chosen"."""
    cfg = Config(output_dir=str(out), overwrite=True)
    cfg.model.pretrained = str(base)
    if size.max_sequence_length is not None:
        cfg.model.max_sequence_length = size.max_sequence_length  # SD3: the T5 length it is sampled at
    cfg.lora.rank = 0
    cfg.data.path = str(data)
    cfg.data.batch_size = size.batch_size
    cfg.data.resolution = size.base.resolution
    cfg.data.random_flip = False
    cfg.data.proportion_empty_prompts = size.caption_dropout
    cfg.data.num_workers = 0  # 16x16 PNGs decode in microseconds: worker processes would cost more than they save
    # Encode each data set's images and captions once (DPO and SFT share the crowd's): ~9 s less per training.
    cfg.cache.dir = str(data.with_name(f"{data.name}-cache"))
    cfg.cache.auto = True
    cfg.loss.name = loss
    cfg.loss.beta = {"crowd": size.beta, "ai": size.beta_ai}[labels]
    cfg.loss.label_smoothing = size.label_smoothing
    cfg.optim.lr = size.lr
    cfg.optim.scale_lr = False
    cfg.optim.lr_warmup_steps = min(20, size.train_steps // 10)
    cfg.train.max_steps = size.train_steps
    cfg.train.seed = size.train_seed
    cfg.train.ema_decay = size.ema_decay
    cfg.train.checkpointing_steps = 0
    cfg.train.report_to = "none"
    cfg.validation.every_steps = -1  # the demo's own grid (base | DPO | DPO-AI | SFT) replaces it
    validate(cfg)
    return cfg



def online_config(base: Path, start: Path, prompts: Path, dev_prompts: Path, out: Path, size: DemoSize) -> Config:
    """The `iterate` config of the online stage: DPO-AI's training settings (`train_config` with the AI labels),
    `online_steps` per round at `online_beta`, K = `online_samples` samples per pair prompt and round labelled by
    the AI reward and paired by `online_pairing`, the reference refreshed every round (flow_grpo's OnlineDPO). Its
    held-out rewards are the crowd's utility and the dev classifier (scorers.py; neither labels anything), and its
    evaluation runs on `dev_prompts` at the tuning loop's dev seeds: the judge (and the report's seeds) stay out
    of it. How the settings were chosen: docs/demo.md, "The online stage's settings"."""
    cfg = train_config(base, out / "pairs", out, size, "dpo", "ai")
    cfg.data.path = ""  # iterate makes each round's pairs
    cfg.cache.dir = str(out / "cache")  # a cache per round (iterate puts it in round-<r>/)
    cfg.train.max_steps = size.online_steps
    cfg.optim.lr_warmup_steps = min(20, size.online_steps // 10)
    if size.online_beta is not None:
        cfg.loss.beta = size.online_beta
    it = cfg.iterate
    it.rounds, it.samples_per_prompt, it.start = size.online_rounds, size.online_samples, str(start)
    it.prompts, it.eval_prompts = str(prompts), str(dev_prompts)
    it.reward, it.heldout_rewards = AI_REWARD, [CROWD_REWARD, DEV_REWARD]
    it.pairing, it.reference, it.seed = size.online_pairing, "previous", ONLINE_SEED
    it.eval_seeds = [DEV_SEED_START + k for k in range(2)]
    sample = default_sampling(size) if size.online_at_defaults else sampling(size)
    it.steps, it.guidance_scale, it.batch_size = size.online_sample_steps or sample["steps"], sample["guidance_scale"], 128
    validate(cfg, iterate=True)
    return cfg


def sampling(size: DemoSize) -> dict:
    """`generate` keyword arguments for every image the demo draws (pairs, evaluation, tuning)."""
    return dict(steps=size.sample_steps, guidance_scale=size.guidance_scale, batch_size=128,
                max_sequence_length=size.max_sequence_length)


def default_sampling(size: DemoSize) -> dict:
    """`generate` keyword arguments for the evaluation at the pipeline's own defaults: its default steps and
    guidance scale (`generate.pipeline_defaults`), at the T5 length the model was trained at."""
    return {**sampling(size), "steps": size.default_steps, "guidance_scale": None}
