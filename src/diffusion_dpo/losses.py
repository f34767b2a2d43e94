"""Preference objectives as pure functions of per-sample denoising errors, and their registry.

Every loss sees the same four tensors, each of shape (B,): the trainable model's and the
frozen reference's per-sample MSE (mean over C, H, W) on the winner and loser latents of a
pair, noised with ONE shared timestep and noise draw. From them, the implicit reward margin

    h      = -0.5 * [ (mse_w - mse_l) - (ref_w - ref_l) ]      (scale-free log-ratio estimate)
    inside = beta * h

is what the Diffusion-DPO paper (Wallace et al. 2023, eq. 14, official code) feeds to the
sigmoid. `label` is the probability that the first image (the winner) is preferred: 1 for a
decided pair, 0.5 for a tie kept with `data.keep_ties`. Each loss returns per-sample values;
the trainer averages them over the batch.

beta convention: ours is the official research code's (5000 for SD1.5 and SDXL), with each error the mean
over all latent elements; a sum over N elements instead would make beta N times larger for the same step.
diffusers' SD1.5 DPO script computes `-logsigmoid(beta' * (ref_diff - model_diff))`, i.e. beta' = beta / 2;
its SDXL script uses our -0.5 * beta. flow_grpo (train_sd3_dpo.py) and Flow-Factory (trainers/dpo.py) use ours
exactly, with beta 100 for SD3.5-M LoRA (Flow-Factory's default is 2000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_dpo.errors import UserError


@dataclass
class LossOutput:
    loss: Tensor  # (B,) per-sample loss
    inside: Tensor  # (B,) beta * h, the implicit reward margin (0 for losses that have none)


def implicit_margin(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> Tensor:
    """h = -0.5 * ((model_w - model_l) - (ref_w - ref_l)); positive when the model prefers the winner more than the reference does."""
    return -0.5 * ((model_w - model_l) - (ref_w - ref_l))


def smooth_labels(label: Tensor, eps: float) -> Tensor:
    """Conservative-DPO labels: p -> eps + (1 - 2 eps) p (1 -> 1-eps, 0 -> eps, a tie's 0.5 unchanged)."""
    return label if eps == 0 else eps + (1.0 - 2.0 * eps) * label


def _label(label: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.ones_like(like) if label is None else label.to(like)


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float,
             label: Optional[Tensor] = None) -> LossOutput:
    """Diffusion-DPO (sigmoid): loss = -[p log σ(inside) + (1-p) log σ(-inside)], inside = β·h.

    With p = 1 (a decided pair) this is exactly -log σ(-0.5·β·(Δmodel - Δref)); at θ = ref it is log 2.
    """
    inside = beta * implicit_margin(model_w, model_l, ref_w, ref_l)
    p = _label(label, inside)
    loss = -(p * F.logsigmoid(inside) + (1 - p) * F.logsigmoid(-inside))
    return LossOutput(loss=loss, inside=inside)


def hinge_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float,
               label: Optional[Tensor] = None) -> LossOutput:
    """Hinge (SLiC-style) on the same margin: loss = p·relu(1 - inside) + (1-p)·relu(1 + inside), inside = β·h."""
    inside = beta * implicit_margin(model_w, model_l, ref_w, ref_l)
    p = _label(label, inside)
    loss = p * F.relu(1 - inside) + (1 - p) * F.relu(1 + inside)
    return LossOutput(loss=loss, inside=inside)


def ipo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float,
             label: Optional[Tensor] = None) -> LossOutput:
    """IPO (Azar et al. 2023) on the same log-ratio: loss = (h - (2p - 1) / (2β))².

    IPO's objective is (h - 1/(2τ))², so β here is IPO's τ (not 1/τ): a larger β asks for a smaller margin, i.e.
    a stronger pull toward the reference, as in DPO. A decided pair regresses h to 1/(2β); a tie (p = 0.5)
    regresses it to 0. Reported inside = β·h.
    """
    h = implicit_margin(model_w, model_l, ref_w, ref_l)
    p = _label(label, h)
    loss = (h - (2 * p - 1) / (2 * beta)) ** 2
    return LossOutput(loss=loss, inside=beta * h)


def sft_loss(model_w: Tensor, model_l: Optional[Tensor], ref_w: Optional[Tensor], ref_l: Optional[Tensor],
             beta: float, label: Optional[Tensor] = None) -> LossOutput:
    """Supervised fine-tuning on winners (the paper's baseline): loss = p·mse_w + (1-p)·mse_l.

    Needs no reference (the trainer passes None); inside is β·h for logging when reference
    errors are given, else 0. When every p is 1 the losers carry no weight, and the trainer does not run the
    model on them at all: model_l is then None and loss = mse_w.
    """
    p = _label(label, model_w)
    if model_l is None:
        return LossOutput(loss=model_w, inside=torch.zeros_like(model_w))
    loss = p * model_w + (1 - p) * model_l
    if ref_w is None or ref_l is None:
        inside = torch.zeros_like(model_w)
    else:
        inside = beta * implicit_margin(model_w, model_l, ref_w, ref_l).detach()
    return LossOutput(loss=loss, inside=inside)


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool  # False: the trainer skips the reference forward pass entirely
    # True: with every label 1 the loss depends on the winners alone; the trainer then runs the model on the
    # winners only and passes model_l=None (SFT: half the forward and backward)
    winners_only: bool = False


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, needs_reference=True),
    "hinge": LossSpec(hinge_loss, needs_reference=True),
    "ipo": LossSpec(ipo_loss, needs_reference=True),
    "sft": LossSpec(sft_loss, needs_reference=False, winners_only=True),
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name; a `UserError` lists the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UserError(f"unknown loss '{name}': choose one of {', '.join(sorted(LOSSES))}") from None


def implicit_accuracy(inside: Tensor) -> Tensor:
    """Per-sample implicit accuracy: 1 where inside > 0, 0 where < 0, 0.5 for an exact tie (as at initialisation)."""
    return (inside > 0).float() + 0.5 * (inside == 0).float()
