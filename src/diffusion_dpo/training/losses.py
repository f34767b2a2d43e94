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

Beyond the DPO family: `mapo` needs no reference (ref_w = ref_l = None); `kto` trains on unpaired items, one
image each, whose errors arrive as (model_w, ref_w) with the loser slots None and `label` 1 (desirable) or 0
(undesirable). `winner_safeguard_scale` + `scale_gradient` are Diffusion-SDPO's safeguard, which the trainer
applies to the loser error of any pairwise loss before the loss sees it.

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


def kto_loss(model: Tensor, model_l: None, ref: Tensor, ref_l: None, beta: float, label: Optional[Tensor] = None,
             batch_mean: Optional[Callable[[Tensor], Tensor]] = None, weight_desirable: float = 1.0,
             weight_undesirable: float = 1.0) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024), on unpaired items: `model` and `ref` are each image's errors, `label` 1 for a
    desirable image and 0 for an undesirable one (the pair slots model_l / ref_l are None).

        g    = ref - model                                the implicit reward (> 0: the policy denoises it better)
        z0   = max(0, mean of g over the batch and processes), detached          the KL reference point
        loss = λ_y · (1 - σ(s_y · β · (g - z0))),        s_y = +1 desirable, -1 undesirable

    as the authors' train_kto_sd_v1.5.py computes it with its defaults (jacklishufan/diffusion-kto @226bbd0,
    lines 1453-1492: g_term = policy - reference log-likelihood proxy, kl = reduce(g_term.mean()).clamp(min=0)
    at 1468-1471, l_kto = w_y * (1 - sigmoid(label_sgn * beta_dpo * (g - kl))) with --halo sigmoid).
    β is theirs unchanged (default 1000) on errors that are means over the latent elements; DPO's β puts 0.5·β on
    each image's error difference, so KTO's β ≈ β_DPO / 2 is the same scale. `batch_mean` averages over processes
    (the trainer passes accelerate's; None: this batch alone). At θ = ref every loss is λ_y / 2. Reported inside =
    s_y · β · (g - z0) (> 0: the item is on its label's side of the reference point).
    """
    y = _label(label, model)
    g = ref - model
    z0 = g.detach().mean()
    z0 = (batch_mean(z0) if batch_mean is not None else z0).clamp_min(0.0).detach()
    sign = 2.0 * y - 1.0
    inside = sign * beta * (g - z0)
    weight = weight_desirable * y + weight_undesirable * (1.0 - y)
    return LossOutput(loss=weight * (1.0 - torch.sigmoid(inside)), inside=inside)


def mapo_loss(model_w: Tensor, model_l: Tensor, ref_w: Optional[Tensor], ref_l: Optional[Tensor], beta: float,
              label: Optional[Tensor] = None, num_train_timesteps: int = 1000) -> LossOutput:
    """MaPO (Hong et al. 2024, "Margin-aware Preference Optimization ... without Reference"): no reference model.

    With e = mse and the authors' log-likelihood proxy f(e) = (s·e) / (exp(s·e) - 1), s = 0.5 (decreasing in e;
    mapo-t2i/mapo @374b3d3, utils.py compute_loss lines 286-301, args.py --snr_value 0.5), the per-pair margin
    is m = f(e_w) - f(e_l), and

        loss = p·e_w + (1-p)·e_l - β·[p log σ(T·m) + (1-p) log σ(-T·m)]

    where T is the schedule's num_train_timesteps (1000; the authors scale the margin by it "to maximise it
    throughout the denoising process"). A decided pair (p = 1) gives exactly the authors' e_w - β log σ(T·m);
    a tie weighs both images and pulls the margin to 0. β is the authors' `beta_mapo` unchanged (their
    default 0.1, args.py line 158); it does not play DPO's KL role (there is no reference). Reported inside = T·m.
    """
    p = _label(label, model_w)

    def f(e: Tensor) -> Tensor:
        x = 0.5 * e
        return x / torch.expm1(x).clamp_min(1e-12)  # x/(e^x - 1), finite as x -> 0 (its limit is 1)

    inside = num_train_timesteps * (f(model_w) - f(model_l))
    ratio = p * F.logsigmoid(inside) + (1 - p) * F.logsigmoid(-inside)
    loss = p * model_w + (1 - p) * model_l - beta * ratio
    return LossOutput(loss=loss, inside=inside)


def winner_safeguard_scale(residual_w: Tensor, residual_l: Tensor, weight: Optional[Tensor], mu: float) -> Tensor:
    """Diffusion-SDPO's loser scale λ (AIDC-AI 2025, arXiv:2511.03317; train.py's get_adaptive_lose_l_scale).

    In the denoiser's output space, g_w and g_l are the gradients of the batch's winner and loser errors; the
    update -g_w + λ g_l keeps the winner's error from growing to first order, with slack μ, when
    (-g_w + λ g_l)·g_w ≤ -μ ||g_w||², i.e. λ ≤ (1 - μ) ||g_w||² / (g_l·g_w) where g_l·g_w > 0. So

        λ = clamp((1 - μ) Σ_i w_i² ||r_w,i||² / Σ_i w_i² <r_l,i, r_w,i>, 0, 1)   (1 when the sum is ≤ 0)

    with r = prediction - target per image of pair i (N, C, h, w) and w_i its loss weight (1 for none; the
    authors' errors are unweighted, where the w_i cancel). One λ per micro-batch and process, detached, as the
    authors compute it over their local batch.
    """
    w2 = torch.ones(residual_w.shape[0], device=residual_w.device) if weight is None else weight.float() ** 2
    own = (residual_w.flatten(1).pow(2).sum(1) * w2).sum()
    cross = ((residual_l.flatten(1) * residual_w.flatten(1)).sum(1) * w2).sum()
    scale = torch.where(cross > 0, (1.0 - mu) * own / cross.clamp_min(torch.finfo(cross.dtype).tiny),
                        torch.ones_like(cross))
    return scale.clamp(0.0, 1.0).detach()


def scale_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """x in the forward pass, `scale` times its gradient in the backward pass."""
    return x.detach() + scale * (x - x.detach())


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    title: str  # what the model card calls the objective
    needs_reference: bool  # False: the trainer skips the reference forward pass entirely
    # True: with every label 1 the loss depends on the winners alone; the trainer then runs the model on the
    # winners only and passes model_l=None (SFT: half the forward and backward)
    winners_only: bool = False
    # True: a loss over pairs whose loser enters the gradient, so the winner safeguard (loss.safeguard) applies
    pairwise: bool = True
    # True: a loss over unpaired items (one image, label 1 desirable / 0 undesirable); the trainer passes
    # batch_mean (the mean over processes) and the loss.kto_* weights
    unpaired: bool = False


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, "Diffusion-DPO (Wallace et al. 2023)", needs_reference=True),
    "hinge": LossSpec(hinge_loss, "hinge loss on the Diffusion-DPO margin", needs_reference=True),
    "ipo": LossSpec(ipo_loss, "IPO on the Diffusion-DPO margin", needs_reference=True),
    "sft": LossSpec(sft_loss, "supervised fine-tuning on the preferred images", needs_reference=False,
                    winners_only=True, pairwise=False),
    "mapo": LossSpec(mapo_loss, "MaPO, reference-free (Hong et al. 2024)", needs_reference=False),
    "kto": LossSpec(kto_loss, "Diffusion-KTO on unpaired feedback (Li et al. 2024)", needs_reference=True,
                    pairwise=False, unpaired=True),
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
