"""The method: one micro-batch of B pairs (winner first) turned into the Diffusion-DPO loss and its metrics.

  1. the latents of both images: encoded now with the frozen VAE, or sampled from the cached posteriors
     (`cache.store.cached_inputs`), (2B, C, h, w) as [winners; losers];
  2. ONE timestep and ONE noise per pair, the same for both images (`randomness.pair_noise`, from the pair's seed);
  3. the frozen reference's per-sample errors ref_w, ref_l (no grad), or the precomputed ones that came with the
     batch (`cache.reference`);
  4. the trainable denoiser on the same 2B noisy latents in one forward: model_w, model_l;
  5. the registry loss (`training.losses`, dpo by default) turns the four errors into a per-pair loss.
Unpaired feedback (kto) runs the same recipe on B single images. Everything model-specific (prompt encoding,
latents, the schedule and target, the denoiser call) is the family's (`models/`); this step never asks which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from diffusion_dpo.cache.store import cached_inputs
from diffusion_dpo.config import LossConfig
from diffusion_dpo.models import Family
from diffusion_dpo.models.reference import Reference
from diffusion_dpo.randomness import pair_noise, seed_for, seed_global
from diffusion_dpo.training.losses import (LossSpec, implicit_accuracy, scale_gradient, smooth_labels,
                                           winner_safeguard_scale)

METRIC_KEYS = ("loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l")


@dataclass
class StepOutput:
    loss: Tensor  # scalar, with grad
    metrics: dict[str, Tensor]  # detached scalars (no host sync)


@dataclass
class PreferenceStep:
    """What one micro-batch's loss needs: the family, the loss and its settings, where the reference errors come
    from, and the run's fixed shapes. Called with the (prepared) denoiser, a batch and the micro-step index."""

    accelerator: Any
    family: Family
    loss_spec: LossSpec
    loss: LossConfig
    reference: Optional[Reference]  # None: the errors come precomputed with the batch, or the loss needs none
    precomputed: bool  # the batch carries ref_mse (cache.reference precomputed)
    cached: bool  # the batch carries cached posteriors and encodings
    latent_shape: tuple[int, ...]
    images_per_item: int  # 2: pairs; 1: unpaired items
    resolution: int
    seed: int
    weight_dtype: torch.dtype
    channels_last: bool = False

    def __call__(self, denoiser: torch.nn.Module, batch: dict[str, Any], micro_step: int) -> StepOutput:
        acc, comp, loss_cfg = self.accelerator, self.family, self.loss
        device = acc.device
        # dropout (LoRA dropout) draws from the global generator: seed it per micro-step and process
        seed_global(seed_for(self.seed, micro_step, acc.process_index), device)
        b = batch["label"].shape[0]

        # Each pair's timestep, noise and VAE posterior samples come from its own sample seed (fixed by
        # the data order), so they do not depend on how pairs are split over processes or micro-steps.
        draws = pair_noise(batch["sample_seed"].tolist(), comp.draw_timestep, self.latent_shape, device,
                           images=self.images_per_item, posterior_shape=comp.posterior_shape(self.resolution))
        latents, cond = self.inputs(batch, draws.posterior)  # (2B, C, h, w) [winners; losers]
        noisy, target = comp.noisy_and_target(latents, draws.noise, draws.timesteps)
        timesteps = draws.timesteps
        label = smooth_labels(batch["label"], loss_cfg.label_smoothing)  # (B,) on the host: no device sync
        # SFT on decided pairs gives the losers weight 0: do not run the model on them at all
        # an unpaired item is one image: its errors arrive as model_w / ref_w, with model_l = ref_l = None
        winners_only = self.images_per_item == 1 or (self.loss_spec.winners_only and bool((label == 1).all()))
        if winners_only and self.images_per_item == 2:
            noisy, target, timesteps, cond = noisy[:b], target[:b], timesteps[:b], comp.first_images(cond, b)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)

        def mse(model: torch.nn.Module) -> tuple[Tensor, Optional[Tensor]]:
            err = comp.mse(model, noisy, timesteps, cond, target)  # (2B,), or (B,) winners only
            return (err, None) if winners_only else (err[:b], err[b:])

        ref_w = ref_l = None
        if self.precomputed:
            ref = batch["ref_mse"].to(device, non_blocking=True)  # (B, G): no forward
            ref_w, ref_l = ref[:, 0], (ref[:, 1] if ref.shape[1] == 2 else None)
        elif self.loss_spec.needs_reference:
            with torch.no_grad(), acc.autocast(), self.reference.model(acc.unwrap_model(denoiser)) as ref:
                ref_w, ref_l = mse(ref)
        loser_scale = None
        with acc.autocast():
            if loss_cfg.safeguard and not winners_only:
                res = comp.residual(denoiser, noisy, timesteps, cond, target)  # (2B, C, h, w)
                err = comp.error(res, timesteps)
                loser_scale = winner_safeguard_scale(res[:b], res[b:], comp.loss_weight(timesteps[:b]),
                                                     loss_cfg.safeguard_mu)
                model_w, model_l = err[:b], scale_gradient(err[b:], loser_scale)  # same value, scaled gradient
            else:
                model_w, model_l = mse(denoiser)
        extra = {"batch_mean": lambda t: acc.reduce(t, reduction="mean"),
                 "weight_desirable": loss_cfg.kto_weight_desirable,
                 "weight_undesirable": loss_cfg.kto_weight_undesirable} if self.loss_spec.unpaired else {}
        out = self.loss_spec.fn(model_w, model_l, ref_w, ref_l, beta=loss_cfg.beta,
                                label=label.to(device, non_blocking=True), **extra)
        loss = out.loss.mean()
        not_run = torch.full((), float("nan"), device=device)  # losers the model was not run on: logged as null
        loser_ref = ref_l if ref_l is not None else model_l
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": implicit_accuracy(out.inside.detach()).mean(),
            "reward_margin": out.inside.detach().mean(),
            "model_mse_w": model_w.detach().mean(),
            "model_mse_l": model_l.detach().mean() if model_l is not None else not_run,
            "ref_mse_w": (ref_w if ref_w is not None else model_w).detach().mean(),
            "ref_mse_l": loser_ref.detach().mean() if loser_ref is not None else not_run,
        }
        if loss_cfg.safeguard:
            metrics["loser_scale"] = loser_scale if loser_scale is not None else torch.ones((), device=device)
        return StepOutput(loss=loss, metrics=metrics)

    def inputs(self, batch: dict[str, Any], posterior_eps: Tensor) -> tuple[Tensor, Any]:
        """Latents (2B, C, h, w) as [winners; losers] and their conditioning, from the cache or encoded now."""
        comp, device = self.family, self.accelerator.device
        if self.cached:
            return cached_inputs(batch, posterior_eps, comp, self.resolution, device, self.weight_dtype)
        pixels = batch["pixel_values"]  # (B, G, 3, H, W): a pair's winner first (G = 2), or one unpaired image
        pixels = torch.cat(pixels.unbind(1)).to(device, non_blocking=True)  # (GB, 3, H, W)
        latents = comp.encode_images(pixels, posterior_eps).float()
        ids = {key: batch[key].to(device, non_blocking=True) for key in comp.tokenizer.keys}
        cond = comp.conditioning(comp.encode_prompt(ids), batch["original_sizes"], batch["crop_top_lefts"],
                                 self.resolution)
        return latents, cond
