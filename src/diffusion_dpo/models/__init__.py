"""The model-family seam: one contract (`family.Family`), one module per family, and the loader.

    family.py   the contract every family implements (text, images, schedule, denoiser, outputs, identity)
    sd.py       SD 1.x/2.x and SDXL (UNet, DDPM schedule, epsilon / v targets)
    flow.py     flow matching, shared by SD3, FLUX.1 and Z-Image (sigma sampling, shift, x_t, v = eps - x_0, weighting)
    sd3.py      SD3 / SD3.5 (MMDiT; CLIP-L + CLIP-G + T5)
    flux.py     FLUX.1 dev/schnell (packed latents, position ids, guidance embedding; CLIP-L + T5)
    zimage.py   Z-Image (a single-stream DiT; Qwen3 in its chat template, each prompt its own length)
    flux2.py    FLUX.2 [klein] and [dev] (an LLM's layers side by side; patchified, BatchNorm-normalised latents)
    qwenimage.py  Qwen-Image (an MMDiT; Qwen2.5-VL in its system-prompt template, masked; a one-frame video VAE)
    llm.py      chat-template tokenization for LLM text encoders
    packing.py  2x2 latent packing (FLUX.1, Qwen-Image)
    loading.py  model_index.json -> the family -> only the parts a job needs
    lora.py, reference.py   adapters, and the reference (adapters off / a frozen copy)
    vae.py, precision.py    the shared VAE and dtype helpers
"""

from diffusion_dpo.models.family import Family, PromptTokenizer, ids_key
from diffusion_dpo.models.loading import FAMILIES, describe, family_class, load_components, read_model_index
from diffusion_dpo.models.lora import add_lora, lora_targets
from diffusion_dpo.models.precision import cast, weight_dtype_of
from diffusion_dpo.models.reference import Reference
from diffusion_dpo.models.vae import LatentScale, load_vae, sample_latents

__all__ = ["FAMILIES", "Family", "LatentScale", "PromptTokenizer", "Reference", "add_lora", "cast", "describe",
           "family_class", "ids_key", "load_components", "load_vae", "lora_targets", "read_model_index",
           "sample_latents", "weight_dtype_of"]
