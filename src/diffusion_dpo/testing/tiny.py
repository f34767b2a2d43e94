"""Tiny SD, SDXL, SD3, FLUX.1, Z-Image, FLUX.2 [klein] and [dev] and Qwen-Image pipelines built from config, saved as
real diffusers directories.

They share every code path with real checkpoints (`from_pretrained`, tokenizer files, scheduler
config), so the tests and the offline tiny run exercise exactly what users run, in seconds on a
CPU. Architecture is the real one, shrunk, with character-level CLIP and T5 tokenizers written locally:

  sd, sdxl      a 2-level UNet with cross-attention, a 2-level VAE (downsampling x2), a 2-layer CLIP text
                encoder (two for SDXL, the second with a projection giving the pooled embedding);
  sd3           an MMDiT with SD3.5's switches (QK RMS-norm, a dual-attention block), a 16-channel VAE with
                SD3's scaling and shift and no quant convs, CLIP-L + CLIP-G (with projections) + a 2-layer T5,
                FlowMatchEulerDiscreteScheduler with shift 3 (SD3.5's config);
  flux          a FLUX transformer (double- and single-stream blocks, 3-axis RoPE, a guidance embedding as in
                FLUX.1-dev; `flux-schnell`: none), FLUX's VAE scaling and shift, CLIP-L + T5, and FLUX.1-dev's
                dynamically shifting scheduler config;
  zimage        Z-Image's single-stream DiT with its refiners, a 2-layer Qwen3 and a byte-level Qwen tokenizer
                with a chat template, FLUX's VAE scaling and shift, Z-Image-Turbo's static shift 3;
  flux2-klein   FLUX.2 [klein]'s transformer (double and single blocks, 4-axis RoPE), a 28-layer narrow Qwen3 (its
                layers 9, 18, 27 read), the FLUX.2 VAE with BatchNorm statistics, a dynamically shifting scheduler;
  flux2         FLUX.2 [dev]'s: the same transformer with a guidance embedding, a 31-layer narrow Mistral 3 (layers
                10, 20, 30 read) and a byte-level Mistral tokenizer in a PixtralProcessor's folder;
  qwenimage     Qwen-Image's MMDiT, a 2-layer Qwen2.5-VL, the one-frame video VAE with per-channel mean and std.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

TOKEN_LENGTH = 16  # tokenizer model_max_length == text encoder max_position_embeddings


def _write_tokenizer(out_dir: Path, max_length: int = TOKEN_LENGTH) -> None:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt with no merges): every printable
    ASCII character, with and without the end-of-word marker, plus the start/end tokens."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
        tok = CLIPTokenizer.from_pretrained(tmp)
    tok.save_pretrained(out_dir)


def _text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TOKEN_LENGTH, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_pipeline(out_dir: str | Path, kind: str = "sd", resolution: int = 32,
                        prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny randomly initialised pipeline of `kind` (see KINDS and the module docstring) to `out_dir`
    and return the path. `prediction_type` is for the UNet kinds (flow-matching kinds predict eps - x_0)."""
    if kind not in BUILDERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return BUILDERS[kind](Path(out_dir), resolution, seed, prediction_type)


def _tiny_sd(out_dir: Path, kind: str, resolution: int, prediction_type: str, seed: int) -> Path:
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    sdxl = kind == "sdxl"
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, sample_size=resolution, scaling_factor=0.18215 if not sdxl else 0.13025,
                        force_upcast=sdxl)
    text_dims = 32 + (32 if sdxl else 0)  # SDXL concatenates both encoders' penultimate hidden states
    if sdxl:
        # Real SDXL's shape, shrunk: a plain block, then cross-attention blocks with linear projections and
        # deeper transformers; its conv shortcuts see non-contiguous inputs as in the real model.
        unet_kwargs = dict(
            block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), use_linear_projection=True,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8))
    else:
        unet_kwargs = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    unet_kwargs.update(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                       cross_attention_dim=text_dims, norm_num_groups=32)
    if sdxl:
        # pooled text embedding (32) + 6 time ids (original size, crop top-left, target size) x 8 dims each
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=32 + 6 * 8)
    unet = UNet2DConditionModel(**unet_kwargs)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, steps_offset=1)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 1), text_encoder_2=_text_encoder(True, seed + 2),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **schedule))
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=_text_encoder(False, seed + 1), tokenizer=tokenizer, unet=unet,
            scheduler=PNDMScheduler(skip_prk_steps=True, **schedule),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _t5(d_model: int, seed: int) -> tuple[Any, Any]:
    """A 2-layer T5 encoder and a character-level T5 tokenizer (sentencepiece-style pieces: each printable
    character, alone and word-initial), built offline."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config), tokenizer


def _flow_vae(resolution: int, scaling: float, shift: float) -> Any:
    """SD3's and FLUX's VAE, shrunk: 16 latent channels, a scaling and a shift factor, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, sample_size=resolution, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False, force_upcast=False)


def _tiny_sd3(out_dir: Path, resolution: int, seed: int) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    vae = _flow_vae(resolution, scaling=1.5305, shift=0.0609)
    # CLIP-L and CLIP-G: 32 + 32 hidden (concatenated, padded to T5's 64), pooled 32 + 32 = the pooled projection
    clip_l, clip_g = _text_encoder(True, seed + 1), _text_encoder(True, seed + 2)
    t5, t5_tokenizer = _t5(64, seed + 3)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
    tokenizer = _clip_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(out_dir)
    return out_dir


def _tiny_flux(out_dir: Path, resolution: int, seed: int, guidance_embeds: bool) -> Path:
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    vae = _flow_vae(resolution, scaling=0.3611, shift=0.1159)
    clip = _text_encoder(False, seed + 1)  # its pooler output (32) is FLUX's pooled projection input
    t5, t5_tokenizer = _t5(32, seed + 3)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    # FLUX.1-dev's scheduler: the shift is resolution-dependent at sampling time (exp(mu), mu linear in tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=_clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


# Qwen3's chat template, reduced to what a text-to-image pipeline renders: the turns, the assistant turn opened, and
# the empty think block that enable_thinking=False asks for (Z-Image passes True: none).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def _qwen_tokenizer(max_length: int = 512) -> Any:
    """A byte-level Qwen2 BPE tokenizer without merges (each byte one token) and Qwen's chat tokens, built offline,
    with QWEN3_CHAT_TEMPLATE."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _tiny_zimage(out_dir: Path, resolution: int, seed: int) -> Path:
    """Z-Image shrunk: a 2-layer Qwen3 text encoder (the pipeline reads its second-to-last hidden state), FLUX.1's
    VAE scaling and shift, a single-stream DiT (2 main layers, 1 noise and 1 context refiner, 3-axis RoPE), and
    Z-Image-Turbo's static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tokenizer), max_position_embeddings=512))
    torch.manual_seed(seed)
    vae = _flow_vae(resolution, scaling=0.3611, shift=0.1159)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


def _tiny_flux2_klein(out_dir: Path, resolution: int, seed: int) -> Path:
    """FLUX.2 [klein] shrunk: a 28-layer Qwen3 of width 16 (the pipeline reads layers 9, 18 and 27, as the real
    one's), a FLUX.2 VAE with 8 latent channels (32 after the 2x2 patchify) and BatchNorm statistics that are not
    the fresh 0 and 1, a transformer with one double- and one single-stream block, 4-axis RoPE and no guidance
    embedding, and a dynamically shifting scheduler (the pipeline's compute_empirical_mu)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                vocab_size=len(tokenizer), max_position_embeddings=1024))
    torch.manual_seed(seed)
    vae, transformer, scheduler = _flux2_parts(resolution, guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(out_dir)
    return out_dir


# Mistral Small 3.1's chat template, reduced to what Flux2Pipeline renders: BOS, the system message and the user turn,
# each message's content a list of typed parts (only text ones here).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}")


def _mistral_tokenizer(max_length: int = 1024) -> Any:
    """A byte-level BPE tokenizer (any text encodes) whose merges are learnt from Flux2Pipeline's system message alone,
    so that the message takes 27 tokens instead of its ~180 bytes, Mistral's control and image tokens, BOS/EOS, and
    MISTRAL_CHAT_TEMPLATE, built offline with `tokenizers` (deterministic)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([SYSTEM_MESSAGE], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def _tiny_flux2(out_dir: Path, resolution: int, seed: int) -> Path:
    """FLUX.2 [dev] shrunk: a 31-layer Mistral 3 (Mistral3ForConditionalGeneration: a text model of width 16, the
    pipeline reads layers 10, 20 and 30, and a 1-layer Pixtral vision tower it never uses here), the byte-level
    Mistral tokenizer saved in a PixtralProcessor's folder layout (model_index names PixtralProcessor, as the real
    checkpoint's), the FLUX.2 VAE and transformer of `_tiny_flux2_klein` with a guidance embedding, and the dynamically
    shifting scheduler."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = _mistral_tokenizer()
    torch.manual_seed(seed + 1)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 31,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 1024},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 64, "patch_size": 16},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    vae, transformer, scheduler = _flux2_parts(resolution, guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    pipe.save_pretrained(out_dir)
    # the real checkpoint's tokenizer slot: a PixtralProcessor (whose class needs torchvision, absent here) in the
    # folder that holds its tokenizer's files
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "tokenizer" / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": 16, "spatial_merge_size": 2, "image_token": "[IMG]",
         "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=2))
    (out_dir / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "PixtralImageProcessor", "patch_size": {"height": 16, "width": 16},
         "size": {"longest_edge": 64}, "do_resize": True, "do_rescale": True, "do_normalize": True,
         "do_convert_rgb": True, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711]}, indent=2))
    return out_dir


def _flux2_parts(resolution: int, guidance_embeds: bool) -> tuple[Any, Any, Any]:
    """What FLUX.2 [klein] and [dev] share, shrunk: the VAE with 8 latent channels (32 after the 2x2 patchify) and
    BatchNorm statistics that are not the fresh 0 and 1, a transformer with one double- and one single-stream block
    and 4-axis RoPE (a guidance embedding for [dev]), and the dynamically shifting scheduler (compute_empirical_mu)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8,
                             norm_num_groups=8, sample_size=resolution)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 32))
        vae.bn.running_var.copy_(torch.linspace(0.5, 1.5, 32))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    return vae, transformer, scheduler


def _tiny_qwenimage(out_dir: Path, resolution: int, seed: int) -> Path:
    """Qwen-Image shrunk: a 2-layer Qwen2.5-VL (its text model read; a 2-block vision tower it never uses here), the
    byte-level Qwen tokenizer, the one-frame video VAE with per-channel latents_mean/std (downsampling x2), an MMDiT
    of 2 blocks with 3-axis RoPE, and Qwen-Image's dynamically shifting scheduler config."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer(1024)
    n, end = len(tokenizer), tokenizer.eos_token_id
    torch.manual_seed(seed + 1)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": n, "max_position_embeddings": 2048,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "bos_token_id": end, "eos_token_id": end},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=n, vision_start_token_id=n, vision_end_token_id=n + 1, vision_token_id=n + 2,
        image_token_id=n + 3, video_token_id=n + 4, bos_token_id=end, eos_token_id=end)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_sd15_shaped_pipeline(out_dir: str | Path, width: int = 64, resolution: int = 256, seed: int = 0) -> Path:
    """Write a randomly initialised `StableDiffusionPipeline` with SD1.5's architecture, channels scaled.

    `width` is the UNet's first block width (SD1.5: 320, giving its 860M-parameter UNet exactly): four
    levels (width x 1, 2, 4, 4), two layers per block, cross-attention in the first three, 8 heads
    (diffusers' `attention_head_dim` means the head count here; SD1.5's heads are 40 wide),
    768-dim text conditioning over 77 tokens. The VAE keeps SD's four levels (x8 downsampling) with its
    channels scaled by the same factor; the text encoder is CLIP ViT-L/14's shape (12 layers) at
    width 320, two layers otherwise. For benchmarks: no checkpoint is needed to time the architecture.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if width % 32 or width < 32:
        raise ValueError(f"width must be a positive multiple of 32 (group norm), got {width}")
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae_width = max(32, 128 * width // 320 // 32 * 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=resolution, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    text_config = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12 if width == 320 else 2, num_attention_heads=12,
                                 max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                 hidden_act="quick_gelu")
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, **schedule), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


# The published architectures, for benchmarks (random weights: no checkpoint needed to time or size them).
SHAPED = {
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: 2.24B parameters)
    "sd35-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57B parameters)
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    # black-forest-labs/FLUX.1-dev transformer/config.json (11.9B parameters)
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
}


def build_shaped_pipeline(out_dir: str | Path, name: str, resolution: int = 512, depth: int | None = None,
                          seed: int = 0) -> Path:
    """Write a randomly initialised SDXL-, SD3.5-medium- or FLUX.1-dev-shaped pipeline (see SHAPED) to `out_dir`.

    The UNet or transformer has the published config (with `depth` blocks instead when given: FLUX's double and
    single stream blocks each become `depth`, SDXL's deepest level holds `depth` transformer layers instead of 10);
    the VAE is the family's (4 levels, x8; 4 latent channels for SDXL, 16 for SD3/FLUX); the text
    encoders have the real widths and sequence lengths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096 wide) with one layer
    each, so every encoding has its real shape (what the cache stores) at a fraction of the weights, and the
    tokenizers are the local character-level ones. For `bench` and for measuring the cache's disk per pair."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers import T5Config, T5EncoderModel

    if name not in SHAPED:
        raise ValueError(f"name must be one of {', '.join(SHAPED)}, got {name!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    if name == "sdxl":
        return _build_sdxl_shaped(out_dir, resolution, depth)
    flux = name.startswith("flux")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=resolution, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611 if flux else 1.5305, shift_factor=0.1159 if flux else 0.0609)

    def clip(width: int, with_projection: bool) -> torch.nn.Module:
        config = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=1, num_attention_heads=width // 64, max_position_embeddings=77,
                                projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)

    _, t5_tokenizer = _t5(32, seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 use_cache=False, dropout_rate=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    config = dict(SHAPED[name])
    if depth is not None:
        config.update(num_layers=depth, **({"num_single_layers": depth} if flux else
                                           {"dual_attention_layers": tuple(range(min(depth, 13)))}))
    if flux:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip(768, False), tokenizer=tokenizer,
                            text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=FluxTransformer2DModel(**config))
    else:
        pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**config),
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        text_encoder=clip(768, True), tokenizer=tokenizer,
                                        text_encoder_2=clip(1280, True), tokenizer_2=tokenizer, text_encoder_3=t5,
                                        tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(out_dir)
    return out_dir



def _build_sdxl_shaped(out_dir: Path, resolution: int, depth: int | None) -> Path:
    """SDXL base's UNet (SHAPED["sdxl"]) and VAE (4 levels, 4 latent channels), CLIP-L and OpenCLIP-G of their real
    widths (768, 1280 with its 1280 projection: the pooled input of the time embedding) with one layer each."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = dict(SHAPED["sdxl"])
    if depth is not None:
        config["transformer_layers_per_block"] = (1, min(depth, 2), depth)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=resolution, scaling_factor=0.13025)

    def clip(width: int, with_projection: bool) -> torch.nn.Module:
        text = CLIPTextConfig(vocab_size=2 + 2 * 94, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                              num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text)

    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip(768, False), text_encoder_2=clip(1280, True),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**config),
                                     scheduler=scheduler)
    pipe.save_pretrained(out_dir)
    return out_dir


# Each kind's builder, keyed by its family's name (models.loading.FAMILIES: make-tiny builds one of each; a test checks
# that every family has one) or a variant's. They live here, not in the family modules: production code never imports
# these fixtures (tests/test_imports.py), so a new family brings its module and its builder here.
BUILDERS: dict[str, Callable[[Path, int, int, str], Path]] = {
    "sd": lambda out, res, seed, pred: _tiny_sd(out, "sd", res, pred, seed),
    "sdxl": lambda out, res, seed, pred: _tiny_sd(out, "sdxl", res, pred, seed),
    "sd3": lambda out, res, seed, pred: _tiny_sd3(out, res, seed),
    "flux": lambda out, res, seed, pred: _tiny_flux(out, res, seed, guidance_embeds=True),
    "flux-schnell": lambda out, res, seed, pred: _tiny_flux(out, res, seed, guidance_embeds=False),
    "zimage": lambda out, res, seed, pred: _tiny_zimage(out, res, seed),
    "flux2-klein": lambda out, res, seed, pred: _tiny_flux2_klein(out, res, seed),
    "flux2": lambda out, res, seed, pred: _tiny_flux2(out, res, seed),
    "qwenimage": lambda out, res, seed, pred: _tiny_qwenimage(out, res, seed),
}
KINDS = tuple(BUILDERS)
