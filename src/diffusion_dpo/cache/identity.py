"""What a cache and a precomputed reference table depend on, keyed by the setting a user would change: a run
that differs in any of them is refused in one line naming the setting, never silently served other encodings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from diffusion_dpo.cache.fingerprint import component_fingerprint, data_fingerprint, fingerprint
from diffusion_dpo.config import CacheConfig, DataConfig, FlowConfig, LoraConfig, ModelConfig, TrainConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import describe, weight_dtype_of
from diffusion_dpo.models.lora import lora_file
from diffusion_dpo.models.reference import reference_kind


def _resolved(spec: Optional[str]) -> Optional[str]:
    """A local path made absolute (so the same data or model named two ways matches); hub ids as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


TEXT_DTYPE = "text encoders' dtype (train.mixed_precision)"
# what a manifest written before a key existed was made with (text encoders ran in float32 then)
_BEFORE = {TEXT_DTYPE: "float32"}


def cache_identity(model: ModelConfig, data: DataConfig, cache: CacheConfig, mixed_precision: str) -> dict[str, Any]:
    """What a cache depends on, keyed by the setting a user would change; a training run must agree on all.
    `mixed_precision`: the training's; the text encoders run in its dtype (`models.load_components`), so a bf16
    run's caption encodings are not a float32 run's."""
    index, family = describe(model)
    return {
        "model family": family.name,
        "model (VAE, text encoders, tokenizers)": component_fingerprint(model, family.encoder_roles(index, model)),
        "model.variant": model.variant,
        **family.encoding_identity(model),
        "data.path": _resolved(data.path),
        "data files": data_fingerprint(data.path),
        "data.split": data.split, "data.keep_ties": data.keep_ties, "data.skip_bad_rows": data.skip_bad_rows,
        "data.max_pairs": data.max_pairs,
        **({"data.unpaired": True} if data.unpaired else {}),  # only when set: caches made before it stay valid
        # the folder local image paths must lie in decides which rows are bad (and skipped); a hub set's commit
        **({"data.image_root": str(Path(data.image_root).resolve())} if data.image_root else {}),
        **({"data.revision": data.revision} if data.revision else {}),
        "data.resolution": data.resolution,
        "cache.dtype": cache.dtype,
        TEXT_DTYPE: str(weight_dtype_of(mixed_precision)).removeprefix("torch."),
    }


def refuse_random_crop(data: DataConfig) -> None:
    """A cache holds center crops: refuse data.random_crop in one line."""
    if data.random_crop:
        raise UserError("data.random_crop: the cache stores center crops (and their flips); a crop drawn per pair "
                        "and epoch cannot be pre-encoded exactly. Set data.random_crop=false or train without "
                        "cache.dir")


def check_manifest(manifest: dict, model: ModelConfig, data: DataConfig, cache: CacheConfig,
                   directory: Path, mixed_precision: str) -> None:
    """Refuse, in one line naming the setting, a cache made with other weights, data, resolution or dtypes."""
    where = f"cache.dir '{directory}'"
    refuse_random_crop(data)
    made = manifest["identity"]
    for key, value in cache_identity(model, data, cache, mixed_precision).items():
        if key == "cache.dtype" and value == "auto":
            continue  # auto takes a cache of any storage dtype (what a new build stores: store.storage_dtype)
        if made.get(key, _BEFORE.get(key)) != value:
            raise UserError(f"{where} was made with {key} = {made.get(key)!r}, this run has {value!r}; rebuild it "
                            "with `diffusion-dpo cache` or point cache.dir elsewhere")
    if data.random_flip and not manifest["random_flip"]:
        raise UserError(f"{where} was made with data.random_flip = false (no flipped encodings), this run has true; "
                        "rebuild it with data.random_flip=true or set data.random_flip=false")


def reference_identity(model: ModelConfig, lora: LoraConfig, flow: FlowConfig, data: DataConfig, train: TrainConfig,
                       cache_manifest: dict, device_type: str) -> dict[str, Any]:
    """What the reference errors depend on (besides which pairs the run visits), keyed by the setting to change."""
    made = json.dumps(cache_manifest["identity"], sort_keys=True)
    _, family = describe(model)
    return {
        f"model ({family.denoiser_role}, scheduler)": component_fingerprint(model, (family.denoiser_role,
                                                                                   "scheduler")),
        "model.variant": model.variant,
        **family.schedule_identity(model, flow),
        "cache.dir contents": hashlib.sha256(made.encode()).hexdigest()[:16],
        "train.seed": train.seed,
        "data.random_flip": data.random_flip,
        "data.proportion_empty_prompts": data.proportion_empty_prompts,
        "train.mixed_precision": train.mixed_precision,
        # each pair's noise is drawn by a generator on the training device; CPU and CUDA streams differ
        "device type": device_type,
        # what else the reference is made of, when set (models/reference.py); absent keys keep old files valid
        **({"model.reference": component_fingerprint(replace(model, pretrained=model.reference, vae=None),
                                                     (family.denoiser_role,))} if model.reference else {}),
        **({"lora.init_from": fingerprint({"lora": lora_file(lora.init_from)})}
           if reference_kind(model, lora) == "start_adapters" else {}),
        **({"model.quantize_base": model.quantize_base} if model.quantize_base != "none" else {}),
    }
