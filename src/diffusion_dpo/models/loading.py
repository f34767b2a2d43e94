"""Load a checkpoint into its `Family`: model_index.json read and checked, the family chosen by its `_class_name`,
and only the parts a job needs loaded, one by one (not through `DiffusionPipeline`).

Every class built is one that model_index.json names, restricted to the diffusers and transformers libraries: a
checkpoint can never name code to run. Adding a family is one module under models/ and one entry in FAMILIES.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from diffusion_dpo.config import FlowConfig, ModelConfig
from diffusion_dpo.errors import UserError, is_local_path
from diffusion_dpo.models.components import library_class, load_tokenizer
from diffusion_dpo.models.family import FAMILY_SETTINGS, Family
from diffusion_dpo.models.flux import Flux
from diffusion_dpo.models.flux2 import Flux2, Flux2Klein
from diffusion_dpo.models.precision import cast
from diffusion_dpo.models.qwenimage import QwenImage
from diffusion_dpo.models.sd import StableDiffusion, StableDiffusionXL
from diffusion_dpo.models.sd3 import StableDiffusion3
from diffusion_dpo.models.vae import load_vae, load_vae_config
from diffusion_dpo.models.zimage import ZImage

FAMILIES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, ZImage,
                                      Flux2Klein, Flux2, QwenImage)


def read_model_index(cfg: ModelConfig, setting: str = "model.pretrained") -> dict:
    """model_index.json of a local directory or hub repo: one-line errors (naming `setting`, the option the user
    gave) for the usual mistakes, and only diffusers/transformers components."""
    from diffusers import DiffusionPipeline

    name = f"{setting} '{cfg.pretrained}'"
    path = Path(cfg.pretrained).expanduser()
    if path.exists():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"{name} is not a diffusers pipeline directory (no model_index.json)")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{index_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    elif is_local_path(cfg.pretrained):
        raise UserError(f"{name} does not exist")
    else:
        try:
            index = DiffusionPipeline.load_config(cfg.pretrained, revision=cfg.revision)
        except Exception as exc:  # network, auth or not-found errors from the hub client
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{name} is not a local directory and could not be loaded from the hub: "
                            f"{reason}") from None
    # A checkpoint names the classes to build; only the two libraries' own may be named (no code enters).
    for key, entry in index.items():
        if not key.startswith("_") and isinstance(entry, list) and entry and \
                entry[0] not in (None, "diffusers", "transformers") and not _diffusers_pipeline_module(entry[0]):
            raise UserError(f"{name}: component {key} comes from '{entry[0]}'; only diffusers (its pipelines' "
                            "own modules included) and transformers components are loaded")
        if not key.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" \
                and str(entry[1]).startswith("Auto"):
            # an Auto class builds whatever the folder's config names (with an auto_map: code from the checkpoint)
            raise UserError(f"{name}: component {key} is transformers.{entry[1]}; name its concrete class (e.g. "
                            "CLIPTextModel): Auto classes are not loaded from a checkpoint")
    return index


def _diffusers_pipeline_module(library: object) -> bool:
    """Whether a model_index library name is one of diffusers' own pipeline submodules, which diffusers resolves
    inside `diffusers.pipelines` (SD 1.x's `["stable_diffusion", "StableDiffusionSafetyChecker"]`): code that ships
    with diffusers, never a module the checkpoint brings. We never load such a component; we only must not refuse
    the official checkpoints that name one."""
    import diffusers.pipelines

    if not isinstance(library, str) or not library.isidentifier():
        return False
    module = getattr(diffusers.pipelines, library, None)
    return getattr(module, "__name__", "") == f"diffusers.pipelines.{library}"


def family_class(index: dict, name: str) -> type[Family]:
    """The family whose pipelines include the index's `_class_name`; an unsupported one is a one-line error."""
    class_name = index.get("_class_name", "")
    for family in FAMILIES:
        if class_name in family.pipelines:
            return family
    supported = ", ".join(f"{p} ({f.title})" for f in FAMILIES for p in f.pipelines)
    raise UserError(f"{name}: model_index.json does not describe a supported model family (its _class_name is "
                    f"'{class_name or '?'}'; supported: {supported})")


def describe(cfg: ModelConfig, setting: str = "model.pretrained") -> tuple[dict, type[Family]]:
    """The checked model_index.json and its family, before any weight loads: unsupported families, settings the
    family refuses and (for a local directory) missing component folders each end in one line."""
    name = f"{setting} '{cfg.pretrained}'"
    index = read_model_index(cfg, setting)
    family = family_class(index, name)
    family.check_index(index, cfg, name)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key in FAMILY_SETTINGS:
        if key not in family.settings and getattr(cfg, key) != defaults[key]:
            takers = ", ".join(f.title for f in FAMILIES if key in f.settings)
            raise UserError(f"{name}: model.{key} is not a {family.title} setting (it is {takers}'s); a "
                            f"{family.title} model would ignore it: leave it unset")
    needed = [family.denoiser_role, "scheduler"] + (["vae"] if cfg.vae is None else [])
    needed += [role for pair in family.text_roles(index, cfg) for role in pair]
    absent = [n for n in needed if not (index.get(n) or [None])[0]]
    if absent:
        raise UserError(f"{name}: model_index.json has no {', '.join(absent)} (a {family.title} pipeline needs it)")
    path = Path(cfg.pretrained).expanduser()
    if path.exists():
        missing = [n for n in needed if not (path / n).is_dir()]
        if missing:
            raise UserError(f"{name}: missing component folder(s) {', '.join(n + '/' for n in missing)}")
    return index, family


def load_components(cfg: ModelConfig, weight_dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", denoiser: bool = True, encoders: bool = True,
                    flow: Optional[FlowConfig] = None, denoiser_dtype: torch.dtype = torch.float32) -> Family:
    """Load `cfg.pretrained` (plus `cfg.vae` if given) into its family: the denoiser in `denoiser_dtype` (fp32 to
    train every weight; a LoRA run's frozen base in its compute dtype), the text encoders frozen in `weight_dtype`,
    the VAE frozen in fp32, the tokenizers, the training noise schedule, and every config.

    `denoiser=False` skips the denoiser (the cache builder, a sample grid's frozen parts); `encoders=False` skips
    the VAE and the text encoders, reading only their configs (training from a pre-encoded cache)."""
    import diffusers

    index, family = describe(cfg)
    roles = family.text_roles(index, cfg)
    role = family.denoiser_role
    common = dict(revision=cfg.revision)
    try:
        scheduler = family.load_scheduler(cfg)
        # trust_remote_code=False: no auto_map in a checkpoint's config may bring code, nor ask on the terminal
        tokenizers = [load_tokenizer(index, t, cfg.pretrained, cfg.revision) for _, t in roles]
        text_encoders = [library_class(index[e], e).from_pretrained(cfg.pretrained, subfolder=e, variant=cfg.variant,
                                                                      torch_dtype=weight_dtype, trust_remote_code=False,
                                                                      **common)
                         for e, _ in roles] if encoders else []
        denoiser_class = library_class(index[role], role)
        model = denoiser_class.from_pretrained(cfg.pretrained, subfolder=role, variant=cfg.variant,
                                               torch_dtype=denoiser_dtype, **common) if denoiser else None
        denoiser_config = model.config if model is not None else \
            denoiser_class.load_config(cfg.pretrained, subfolder=role, **common)
        vae = load_vae(cfg, index) if encoders else None
        vae_config = vae.config if vae is not None else load_vae_config(cfg, index)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"model.pretrained '{cfg.pretrained}': {str(exc).strip().splitlines()[0]}") from None
    if vae is not None:
        # The VAE encodes in fp32 whatever the training precision (diffusers' training scripts and flow_grpo do the
        # same): the latents then match the cache's, which is encoded the same way, and SDXL's original VAE cannot
        # overflow in fp16. It is ~1-3% of a pipeline's weights; the text encoders stay in `weight_dtype`.
        cast(vae, torch.float32)
    for module in [m for m in (vae, *text_encoders) if m is not None]:
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    if model is not None:
        model.to(device)
    return family(cfg, flow or FlowConfig(), index, getattr(diffusers, index["_class_name"]), model,
                  denoiser_config, vae, vae_config, text_encoders, tokenizers, scheduler)


def same_model(a: str, b: str) -> bool:
    """Whether two model.pretrained-style names point at the same model (paths compared resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def load_reference_denoiser(cfg: ModelConfig, family: type[Family], device: torch.device | str,
                            setting: str = "model.reference") -> torch.nn.Module:
    """The denoiser of `cfg.reference` (fp32, on `device`): a pipeline of the same family and architecture as
    `cfg.pretrained`, else a one-line error before it is trained against."""
    from dataclasses import replace

    ref_cfg = replace(cfg, pretrained=cfg.reference, revision=cfg.reference_revision, vae=None)
    index = read_model_index(ref_cfg, setting)
    ref_family = family_class(index, f"{setting} '{cfg.reference}'")
    if ref_family is not family:
        raise UserError(f"{setting} '{cfg.reference}' is a {ref_family.title} model; model.pretrained "
                        f"'{cfg.pretrained}' is {family.title}")
    role = family.denoiser_role
    if not (index.get(role) or [None])[0]:
        raise UserError(f"{setting} '{cfg.reference}': model_index.json has no {role}")
    denoiser_class = library_class(index[role], role)
    try:
        config = denoiser_class.load_config(cfg.pretrained, subfolder=role, revision=cfg.revision)
        model = denoiser_class.from_pretrained(cfg.reference, subfolder=role, variant=cfg.variant,
                                               torch_dtype=torch.float32, revision=cfg.reference_revision)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"{setting} '{cfg.reference}': {str(exc).strip().splitlines()[0]}") from None
    differ = sorted(k for k in set(config) | set(model.config) if not k.startswith("_")
                    and config.get(k) != model.config.get(k))
    if differ:
        raise UserError(f"{setting} '{cfg.reference}': its {role} is another architecture than model.pretrained's "
                        f"({differ[0]} {model.config.get(differ[0])!r} vs {config.get(differ[0])!r})")
    return model.to(device)
