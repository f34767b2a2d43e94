"""Flow matching, shared by SD3/SD3.5, FLUX.1 and Z-Image: how a pair's noise level is drawn, the noisy input,
the target.

For latents x_0 and noise eps ~ N(0, I), with sigma in (0, 1) (sigma = 1 is pure noise):

    x_t    = (1 - sigma) x_0 + sigma eps          the straight path from data to noise
    target = v = eps - x_0                        its velocity, what the transformer predicts

Each pair draws ONE sigma and ONE eps (`randomness.pair_noise`), shared by its winner and loser, so the two errors
differ only through the images. sigma comes from u in (0, 1), drawn by `flow.timestep_sampling`:

    logit_normal  u = sigmoid(s z - m), z ~ N(0, 1)        (SD3 paper's default; flow_grpo, Flow-Factory, m=0, s=1)
    uniform       u ~ U(0, 1)
    mode          u = 1 - w - k (cos²(pi w / 2) - 1 + w), w ~ U(0, 1)   (SD3 paper's mode sampling, k = mode_scale)

then shifted toward noise, sigma = S u / (1 + (S - 1) u), with S = `flow.shift` or the scheduler's: SD3/SD3.5's
config `shift` (3.0), as diffusers' SD3 scripts and flow_grpo's train_sd3_dpo.py train (their sigma is the
scheduler's shifted table at index floor(1000 u)); 1 for a scheduler that shifts dynamically at sampling time
(FLUX.1-dev), as diffusers' train_dreambooth_lora_flux.py and Flow-Factory train. sigma here is continuous
(diffusers and flow_grpo round it to 1000 levels; Flow-Factory does not).

The sign of m follows diffusers, flow_grpo and Flow-Factory, not the SD3 paper's formula: they draw
u' = sigmoid(m + s z) and index the scheduler's DESCENDING timestep table with it, so their sigma is about 1 - u',
distributed as sigmoid(s z - m): m > 0 means less noise. (The paper's t = sigmoid(m + s z) means more noise for
m > 0.) At m = 0 the two agree, draw for draw. Mode sampling needs no such care: its u and 1 - u are equally
distributed.

`flow.weighting` multiplies each sample's error by w(sigma): none (1), sigma_sqrt (sigma^-2) or cosmap
(2 / (pi (1 - 2 sigma + 2 sigma²))), the SD3 paper's and diffusers' options. Applied to the policy's and the
reference's errors alike, it scales a pair's DPO margin by w(sigma); off by default, as in every anchor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusion_dpo.config import FlowConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.family import Family


@dataclasses.dataclass
class JointConditioning:
    """What a joint-attention transformer (an MMDiT: SD3, FLUX.1, FLUX.2) is conditioned on, for [winners; losers]."""

    hidden_states: Tensor  # (2B, L, D) the text tokens of the joint attention
    pooled: Tensor | None  # (2B, P) pooled text embedding; None for FLUX.2
    guidance: Tensor | None = None  # (2B,) a guidance-distilled model's guidance (FLUX.1-dev, FLUX.2 [dev]), or None

# The joint-attention projections of the MMDiT blocks (text and image streams), inside each block's `attn`:
# flow_grpo's train_sd3_dpo.py, Flow-Factory's SD3.5 adapter and diffusers' SD3 LoRA script target these eight as
# attn.to_q, ... (Flow-Factory's FLUX adapter adds the feed-forwards: configs/flux_dev_lora.yaml). The "attn."
# prefix matters in SD3.5-medium, whose dual-attention blocks hold a second self-attention `attn2` with to_q, to_k,
# to_v and to_out.0 that bare names would also adapt (243 linears instead of 191). FLUX has no attn2: the same set.
ATTENTION_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def draw_u(generator: torch.Generator, flow: FlowConfig, device: torch.device | str) -> Tensor:
    """(1,) u in (0, 1) from `flow.timestep_sampling`, one draw from `generator`."""
    if flow.timestep_sampling == "logit_normal":
        z = torch.randn((1,), generator=generator, device=device)
        return torch.sigmoid(flow.logit_std * z - flow.logit_mean)  # the sign of m: the module docstring
    w = torch.rand((1,), generator=generator, device=device)
    if flow.timestep_sampling == "mode":
        return 1 - w - flow.mode_scale * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)
    return w


def shift_sigma(u: Tensor, shift: float) -> Tensor:
    """sigma = S u / (1 + (S - 1) u): S > 1 moves noise levels toward pure noise (S = 1: sigma = u)."""
    return shift * u / (1 + (shift - 1) * u)


def loss_weight(sigma: Tensor, weighting: str) -> Tensor | None:
    """(N,) w(sigma) for `flow.weighting`, or None for none."""
    if weighting == "sigma_sqrt":
        return sigma.float() ** -2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    return None


class FlowMatching(Family):
    """The flow-matching schedule and the T5 length shared by SD3 and FLUX (see the module docstring)."""

    default_max_sequence_length: ClassVar[int]  # the pipeline's own default
    # T5's (SD3, FLUX.1) or the LLM's length; model.t5 is checked by each family (only SD3 can leave T5 out)
    settings: ClassVar[tuple[str, ...]] = ("t5", "max_sequence_length")
    max_max_sequence_length: ClassVar[int | None] = None  # the most the pipeline accepts

    @classmethod
    def load_scheduler(cls, cfg: ModelConfig) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler",
                                                               revision=cfg.revision)

    @classmethod
    def max_sequence_length_of(cls, cfg: ModelConfig) -> int:
        return cfg.max_sequence_length or cls.default_max_sequence_length

    @classmethod
    def check_index(cls, index: dict, cfg: ModelConfig, name: str) -> None:
        n = cls.max_sequence_length_of(cfg)
        if cls.max_max_sequence_length is not None and n > cls.max_max_sequence_length:
            raise UserError(f"model.max_sequence_length {n}: {cls.title}'s pipeline takes at most "
                            f"{cls.max_max_sequence_length} text tokens")

    @classmethod
    def encoding_identity(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {"model.max_sequence_length": cls.max_sequence_length_of(cfg)}

    @classmethod
    def schedule_identity(cls, cfg: ModelConfig, flow: FlowConfig) -> dict[str, Any]:
        identity = {f"flow.{k}": v for k, v in dataclasses.asdict(flow).items()}
        if flow.timestep_sampling == "logit_normal" and flow.logit_mean != 0:  # its sign changed (2026-12-07)
            identity["flow.logit_mean"] = f"{flow.logit_mean} (diffusers' sign)"
        return identity

    @property
    def max_sequence_length(self) -> int:
        return self.max_sequence_length_of(self.cfg)

    @property
    def shift(self) -> float:
        """S: `flow.shift`, else the scheduler's static shift (1 when it shifts dynamically at sampling time)."""
        if self.flow.shift is not None:
            return float(self.flow.shift)
        config = self.scheduler.config
        return 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))

    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, int, int],
                      device: torch.device | str) -> Tensor:
        """(1,) sigma of one pair."""
        return shift_sigma(draw_u(generator, self.flow, device), self.shift)

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        sigma = timesteps.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))  # (N, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise, (noise - latents).float()

    def loss_weight(self, timesteps: Tensor) -> Tensor | None:
        return loss_weight(timesteps, self.flow.weighting)

    def sampling_scheduler(self) -> Any:
        return type(self.scheduler).from_config(self.scheduler.config)

    def sampling_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}



class GuidanceEmbedded:
    """A guidance-distilled transformer (`guidance_embeds` in its config: FLUX.1-dev, FLUX.2 [dev]) takes the guidance
    scale as an input; training feeds one constant value, `model.guidance`, default the family's `default_guidance`
    (what its pipeline samples with and diffusers' and Flow-Factory's scripts train with). A transformer without the
    embedding (FLUX.1-schnell, FLUX.2 [klein]) refuses model.guidance. Mixed into a `FlowMatching` family."""

    default_guidance: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embedded_guidance()  # model.guidance refused before any work where there is no embedding

    def embedded_guidance(self) -> float | None:
        """The value fed to the guidance embedding, None where the transformer has none."""
        family: Any = self  # a FlowMatching family: cfg, denoiser_config, pretrained, title
        if not family.denoiser_config.get("guidance_embeds", False):
            if family.cfg.guidance is not None:
                raise UserError(f"model.guidance {family.cfg.guidance}: '{family.pretrained}' has no guidance "
                                f"embedding (it is not a guidance-distilled {family.title}); leave model.guidance "
                                "unset")
            return None
        return family.cfg.guidance if family.cfg.guidance is not None else self.default_guidance

    def guidance_tensor(self, n: int, device: torch.device | str) -> Tensor | None:
        """(n,) float32 guidance values, or None."""
        g = self.embedded_guidance()
        return None if g is None else torch.full((n,), g, device=device, dtype=torch.float32)

    @classmethod
    def schedule_identity(cls, cfg: ModelConfig, flow: FlowConfig) -> dict[str, Any]:
        return {**super().schedule_identity(cfg, flow), "model.guidance": cfg.guidance}  # type: ignore[misc]
