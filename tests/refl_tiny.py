"""Tiny Stable Diffusion 1.x / SDXL / SD3 / FLUX.1 pipelines built from configs, for the ReFL tests (no downloads).

Sizes follow spec/diffusers-webui.md section 3: 16x16 latents -> 32x32 images, ~0.8M-parameter UNets.
The CLIP tokenizer has no merges (bytes + specials, 514 tokens), so it needs no vocabulary files; the T5
tokenizer is a character-level Unigram model built with the ``tokenizers`` library (99 tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ImageReward.clip_tokenizer import _bytes_to_unicode  # the byte-level alphabet of CLIP's BPE


PROMPTS = [f"a photo of thing number {i}" for i in range(16)]
HELD_OUT = ["a red cube", "a blue dog", "a green tree", "a yellow car"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Trainer tests: one thread (2 threads on 2 shared cores ran 5-6x slower, spec/diffusers-webui.md) and
    fresh accelerate singletons (mixed precision, accumulation) for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def _text_encoder(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(scaling_factor: float, shift_factor: float | None = None):
    """Tiny AutoencoderKL (factor 2); with ``shift_factor`` it is shaped like the SD3 / FLUX VAE (no quant convs)."""
    from diffusers import AutoencoderKL

    flow = shift_factor is not None
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=not flow,
                         use_post_quant_conv=not flow)


def tiny_t5_tokenizer():
    """A character-level T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, printable ASCII, the ``▁`` word mark)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.printable[:95]] + [("▁", -1.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _t5_encoder(tokenizer, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=48, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def build_tiny_sd1(seed: int = 0):
    """A tiny StableDiffusionPipeline with a PNDM-like (DDIM) scheduler config, clip_sample False."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    tokenizer = tiny_clip_tokenizer()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=_text_encoder(tokenizer, False), tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def build_tiny_sdxl(seed: int = 0):
    """A tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning, Euler scheduler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=_text_encoder(tokenizer, False), text_encoder_2=_text_encoder(tokenizer_2, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None,
        feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_tiny_sd3(seed: int = 0):
    """A tiny StableDiffusion3Pipeline: two CLIPs with projection, a T5, an MMDiT with a dual-attention block
    (SD3.5's), QK RMS-norm, the SD3 VAE's scaling and shift factors, and the SD3 scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 0.0609), text_encoder=_text_encoder(tokenizer, True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer_2, True), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3), tokenizer_3=tokenizer_3)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A tiny FluxPipeline (FLUX.1-dev with ``guidance_embeds``, else schnell-like): CLIP pooled + T5 sequence,
    one double and one single stream block, 2x2-packed latents, the FLUX VAE factors, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(  # dev: dynamic shifting; schnell: shift 1, no dynamic shifting
        shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return FluxPipeline(scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=_text_encoder(tokenizer, False),
                        tokenizer=tokenizer, text_encoder_2=_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
                        transformer=transformer)


TINY_BUILDERS = {"sd1": build_tiny_sd1, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline of ``family`` (sd1, sdxl, sd3, flux) and save it as a diffusers folder."""
    pipe = TINY_BUILDERS[family](seed)
    pipe.save_pretrained(directory)
    return Path(directory)


def tiny_reward(seed: int = 0):
    """A tiny ImageReward with random weights whose reward really depends on the image.

    The original head init (std 1/(d+1), five linear layers) makes a random model's reward constant to 1e-5;
    a fan-in init gives rewards of spread ~1, so there is something to learn."""
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig

    torch.manual_seed(seed)
    model = RM.ImageReward(BLIPConfig.tiny())
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
    return model.eval()


def save_tiny_reward(directory: Path, seed: int = 0) -> Path:
    """:func:`tiny_reward` saved with save_pretrained; ``RM.load(directory)`` reads it."""
    tiny_reward(seed).save_pretrained(directory)
    return Path(directory)


def train_and_check_held_out_gain(trainer, *, margin: bool = True) -> dict:
    """Render the held-out ``--validation_prompts`` before and after ``trainer.train()`` (same seeds) and assert
    the reward rose on every prompt (with ``margin``: by more than 0.01 and more than twice the gains' spread),
    with finite losses. Returns the ``train()`` result."""
    import numpy as np

    trainer.setup()
    before = torch.tensor(trainer.validate()["train_setting"]["reward"])
    result = trainer.train()
    after = torch.tensor(result["validation"][-1]["train_setting"]["reward"])
    gain = after - before
    assert bool((gain > 0).all()), (before, after)
    if margin:
        assert gain.mean().item() > 2 * gain.std().item() and gain.mean().item() > 0.01, gain
    assert all(np.isfinite(h["train_loss"]) for h in result["history"])
    return result
