"""What a run writes besides metrics: its output folder's marker, pins and config; checkpoints (the weights, the
optimizer and schedule, the loop's state; see `checkpoint`); the validation grids; and `final/` with its model card.

`final/` is a diffusers pipeline for a full fine-tune (`from_pretrained` loads it) or
`pytorch_lora_weights.safetensors` for LoRA (`load_lora_weights` loads it), written as `final.tmp/` and renamed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.config import Config, FlowConfig, ModelConfig, ValidationConfig, to_yaml
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import Family, load_components
from diffusion_dpo.models.reference import Reference
from diffusion_dpo.pinning import write_pins
import diffusion_dpo.training.checkpoint as ckpt
from diffusion_dpo.training.ema import WeightAverage
from diffusion_dpo.training.model_card import RunFacts, write_card
from diffusion_dpo.training.trackers import log_image


def prepare_output_dir(accelerator: Any, cfg: Config, output_dir: Path, resuming: bool, pins: dict) -> None:
    """The main process clears what --overwrite replaces, marks the folder as a run's, writes pins.json and
    config.yaml; every process waits for it."""
    if accelerator.is_main_process:
        try:
            if cfg.overwrite and not resuming:
                ckpt.clear_run(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.mark_run(output_dir)
            write_pins(output_dir, pins)
            (output_dir / "config.yaml").write_text(to_yaml(cfg))
        except OSError as exc:
            raise UserError(f"output_dir '{output_dir}': {exc.strerror or exc}") from None
    accelerator.wait_for_everyone()


def _load_device(device: torch.device) -> str:
    """Where safetensors should put the tensors it reads: the accelerator's device, or "cpu" (a CPU process of a
    several-process run has device "cpu:<rank>" there, which safetensors refuses)."""
    return str(device) if device.type != "cpu" else "cpu"


@dataclass
class Weights:
    """The trainable weights as files: a checkpoint's copy (LoRA in peft's naming and diffusers', or the full
    denoiser folder) and the weight average, read back on resume."""

    accelerator: Any
    denoiser: torch.nn.Module  # as prepared by accelerate
    family: Family
    lora: bool
    model: ModelConfig
    average: Optional[WeightAverage] = None

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.denoiser)

    def averaged(self) -> contextlib.AbstractContextManager:
        """A block in which the denoiser holds the weight average (train.ema_decay), or a no-op without one."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def write(self, directory: Path) -> None:
        model = self.unwrapped()
        if self.lora:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            self.family.save_lora(model, directory)
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(state, directory / "lora_peft.safetensors")
        else:
            model.save_pretrained(directory / self.family.denoiser_role, safe_serialization=True)
        if self.average is not None:
            self.average.save(directory)

    def read(self, directory: Path) -> None:
        from safetensors.torch import load_file

        model, device = self.unwrapped(), _load_device(self.accelerator.device)
        if self.lora:
            from peft.utils import set_peft_model_state_dict

            path = directory / "lora_peft.safetensors"
            if not path.is_file():
                raise UserError(f"train.resume: {directory} has no LoRA weights (was it a full fine-tune?)")
            result = set_peft_model_state_dict(model, load_file(path, device=device))
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"train.resume: {path} does not match lora settings "
                                f"(unexpected {result.unexpected_keys[0]})")
        else:
            role = self.family.denoiser_role
            path = directory / role / "diffusion_pytorch_model.safetensors"
            if not path.is_file():
                raise UserError(f"train.resume: {directory} has no full {role} weights (was it a LoRA run, or "
                                "another model family?)")
            try:
                model.load_state_dict(load_file(path, device=device))
            except RuntimeError as exc:  # other shapes or names: another model's checkpoint
                raise UserError(f"train.resume: {path} does not fit {self.model.pretrained} "
                                f"({str(exc).splitlines()[0][:200]})") from None
        if self.average is not None:
            self.average.load(directory)


@dataclass
class Checkpoints:
    """checkpoint-<step>/ written by the main process (every process waits), restored by every process.

    Under FSDP/DeepSpeed each process first writes its shards of the model and optimizer states into the staging
    directory's `engine/` (accelerate's save_state); the rename still makes it atomic."""

    accelerator: Any
    output_dir: Path
    weights: Weights
    optimizer: Any
    lr_scheduler: Any
    sharded: bool
    total_limit: Optional[int]
    loader_state: Optional[Callable[[], dict]] = None  # data.streaming: this process's loader state

    def save(self, state: ckpt.TrainState) -> Optional[Path]:
        acc = self.accelerator
        files = None
        if self.loader_state is not None:  # every process's, gathered to the main process (which writes)
            from accelerate.utils import gather_object

            states = gather_object([self.loader_state()]) if acc.num_processes > 1 else [self.loader_state()]
            files = {ckpt.LOADER_FILE: json.dumps(states)}
        if self.sharded:
            if acc.is_main_process:
                ckpt.new_staging_dir(self.output_dir, state.step)
            acc.wait_for_everyone()
            acc.save_state(str(ckpt.staging_dir(self.output_dir, state.step) / ckpt.ENGINE_DIR))
            acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(self.output_dir, state, None if self.sharded else self.weights.write,
                                        None if self.sharded else self.optimizer, self.lr_scheduler,
                                        self.total_limit, scaler=None if self.sharded else acc.scaler,
                                        staged=self.sharded, files=files)
        acc.wait_for_everyone()
        return path

    def load(self, path: Path) -> ckpt.TrainState:
        """Restore a checkpoint written by a run with the same engine (sharded or not)."""
        engine = path / ckpt.ENGINE_DIR
        if self.sharded != engine.is_dir():
            how = ("an FSDP/DeepSpeed run; resume it under the same accelerate --config_file" if engine.is_dir()
                   else "a DDP or one-process run; resume it without FSDP/DeepSpeed")
            raise UserError(f"train.resume: {path} was written by {how} (sharded and plain states do not mix)")
        if self.sharded:
            written = ckpt.read_state(path).layout or {}
            processes = self.accelerator.num_processes
            if written.get("processes", processes) != processes:
                raise UserError(f"train.resume: {path} holds FSDP/DeepSpeed states sharded over "
                                f"{written['processes']} processes and this run has {processes}; resume it on "
                                f"{written['processes']} processes")
            self.accelerator.load_state(str(engine))  # every process reads its shards
            return ckpt.load_checkpoint(path, None, None, self.lr_scheduler)
        return ckpt.load_checkpoint(path, self.weights.read, self.optimizer, self.lr_scheduler,
                                    scaler=self.accelerator.scaler)


def grid_path(output_dir: Path, step: int) -> Path:
    return output_dir / "samples" / f"step-{step:06d}.png"


def write_grid(weights: Weights, reference: Optional[Reference], validation: ValidationConfig, flow: FlowConfig,
               resolution: int, weight_dtype: torch.dtype, output_dir: Path, step: int) -> None:
    """samples/step-NNNNNN.png: the validation prompts under the reference and the policy (main process; every
    process waits). The grid shows the weight average when there is one: what final/ will hold."""
    acc = weights.accelerator
    if acc.is_main_process:
        from diffusion_dpo.evaluation.grids import write_validation_grid

        path = grid_path(output_dir, step)
        components = weights.family
        if components.vae is None:
            # Training from a cache holds no VAE or text encoders; a grid needs them, for the grid only.
            components = load_components(weights.model, weight_dtype, acc.device, denoiser=False, flow=flow)
        with weights.averaged():
            write_validation_grid(path, components, weights.unwrapped(), reference, validation.prompts,
                                  validation.seeds, resolution, validation.num_inference_steps,
                                  validation.guidance_scale, autocast=acc.autocast)
        log_image(acc.trackers, "validation/reference_vs_policy", path, step)
    acc.wait_for_everyone()


def write_final(weights: Weights, cfg: Config, output_dir: Path, facts: RunFacts, sharded: bool) -> Path:
    """final/: the pipeline (full fine-tune) or the LoRA file, and the model card; written by the main process as
    final.tmp/ and renamed. Sharded parameters (full fine-tunes under FSDP/DeepSpeed) are first gathered into one
    state dict on the main process (a collective: every process calls this)."""
    acc = weights.accelerator
    final = output_dir / "final"
    full_state = acc.get_state_dict(weights.denoiser) if sharded else None
    with weights.averaged():
        if acc.is_main_process:
            tmp = output_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model = weights.unwrapped()
            try:
                tmp.mkdir(parents=True)
                if weights.lora:
                    weights.family.save_lora(model, tmp)
                else:
                    if full_state is not None:  # a plain (unsharded) denoiser holding the gathered weights
                        model = type(model).from_config(model.config)
                        model.load_state_dict(full_state)
                    weights.family.save_pipeline(model, tmp)
                write_card(tmp, cfg, facts)
            except OSError as exc:  # disk full, quota: the last checkpoint still holds the run
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"cannot write {final}: {exc.strerror or exc}; the run can be finished with "
                                "--train.resume latest once there is space") from None
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    acc.wait_for_everyone()
    return final
