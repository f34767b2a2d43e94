"""Typed configuration: one dataclass per concern, one root, YAML files + dotted overrides.

Every field carries its help text once (in `metadata["help"]`); the command line turns each
leaf into a `--section.key VALUE` flag and `--help` lists them all. Loading goes through
OmegaConf's structured configs, so an unknown key or a value of the wrong type is refused
with the key's dotted name; `validate` then checks ranges and choices.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_dpo.errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (lists get a default factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    pretrained: str = _f("", "Base model: a hub id (online) or a local diffusers pipeline directory "
                             "(SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, Z-Image, FLUX.2 [klein] or [dev], or Qwen-Image). "
                             "Required.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of `pretrained`. A run resolves it "
                                       "once to a commit (pins.json in output_dir) and reads that commit from then "
                                       "on, resumes included.")
    variant: Optional[str] = _f(None, "Weight variant to load, e.g. 'fp16'.")
    vae: Optional[str] = _f(None, "A separate VAE (hub id or local dir), e.g. an fp16-safe SDXL VAE. "
                                  "Default: the pipeline's own.")
    prediction_type: Optional[str] = _f(None, "SD/SDXL: override the scheduler's prediction type "
                                              "('epsilon' or 'v_prediction'); default: the scheduler config's.")
    t5: bool = _f(True, "SD3/SD3.5: condition on the T5 encoder as well as the two CLIPs; false leaves T5 out "
                        "(zeros in its place, as StableDiffusion3Pipeline with text_encoder_3=None does; final/ is "
                        "saved without it): less memory and a far smaller cache. FLUX.1 always needs its T5.")
    max_sequence_length: Optional[int] = _f(None, "SD3/FLUX: T5 tokens per prompt; default: the pipeline's "
                                                  "(SD3 256, FLUX 512; FLUX.1-schnell's own is 256).")
    sdxl_time_ids: str = _f("auto", "SDXL's size/crop conditioning (time ids orig_h, orig_w, top, left, target_h, "
                                    "target_w): constant = (res, res, 0, 0, res, res) for every image, as the official "
                                    "DiffusionDPO code (and as the SDXL pipeline samples by default): a pair's two "
                                    "images share it, so their error difference cannot come from size or crop "
                                    "conditioning that correlates with the preference; image = each image's true "
                                    "size and crop offsets (diffusers' SDXL fine-tuning scripts); auto = constant.")
    reference: Optional[str] = _f(None, "The frozen reference model of DPO-style losses. Default: the policy's "
                                        "starting weights (a frozen copy of model.pretrained's denoiser; with LoRA, "
                                        "model.pretrained with lora.init_from's adapters, or adapters off). A "
                                        "pipeline dir or hub id of the same family and architecture: its denoiser is "
                                        "the reference (e.g. the base model while model.pretrained is a model tuned "
                                        "from it); with LoRA, model.pretrained itself means adapters off.")
    vae_revision: Optional[str] = _f(None, "Hub revision of model.vae (pinned to a commit as model.revision).")
    reference_revision: Optional[str] = _f(None, "Hub revision of model.reference (pinned to a commit as "
                                                 "model.revision).")
    guidance: Optional[float] = _f(None, "Guidance-distilled models (FLUX.1-dev, FLUX.2 [dev]): the value fed to "
                                         "their guidance embedding during training; default the pipeline's own "
                                         "(FLUX.1 3.5, FLUX.2 4.0), as Flow-Factory trains with. Only for models "
                                         "with a guidance embedding.")
    quantize_base: str = _f("none", "LoRA runs: store the frozen base denoiser's block linears in fewer bits, so "
                                    "that a 20B/32B transformer fits one GPU: int8 (bitsandbytes LLM.int8), nf4 "
                                    "(bitsandbytes 4-bit, QLoRA) or fp8 (torchao weight-only; GPUs of compute "
                                    "capability 8.9+). The adapters train in fp32 on top; the reference is the same "
                                    "quantized base. none: the base in the train.mixed_precision dtype.")


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA rank; 0 = full fine-tune with a frozen reference copy of the denoiser.")
    alpha: Optional[float] = _f(None, "LoRA alpha (scale = alpha / rank); default: equal to rank.")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: Optional[list[str]] = _f(None, "Denoiser module names that get LoRA adapters; default: the "
                                                   "family's attention projections (SD/SDXL: to_q, to_k, to_v, "
                                                   "to_out.0; SD3 and FLUX: each block's attn.to_q, attn.to_k, "
                                                   "attn.to_v, attn.to_out.0 and the joint attention's "
                                                   "attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, "
                                                   "attn.to_add_out; a name matches a module path's end).")
    init_from: Optional[str] = _f(None, "Continue from LoRA weights made by this tool for the same model.pretrained "
                                        "(an output's final/ or its pytorch_lora_weights.safetensors): the adapters "
                                        "start from them instead of a fresh init; lora.rank and target modules must "
                                        "match them. `iterate` uses it to carry LoRA rounds on.")


@dataclass
class DataConfig:
    path: str = _f("", "Preference data: Pick-a-Pic parquet file/dir, a datasets.save_to_disk dir, "
                       "a JSONL/CSV file (prompt, chosen, rejected), or a hub dataset id (online). Required.")
    image_root: Optional[str] = _f(None, "The folder that the image paths of JSONL/CSV data (and of an in-memory "
                                         "dataset's path columns) must lie in, symlinks followed; a path outside it "
                                         "is a bad row. Default: the data file's folder (the working directory for "
                                         "an in-memory dataset). Table data (parquet, save_to_disk, hub) must carry "
                                         "image bytes: a cell holding only a path is a bad row.")
    split: str = _f("train", "Split to use for hub datasets and DatasetDict directories.")
    revision: Optional[str] = _f(None, "Hub revision of a hub dataset data.path (pinned to a commit as "
                                       "model.revision).")
    batch_size: int = _f(1, "Pairs per device per micro-step.")
    resolution: int = _f(512, "Training resolution (square); images are resized on the short side, then cropped.")
    random_crop: bool = _f(False, "Random crop (shared by both images of a pair) instead of a center crop.")
    random_flip: bool = _f(True, "Random horizontal flip, the same for both images of a pair.")
    proportion_empty_prompts: float = _f(0.2, "Probability of replacing a pair's caption by the empty prompt "
                                              "(0.2 in the official SD1.5 run).")
    keep_ties: bool = _f(False, "Keep tied pairs (label 0.5/0.5) and train them with a soft 0.5 target; "
                                "default drops and counts them, as the official code does.")
    skip_bad_rows: bool = _f(False, "Skip (and count) rows with bad captions, labels or images instead of "
                                    "stopping before training.")
    image_check: str = _f("before", "before: decode every image once before training (split over processes and "
                                    "num_workers, remembered per data file in $DIFFUSION_DPO_CACHE or "
                                    "~/.cache/diffusion_dpo, so an unchanged file is not decoded again), so a broken "
                                    "file stops the run up front (or is skipped with skip_bad_rows). lazy: decode "
                                    "nothing before; a pair whose image does not decode is replaced by the next pair "
                                    "when the loader meets it, and counted (metrics: bad_pairs_skipped).")
    unpaired: bool = _f(False, "Split each decided pair into two unpaired items, its winner desirable (label 1) and "
                               "its loser undesirable (label 0), for unpaired losses (kto); ties are dropped. Data "
                               "with prompt/image/label columns is unpaired already.")
    max_pairs: Optional[int] = _f(None, "Use only the first N usable pairs (subsets, debugging).")
    shuffle_window_mb: float = _f(1024.0, "Local parquet is read in place, a row group at a time: an epoch's order "
                                          "permutes the row groups, cuts them into windows of about this many MB "
                                          "of images and permutes the pairs within each window (data that fits in "
                                          "one window: one permutation of all pairs). Each process and loader "
                                          "worker holds up to twice this in memory.")
    num_workers: int = _f(2, "Data-loader worker processes (images are decoded in the workers).")
    streaming: bool = _f(False, "Read the data as a stream (datasets' streaming=True): a hub id or local parquet, "
                                "nothing downloaded, copied, scanned or decoded before step 1. Each process reads "
                                "its own shards (split_dataset_by_node), each loader worker its shards of those; "
                                "rows are permuted in blocks of data.shuffle_buffer; bad rows are skipped and "
                                "counted as they are met (bad_pairs_skipped). Resumes exactly on the same "
                                "processes, batch size and num_workers (the loader's state is in each checkpoint). "
                                "Not with a cache, data.max_pairs, data.unpaired or an in-memory dataset.")
    shuffle_buffer: int = _f(1000, "data.streaming: rows read and permuted together (a block); each loader worker "
                                   "holds one block of encoded rows (Pick-a-Pic: ~0.35 MB a row).")


@dataclass
class LossConfig:
    name: str = _f("dpo", "Objective from the loss registry: dpo, hinge, ipo, sft, mapo (reference-free: no "
                                   "reference model is loaded), kto (unpaired items: see data.unpaired).")
    beta: float = _f(5000.0, "KL strength beta in the official research code's convention (inside = -0.5*beta*"
                             "(model_diff - ref_diff)), each error the mean over all latent elements: beta's scale "
                             "is tied to that reduction (a sum over N elements would need beta/N). UNets: 5000 in "
                             "the official SD1.5 and SDXL runs (the paper quotes 2000 for SD1.5); diffusers' SD1.5 "
                             "DPO script's beta is half of ours (its 2500 = our 5000), its SDXL script's is ours. "
                             "Flow models: 100 in flow_grpo's SD3.5-M LoRA and Flow-Factory's SD3.5 LoRA example; "
                             "2000 is Flow-Factory's DPO default (the value its FLUX runs inherit).")
    label_smoothing: float = _f(0.0, "Conservative DPO (Mitchell 2023): a decided pair's label p=1 becomes 1-eps "
                                     "(a tie's 0.5 stays), for labels believed wrong with probability eps. It "
                                     "bounds how far noisy pairs pull: the loss is least at a finite margin "
                                     "log((1-eps)/eps) instead of an infinite one. 0 is the paper's loss; < 0.5.")
    kto_weight_desirable: float = _f(1.0, "KTO's lambda_D: the weight of desirable items' losses (the authors' 1).")
    kto_weight_undesirable: float = _f(1.0, "KTO's lambda_U: the weight of undesirable items' losses (the authors' 1).")
    safeguard: bool = _f(False, "Diffusion-SDPO's winner safeguard, for every pairwise loss (dpo, hinge, ipo, "
                                "mapo): the loser's gradient is scaled by lambda in [0, 1], chosen from the "
                                "denoiser's output-space gradients so the winner's error does not grow to first "
                                "order. Logged as loser_scale.")
    safeguard_mu: float = _f(0.6, "The safeguard's slack mu in [0, 1]: lambda <= (1 - mu)·|g_w|²/(g_l·g_w); larger "
                                  "is more conservative. 0.6 is the authors' SDXL scripts' value (their SD1.5 DPO "
                                  "script uses 0.9; their argparse default 0 rarely binds: a pair's two residuals "
                                  "share the noise, so g_l·g_w is close to |g_w|²).")


@dataclass
class FlowConfig:
    timestep_sampling: str = _f("logit_normal", "Flow-matching families (SD3, FLUX): how each pair's noise level "
                                                "u in (0, 1) is drawn before the shift: logit_normal (sigmoid of "
                                                "N(-logit_mean, logit_std^2); SD3's paper, flow_grpo, Flow-Factory), "
                                                "uniform, or mode (SD3's mode sampling with mode_scale).")
    logit_mean: float = _f(0.0, "Mean m of the logit-normal timestep density, in diffusers' sense (as flow_grpo and "
                                "Flow-Factory): m > 0 draws less noise (u = sigmoid(logit_std z - m)).")
    logit_std: float = _f(1.0, "Standard deviation of the logit-normal timestep density.")
    mode_scale: float = _f(1.29, "Scale of SD3's mode sampling (timestep_sampling mode).")
    shift: Optional[float] = _f(None, "Timestep shift s: sigma = s*u / (1 + (s-1)*u). Default: the scheduler's "
                                      "static shift (SD3/3.5: 3.0; Z-Image: its config's), and 1 (no shift) where "
                                      "the scheduler shifts by resolution at sampling time (FLUX.1-dev, FLUX.2, "
                                      "Qwen-Image), as diffusers' training scripts and Flow-Factory train them.")
    weighting: str = _f("none", "Per-timestep weight on each sample's error (and so on a pair's margin): none, "
                                "sigma_sqrt (1/sigma^2) or cosmap (SD3 paper); diffusers' SD3 scripts' options.")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "Optimizer: adamw, adamw8bit (needs bitsandbytes) or adafactor.")
    lr: float = _f(1e-8, "Learning rate per pair (before scale_lr).")
    scale_lr: bool = _f(True, "Multiply lr by per-device batch x accumulation x processes "
                              "(the official runs: 1e-8 x 2048 = 2.048e-5).")
    weight_decay: float = _f(1e-2, "Decoupled weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: str = _f("constant_with_warmup", "LR schedule: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = _f(500, "Warm-up optimizer steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping (the norm is still logged).")
    step_in_backward: bool = _f(False, "Update each parameter inside the backward pass as soon as its gradient is "
                                       "complete, then free that gradient: the gradients of the whole model never "
                                       "exist at once (saves one copy of the trainable weights). Single process, "
                                       "no gradient accumulation, no clipping (max_grad_norm 0), not with fp16.")


@dataclass
class TrainConfig:
    max_steps: int = _f(2000, "Optimizer steps to train.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    mixed_precision: str = _f("no", "no, fp16 or bf16. Trainable weights stay fp32; frozen parts use this dtype.")
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in the backward pass to save memory.")
    seed: int = _f(0, "Seed for data order, augmentation, timesteps and noise.")
    checkpointing_steps: int = _f(500, "Save checkpoint-<step>/ every N optimizer steps (0 = never).")
    checkpoints_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints (oldest removed).")
    resume: Optional[str] = _f(None, "'latest' or a checkpoint directory to continue from.")
    trust_sharded_resume: bool = _f(False, "Allow train.resume from an FSDP/DeepSpeed checkpoint (engine/) outside "
                                           "this run's output_dir. Restoring one unpickles files, which can run "
                                           "code: set it only for checkpoints you or someone you trust wrote. Plain "
                                           "checkpoints are safetensors and weights_only files and need no trust.")
    report_to: str = _f("tensorboard", "Trackers, any accelerate supports: tensorboard, wandb, trackio, comet_ml, "
                                       "mlflow, clearml, dvclive, swanlab, aim; several comma-separated (wandb,mlflow), "
                                       "all (those installed) or none. Metrics every step, validation grids as "
                                       "images; metrics.jsonl is always written.")
    push_to_hub: Optional[str] = _f(None, "A hub repo id (user/name): push final/ there when training ends (checked "
                                          "before training starts: repo id, HF_HUB_OFFLINE, token). Or later: "
                                          "`diffusion-dpo push OUTPUT_DIR --repo-id ID`.")
    hub_private: bool = _f(True, "train.push_to_hub creates the repository as private (an existing repository keeps "
                                 "its visibility); false makes a new one public.")
    tracker_project: str = _f("diffusion-dpo", "The trackers' project name (TensorBoard: the folder under logs/).")
    run_name: Optional[str] = _f(None, "The run's name in trackers that have one (wandb, trackio, mlflow, swanlab, "
                                       "aim); default: the output directory's name.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    skip_nonfinite: bool = _f(False, "Skip (and count) optimizer steps whose loss or gradient is NaN/inf instead "
                                     "of stopping the run; the weights are never updated with them.")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the trainable weights with this decay "
                               "(e.g. 0.999; 0 = off): final/ and the validation grids hold the average, "
                               "checkpoints both. The decay is capped at n/(n+9) after n updates. One more fp32 "
                               "copy of the trainable weights; not under FSDP/DeepSpeed.")
    channels_last: bool = _f(False, "Keep the UNet's weights and inputs in channels-last memory format (faster "
                                    "convolutions on recent GPUs with bf16/fp16; no gain on CPU).")
    compile: bool = _f(False, "torch.compile the UNet (the first steps are slow while it compiles; pays off on "
                              "long GPU runs).")
    process_group_timeout_minutes: float = _f(120.0, "How long a process waits at a barrier or collective for the "
                                                     "others before the job fails (torch's default under NCCL is "
                                                     "10). It guards the stages one process still does while the "
                                                     "others wait: writing a full fine-tune's final/ pipeline and "
                                                     "checkpoints, the merge after a shared stage.")


@dataclass
class CacheConfig:
    dir: Optional[str] = _f(None, "Pre-encoding cache directory (`diffusion-dpo cache` writes it): every pair's "
                                  "VAE posterior and caption encodings, read memory-mapped; training then never "
                                  "loads the VAE or the text encoders. null = encode on the fly.")
    auto: bool = _f(False, "train: build the cache (and a precomputed reference) first when cache.dir holds none; "
                           "with several processes each builds its share.")
    dtype: str = _f("auto", "Storage dtype of the cache: auto (built in the dtype training casts cached inputs to: "
                            "bfloat16 under train.mixed_precision bf16, float16 under fp16, else float32; a cache of "
                            "any dtype is then accepted), float32, float16 or bfloat16 (half the disk).")
    batch_size: int = _f(16, "Pairs per batch while building the cache and while precomputing the reference.")
    shard_pairs: int = _f(1024, "Pairs, images and captions per shard file: the chunk a build's process encodes "
                                "and writes whole (a killed build loses at most one per process).")
    reference: str = _f("live", "The reference model's errors: live (a forward pass every step) or precomputed "
                                "(computed once by `diffusion-dpo cache --reference` for this run's exact timesteps "
                                "and noises; training then loads no reference model). precomputed needs cache.dir.")
    reference_file: Optional[str] = _f(None, "The precomputed reference file; default: "
                                             "<cache.dir>/reference.safetensors.")


@dataclass
class ValidationConfig:
    prompts: list[str] = _f(["a photo of a cat sitting on a sofa", "an astronaut riding a horse, oil painting"],
                            "Prompts for the reference | policy sample grid.")
    seeds: list[int] = _f([0], "Seeds per prompt (the same for reference and policy).")
    every_steps: int = _f(500, "Write a sample grid every N optimizer steps and at the end (0 = only at the end, "
                               "-1 = never).")
    num_inference_steps: int = _f(30, "Sampling steps for the grid.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale for the grid.")


@dataclass
class IterateConfig:
    rounds: int = _f(3, "iterate: on-policy rounds (sample, label, pair, train, evaluate). Raising it and rerunning "
                        "continues a finished run.")
    prompts: str = _f("", "iterate: the training prompts (a prompt file as `generate` reads: .txt, PartiPrompts .tsv, "
                          "HPSv2 .json, Pick-a-Pic captions). Required.")
    samples_per_prompt: int = _f(8, "iterate: K images per training prompt and round (K >= 2; flow_grpo's OnlineDPO "
                                    "pairs the best and worst of 24).")
    reward: str = _f("", "iterate: the reward that labels the samples, as `relabel --reward` takes it: a registry "
                         "name, a weighted sum (pickscore=1,aesthetic=0.5) or package.module:function. Required.")
    heldout_rewards: list[str] = _f([], "iterate: rewards that never label anything, scored on the evaluation "
                                        "prompts beside the training reward: where they stop rising while it "
                                        "rises, the policy is over-optimising the training reward.")
    pairing: str = _f("best_worst", "iterate: how a prompt's K scored samples become pairs: best_worst (the best "
                                    "against the worst, as flow_grpo's OnlineDPO) or all (every two samples whose "
                                    "scores differ by more than margin).")
    margin: float = _f(0.0, "iterate: a pair needs its two scores to differ by more than this (prompts whose "
                            "samples all score alike give no pair).")
    reference: str = _f("previous", "iterate: the reference of round r: previous (round r-1's policy, i.e. the "
                                    "round's own starting weights, as flow_grpo refreshes it) or base (model.pretrained "
                                    "in every round).")
    start: Optional[str] = _f(None, "iterate: the weights round 1 starts from: a full fine-tune's final/ (a pipeline "
                                    "dir) or, with lora.rank > 0, a LoRA final/ for model.pretrained. Default: "
                                    "model.pretrained itself.")
    eval_prompts: str = _f("", "iterate: held-out prompts (a prompt file) on which every round is compared with the "
                               "base and with the round before. Required.")
    eval_seeds: list[int] = _f([0, 1], "iterate: seeds per evaluation prompt (the same for every model).")
    seed: int = _f(0, "iterate: round r samples at seeds seed + (r-1)*K ... seed + r*K - 1 (recorded in each "
                      "round's manifest), so no round repeats another's noise.")
    steps: Optional[int] = _f(None, "iterate: sampling steps (samples and evaluation); default the pipeline's own.")
    guidance_scale: Optional[float] = _f(None, "iterate: classifier-free guidance scale; default the pipeline's own.")
    scheduler: Optional[str] = _f(None, "iterate: sampler (as `generate --scheduler`); default the pipeline's own.")
    batch_size: int = _f(8, "iterate: images per generation batch.")
    stop_patience: int = _f(0, "iterate: stop early when the held-out score (the first heldout reward's mean on the "
                               "evaluation prompts; the training reward's if none) has not beaten its best by more "
                               "than stop_min_delta for this many rounds; 0 = run every round.")
    stop_min_delta: float = _f(0.0, "iterate: the improvement the stop rule counts as one.")


@dataclass
class Config:
    output_dir: str = _f("runs/dpo", "Where metrics, logs, checkpoints and final/ are written.")
    overwrite: bool = _f(False, "Start over in an output_dir that holds an earlier run (its checkpoints, final/, "
                                "metrics and samples are removed); without it such a directory is refused.")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)


IMAGE_CHECKS = ("before", "lazy")
CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
QUANTIZATIONS = ("none", "int8", "fp8", "nf4")  # model.quantize_base (models/quantize.py)
SDXL_TIME_IDS = ("auto", "constant", "image")
PAIRINGS = ("best_worst", "all")
ITERATE_REFERENCES = ("previous", "base")


def iter_fields(cls: type = None, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """All leaf fields of a config class as (dotted name, field), in declaration order."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        section = _SECTIONS.get(f.name) if cls is Config else None
        if section is not None:
            out.extend(iter_fields(section, prefix=f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "loss": LossConfig,
             "flow": FlowConfig, "optim": OptimConfig, "train": TrainConfig, "cache": CacheConfig,
             "validation": ValidationConfig, "iterate": IterateConfig}


def _omegaconf_error(exc: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if "not in" in msg:
        return UserError(f"{source}: unknown config key '{key}'")
    return UserError(f"{source}: bad value for '{key}': {msg}")


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config is read, in files and in --section.key values alike: only true/false are booleans (YAML
    1.2), so `train.mixed_precision: no` stays the string the field documents, where YAML 1.1 would make it false;
    and 1e-4 is a float (YAML 1.1 wants 1.0e-4). Boolean fields still accept yes/no/on/off (OmegaConf converts)."""


_BOOL = "tag:yaml.org,2002:bool"
_ConfigLoader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                         for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _override_value(text: str) -> Any:
    """A command-line value read as YAML by `_ConfigLoader` (lists, numbers, null); anything else as given."""
    if text == "":
        return text
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError:
        return text


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict[str, str]] = None,
                iterate: bool = False) -> Config:
    """Build the config from defaults, an optional YAML file, then `{dotted.key: value}` overrides.

    Raises `UserError` (one line) for an unreadable file, unknown key, wrong type or bad value. `iterate`: checked
    for `diffusion-dpo iterate` (its iterate section; data.path is made per round, so it is not asked for).
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config file {path} is a directory; give a YAML file (see configs/)")
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.load(path.read_text(), Loader=_ConfigLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, str(path)) from None
    if overrides:
        for key, value in overrides.items():
            try:
                nested: Any = _override_value(str(value))
                for part in reversed(key.split(".")):
                    nested = {part: nested}
                cfg = OmegaConf.merge(cfg, OmegaConf.create(nested))
            except OmegaConfBaseException as exc:
                raise _omegaconf_error(exc, "command line") from None
    config = OmegaConf.to_object(cfg)
    validate(config, iterate=iterate)
    return config


def check_config(cfg: Config, data_in_memory: bool = False, iterate: bool = False) -> Config:
    """A `Config` built in code, checked exactly as one read from YAML: unknown keys (an attribute set on a section
    that is not one of its fields, e.g. `cfg.train.max_step = 3`), values of the wrong type (converted where YAML
    would convert them: "4" -> 4) and ranges. Returns the checked copy; raises `UserError` in one line.
    `data_in_memory`: the data comes as a `datasets.Dataset` (`train(cfg, dataset=...)`), so data.path may be empty;
    `iterate`: the config of `iterate` (see `validate`)."""
    if not isinstance(cfg, Config):
        raise UserError(f"config: expected a diffusion_dpo.Config, got {type(cfg).__name__}")
    for section, cls in [("", Config), *_SECTIONS.items()]:
        obj = getattr(cfg, section) if section else cfg
        if not isinstance(obj, cls):
            raise UserError(f"config: {section} must be a {cls.__name__}, got {type(obj).__name__}")
        unknown = sorted(set(vars(obj)) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"config: unknown config key '{section + '.' if section else ''}{unknown[0]}'")
    try:
        checked = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.structured(cfg)))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "config") from None
    validate(checked, data_in_memory=data_in_memory, iterate=iterate)
    return checked


def validate(cfg: Config, data_in_memory: bool = False, iterate: bool = False) -> None:
    """Check ranges and choices that types alone cannot express; raise `UserError` on the first problem.
    `iterate`: the config of `diffusion-dpo iterate`, whose rounds make the data."""
    from diffusion_dpo.training.losses import LOSSES  # the registry is the single list of loss names

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise UserError(f"config: {key} {msg}")

    need(bool(cfg.model.pretrained), "model.pretrained", "is required (a hub id or a local diffusers directory)")
    if iterate:
        _validate_iterate(cfg.iterate, need)
        need(not cfg.data.path, "data.path", "must be empty for iterate (each round's pairs are made from its samples)")
    need(bool(cfg.data.path) or data_in_memory or iterate, "data.path",
         "is required (parquet, save_to_disk dir, JSONL/CSV or hub id)")
    need(not (data_in_memory and cfg.data.path), "data.path",
         "must be empty when a dataset is passed in memory (one source of pairs)")
    need(not (data_in_memory and cfg.cache.dir), "cache.dir",
         "cannot cache an in-memory dataset (it has no file to identify it by); save it with "
         "dataset.save_to_disk(DIR) and set data.path DIR")
    need(cfg.loss.beta > 0, "loss.beta", f"must be > 0 (got {cfg.loss.beta})")
    need(0.0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing",
         f"must be in [0, 0.5) (got {cfg.loss.label_smoothing})")
    need(cfg.loss.name in LOSSES, "loss.name", f"must be one of {', '.join(sorted(LOSSES))} (got '{cfg.loss.name}')")
    need(cfg.loss.kto_weight_desirable > 0 and cfg.loss.kto_weight_undesirable > 0, "loss.kto_weight_desirable",
         "and loss.kto_weight_undesirable must be > 0")
    need(cfg.loss.name != "kto" or cfg.loss.label_smoothing == 0, "loss.label_smoothing",
         "does not apply to kto (an unpaired label is a thumb up or down, not a probability)")
    need(0.0 <= cfg.loss.safeguard_mu <= 1.0, "loss.safeguard_mu", f"must be in [0, 1] (got {cfg.loss.safeguard_mu})")
    need(not cfg.loss.safeguard or cfg.loss.name not in LOSSES or LOSSES[cfg.loss.name].pairwise, "loss.safeguard",
         f"applies to pairwise losses ({', '.join(sorted(n for n, s in LOSSES.items() if s.pairwise))}), "
         f"not {cfg.loss.name}")
    need(not cfg.model.reference or cfg.loss.name not in LOSSES or LOSSES[cfg.loss.name].needs_reference,
         "model.reference", f"is not used by loss {cfg.loss.name} (it trains without a reference model); unset it")
    need(cfg.data.shuffle_window_mb > 0, "data.shuffle_window_mb", f"must be > 0 (got {cfg.data.shuffle_window_mb})")
    need(cfg.data.image_check in IMAGE_CHECKS, "data.image_check",
         f"must be one of {', '.join(IMAGE_CHECKS)} (got '{cfg.data.image_check}')")
    need(cfg.train.process_group_timeout_minutes > 0, "train.process_group_timeout_minutes",
         f"must be > 0 (got {cfg.train.process_group_timeout_minutes})")
    need(cfg.lora.rank >= 0, "lora.rank", f"must be >= 0 (got {cfg.lora.rank})")
    need(cfg.lora.alpha is None or cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(cfg.lora.init_from is None or cfg.lora.rank > 0, "lora.init_from",
         "needs lora.rank > 0 (a full fine-tune continues from the weights in model.pretrained)")
    need(cfg.model.quantize_base in QUANTIZATIONS, "model.quantize_base",
         f"must be one of {', '.join(QUANTIZATIONS)} (got '{cfg.model.quantize_base}')")
    need(cfg.model.quantize_base == "none" or cfg.lora.rank > 0, "model.quantize_base",
         f"{cfg.model.quantize_base} needs lora.rank > 0 (a full fine-tune trains every weight: none can be frozen in "
         "fewer bits)")
    need(cfg.lora.target_modules is None or len(cfg.lora.target_modules) > 0, "lora.target_modules",
         "must not be empty (leave it unset for the model family's default)")
    need(cfg.model.sdxl_time_ids in SDXL_TIME_IDS, "model.sdxl_time_ids",
         f"must be one of {', '.join(SDXL_TIME_IDS)} (got '{cfg.model.sdxl_time_ids}')")
    need(cfg.model.max_sequence_length is None or cfg.model.max_sequence_length >= 1, "model.max_sequence_length",
         "must be >= 1")
    need(cfg.flow.timestep_sampling in TIMESTEP_SAMPLING, "flow.timestep_sampling",
         f"must be one of {', '.join(TIMESTEP_SAMPLING)} (got '{cfg.flow.timestep_sampling}')")
    need(cfg.flow.logit_std > 0, "flow.logit_std", f"must be > 0 (got {cfg.flow.logit_std})")
    need(cfg.flow.shift is None or cfg.flow.shift > 0, "flow.shift", f"must be > 0 (got {cfg.flow.shift})")
    need(cfg.flow.weighting in FLOW_WEIGHTINGS, "flow.weighting",
         f"must be one of {', '.join(FLOW_WEIGHTINGS)} (got '{cfg.flow.weighting}')")
    need(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1 (got {cfg.data.batch_size})")
    need(cfg.data.resolution >= 8 and cfg.data.resolution % 8 == 0, "data.resolution",
         f"must be a positive multiple of 8 (got {cfg.data.resolution})")
    need(0.0 <= cfg.data.proportion_empty_prompts <= 1.0, "data.proportion_empty_prompts", "must be in [0, 1]")
    need(cfg.data.max_pairs is None or cfg.data.max_pairs >= 1, "data.max_pairs", "must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1 (got {cfg.data.shuffle_buffer})")
    if cfg.data.streaming:  # a stream is read once, in order, as training goes: nothing may need the whole set first
        need(not cfg.cache.dir, "data.streaming", "cannot feed a cache (cache.dir): a cache is built from the whole "
             "data set; download it or read local parquet in place (data.streaming false)")
        need(cfg.data.max_pairs is None, "data.streaming", "cannot take data.max_pairs (the pairs are not counted "
             "ahead); bound the run with train.max_steps")
        need(not cfg.data.unpaired and cfg.loss.name != "kto", "data.streaming",
             "reads pairs for pairwise losses; unpaired items (data.unpaired, loss kto) need it off")
        need(not data_in_memory, "data.streaming", "applies to data.path, not an in-memory dataset")
    need(cfg.data.image_root is None or bool(cfg.data.image_root.strip()), "data.image_root",
         "must not be empty (leave it unset for the data file's folder)")
    need(cfg.optim.name in ("adamw", "adamw8bit", "adafactor"), "optim.name",
         f"must be adamw, adamw8bit or adafactor (got '{cfg.optim.name}')")
    need(cfg.optim.lr > 0, "optim.lr", f"must be > 0 (got {cfg.optim.lr})")
    need(cfg.optim.lr_warmup_steps >= 0, "optim.lr_warmup_steps", "must be >= 0")
    need(cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
    if cfg.optim.step_in_backward:  # each parameter is updated before the others' gradients exist
        need(cfg.train.gradient_accumulation_steps == 1, "optim.step_in_backward",
             "needs train.gradient_accumulation_steps 1 (every backward pass is an update)")
        need(cfg.optim.max_grad_norm == 0, "optim.step_in_backward",
             "cannot clip by the global gradient norm (no parameter waits for the others); set optim.max_grad_norm 0")
        need(cfg.train.mixed_precision != "fp16", "optim.step_in_backward",
             "does not work with fp16's loss scaling (it must see every gradient before any update); use bf16")
        need(not cfg.train.skip_nonfinite, "optim.step_in_backward",
             "cannot skip a non-finite step (the update happens during the backward pass)")
    schedulers = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    need(cfg.optim.lr_scheduler in schedulers, "optim.lr_scheduler", f"must be one of {', '.join(schedulers)}")
    need(cfg.train.max_steps >= 1, "train.max_steps", f"must be >= 1 (got {cfg.train.max_steps})")
    need(cfg.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    need(cfg.train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision",
         f"must be no, fp16 or bf16 (got '{cfg.train.mixed_precision}')")
    need(cfg.train.checkpointing_steps >= 0, "train.checkpointing_steps", "must be >= 0")
    need(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (got {cfg.train.ema_decay})")
    need(cfg.train.checkpoints_total_limit is None or cfg.train.checkpoints_total_limit >= 1,
         "train.checkpoints_total_limit", "must be >= 1")
    from diffusion_dpo.training.trackers import TRACKER_PACKAGES

    trackers = [n.strip() for n in cfg.train.report_to.split(",") if n.strip()]
    need(trackers in (["all"], ["none"]) or (bool(trackers) and all(t in TRACKER_PACKAGES for t in trackers)),
         "train.report_to", f"must be tracker names ({', '.join(TRACKER_PACKAGES)}; several comma-separated), all or "
                            f"none (got '{cfg.train.report_to}')")
    need(bool(cfg.train.tracker_project), "train.tracker_project", "must not be empty")
    need(cfg.model.prediction_type in (None, "epsilon", "v_prediction"), "model.prediction_type",
         "must be epsilon or v_prediction")
    need(cfg.cache.dtype in CACHE_DTYPES, "cache.dtype", f"must be one of {', '.join(CACHE_DTYPES)} "
                                                        f"(got '{cfg.cache.dtype}')")
    need(cfg.cache.batch_size >= 1, "cache.batch_size", "must be >= 1")
    need(cfg.cache.shard_pairs >= 1, "cache.shard_pairs", "must be >= 1")
    need(cfg.cache.reference in ("live", "precomputed"), "cache.reference",
         f"must be live or precomputed (got '{cfg.cache.reference}')")
    need(cfg.cache.reference == "live" or bool(cfg.cache.dir), "cache.reference",
         "precomputed needs cache.dir (the reference errors are computed from the cache)")
    need(not cfg.cache.auto or bool(cfg.cache.dir), "cache.auto", "needs cache.dir (where to build the cache)")
    need(cfg.validation.every_steps >= -1, "validation.every_steps", "must be >= -1")
    need(cfg.validation.num_inference_steps >= 1, "validation.num_inference_steps", "must be >= 1")


def _validate_iterate(it: IterateConfig, need: Any) -> None:
    need(it.rounds >= 1, "iterate.rounds", f"must be >= 1 (got {it.rounds})")
    need(bool(it.prompts), "iterate.prompts", "is required (a prompt file of training prompts)")
    need(bool(it.eval_prompts), "iterate.eval_prompts", "is required (held-out prompts for each round's evaluation)")
    need(bool(it.reward), "iterate.reward", "is required (the reward that labels each round's samples)")
    need(it.samples_per_prompt >= 2, "iterate.samples_per_prompt",
         f"must be >= 2: a pair needs two samples of a prompt (got {it.samples_per_prompt})")
    need(it.pairing in PAIRINGS, "iterate.pairing", f"must be one of {', '.join(PAIRINGS)} (got '{it.pairing}')")
    need(it.margin >= 0, "iterate.margin", f"must be >= 0 (got {it.margin})")
    need(it.reference in ITERATE_REFERENCES, "iterate.reference",
         f"must be one of {', '.join(ITERATE_REFERENCES)} (got '{it.reference}')")
    need(len(it.eval_seeds) >= 1 and len(set(it.eval_seeds)) == len(it.eval_seeds), "iterate.eval_seeds",
         "must be a non-empty list without repeats")
    need(it.steps is None or it.steps >= 1, "iterate.steps", "must be >= 1")
    need(it.batch_size >= 1, "iterate.batch_size", "must be >= 1")
    need(it.stop_patience >= 0, "iterate.stop_patience", "must be >= 0")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every run so it can be reproduced)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def markdown_reference() -> str:
    """The config reference as a Markdown table (docs/config.md embeds it; a test keeps them equal)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    for name, f in iter_fields():
        value: Any = defaults
        for part in name.split("."):
            value = value[part]
        shown = "null" if value is None else json_like(value)
        rows.append(f"| `{name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows)


def json_like(value: Any) -> str:
    """A default as it would be written in YAML/JSON (true, 1e-08, [a, b])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(json_like(v) for v in value) + "]"
    return '""' if value == "" else str(value)


if __name__ == "__main__":  # python -m diffusion_dpo.config  -> docs/config.md's config table
    print(markdown_reference())


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config flattened to scalars (TensorBoard's hparams accept no lists or None)."""
    out = {}
    for section, values in dataclasses.asdict(cfg).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for k, v in items:
            key = f"{section}.{k}" if k else section
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
