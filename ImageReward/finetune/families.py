"""Model families: what differs between Stable Diffusion 1.x, SDXL, SD3 / SD3.5 and FLUX.1, behind one interface.

A family loads the components of a base model, encodes prompts into the denoiser's conditioning (hidden
states plus SDXL's added conditioning or the MMDiT pooled projection), calls the denoiser (a UNet predicting
noise, or a flow-matching transformer predicting velocity), and builds the matching diffusers pipeline. The
trainer and the rollout never branch on the family itself.

>>> family = get_family("sdxl")
>>> family.pipeline_class_name
'StableDiffusionXLPipeline'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .compat import dtype_kwargs, quiet_torchvision_fallback
from .config import ReFLConfigError
from .lora import LORA_TARGETS

__all__ = ["Components", "Conditioning", "ModelFamily", "SD1Family", "SDXLFamily", "FlowMatchFamily", "SD3Family",
           "FluxFamily", "get_family", "FAMILIES"]

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The parts of a base model the trainer uses (tokenizers and encoders in family order).

    ``unet`` is the denoiser: a ``UNet2DConditionModel`` (sd1, sdxl) or a transformer (``SD3Transformer2DModel``,
    ``FluxTransformer2DModel``). An optional text encoder left out (SD3 without T5) is ``None`` in both lists."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str = ""
    revision: str | None = None

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *[e for e in self.text_encoders if e is not None]]


@dataclass
class Conditioning:
    """UNet conditioning for a batch: ``hidden`` ``[B, L, D]`` and, for SDXL, ``pooled`` ``[B, P]``."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.hidden for c in items]), pooled)

    def to(self, *args: Any, **kwargs: Any) -> "Conditioning":
        """``Tensor.to`` on every tensor (a dtype, a device, or both)."""
        return Conditioning(self.hidden.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))


class ModelFamily:
    """Base class: SD1.x behaviour. Subclasses override what differs."""

    name = "sd1"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_class_name = "UNet2DConditionModel"
    denoiser_name = "unet"  # the pipeline's component name, and the prefix of its LoRA keys
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)
    tokenizer_subfolders: tuple[str, ...] = ("tokenizer",)
    text_encoder_subfolders: tuple[str, ...] = ("text_encoder",)
    lora_targets: tuple[str, ...] = LORA_TARGETS

    @classmethod
    def from_config(cls, config: Any) -> "ModelFamily":
        """The family with the options of a :class:`~ImageReward.finetune.config.ReFLConfig` it reads (none here)."""
        return cls()

    def uses_text_encoder(self, index: int) -> bool:
        """Whether the ``index``-th text encoder is loaded (all are, except SD3's T5 with ``--drop_t5``)."""
        return True

    # ---------------------------------------------------------------- loading
    def load_components(self, base: str, *, revision: str | None = None, variant: str | None = None,
                        vae: str | None = None, cache_dir: str | None = None,
                        weight_dtype: torch.dtype = torch.float32,
                        trainable_dtype: torch.dtype = torch.float32) -> Components:
        """Load UNet, VAE, tokenizers and text encoders of ``base`` (a Hub id or a diffusers folder).

        Every module is loaded in an explicit dtype, never the one its files happen to be stored in (an
        ``--variant fp16`` or fp16-only base would otherwise leave some modules in fp16 next to an fp32 UNet):
        the frozen text encoders in ``weight_dtype`` (the training precision: fp32, fp16 or bf16), the VAE in
        :meth:`vae_dtype`, the UNet in ``trainable_dtype`` (fp32 for a full fine-tune, ``weight_dtype`` as the
        frozen base of a LoRA)."""
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        import diffusers

        quiet_torchvision_fallback()
        common = {"revision": revision, "cache_dir": cache_dir}
        count = len(self.text_encoder_classes)
        assert len(self.tokenizer_classes) == len(self.tokenizer_subfolders) == len(self.text_encoder_subfolders) \
            == count, f"{type(self).__name__}: one tokenizer class and subfolder per text encoder"
        used = [self.uses_text_encoder(i) for i in range(count)]
        tokenizers = [getattr(transformers, cls).from_pretrained(base, subfolder=sub, **common) if use else None
                      for cls, sub, use in zip(self.tokenizer_classes, self.tokenizer_subfolders, used)]
        encoders = [getattr(transformers, cls).from_pretrained(base, subfolder=sub, variant=variant, **common,
                                                               **dtype_kwargs("transformers", weight_dtype))
                    if use else None
                    for cls, sub, use in zip(self.text_encoder_classes, self.text_encoder_subfolders, used)]
        vae_source = {"pretrained_model_name_or_path": vae} if vae else \
            {"pretrained_model_name_or_path": base, "subfolder": "vae", "variant": variant}
        vae_config = AutoencoderKL.load_config(**vae_source, **common)
        vae_model = AutoencoderKL.from_pretrained(**vae_source, **common,
                                                  **dtype_kwargs("diffusers", self.vae_dtype(vae_config, weight_dtype)))
        denoiser_cls = UNet2DConditionModel if self.denoiser_name == "unet" else getattr(
            diffusers, self.denoiser_class_name)
        unet = denoiser_cls.from_pretrained(base, subfolder=self.denoiser_name, variant=variant, **common,
                                            **dtype_kwargs("diffusers", trainable_dtype))
        scheduler_config = dict(DDPMScheduler.load_config(base, subfolder="scheduler", **common))
        return Components(unet, vae_model, encoders, tokenizers, scheduler_config, source=base, revision=revision)

    def vae_dtype(self, vae_config: Any, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype at training precision ``weight_dtype``: the same for SD1.x (its VAE is fine in fp16)."""
        return weight_dtype

    def pipeline_class(self) -> Any:
        import diffusers

        quiet_torchvision_fallback()
        return getattr(diffusers, self.pipeline_class_name)

    def check_unet(self, unet: Any) -> None:
        """Raise if the UNet does not belong to this family (e.g. an SDXL model run as sd1)."""
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ReFLConfigError("this base model is SDXL (its UNet takes text_time conditioning): "
                                  "pass --model_family sdxl")

    # ---------------------------------------------------------------- conditioning
    def _token_ids(self, tokenizer: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(device)

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: Sequence[str]) -> Conditioning:
        """SD1.x: last hidden state of the CLIP text encoder, ``[B, 77, D]``."""
        encoder = components.text_encoders[0]
        ids = self._token_ids(components.tokenizers[0], prompts, encoder.device)
        return Conditioning(encoder(ids)[0])

    def unconditional(self, components: Components, batch: int) -> Conditioning:
        """Conditioning of the empty prompt (the negative branch of classifier-free guidance)."""
        return Conditioning.cat([self.encode_prompts(components, [""])] * batch)

    def time_ids(self, height: int, width: int, *, original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
        """SDXL's added time ids; SD1.x has none."""
        return None

    def unet_kwargs(self, cond: Conditioning, height: int, width: int,
                    time_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments of the UNet call besides the sample and timestep."""
        return {"encoder_hidden_states": cond.hidden}

    # ---------------------------------------------------------------- the denoiser
    def set_timesteps(self, scheduler: Any, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """Set the rollout's schedule on ``scheduler`` (as this family's pipeline does); returns its timesteps."""
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        return scheduler.timesteps

    def predict(self, unet: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One denoiser call on ``latents`` ``[B, C, h, w]`` at timestep ``t``: the UNet's noise prediction."""
        height, width = latents.shape[-2:]
        model_in = scheduler.scale_model_input(latents, t)
        return unet(model_in, t, **self.unet_kwargs(cond, height, width, time_ids)).sample

    # ---------------------------------------------------------------- pipelines
    def build_pipeline(self, components: Components, unet: Any, scheduler: Any | None = None) -> Any:
        """An inference pipeline from in-memory components (the base's own scheduler unless given); ``unet`` is
        the (possibly trained) denoiser."""
        from diffusers import DDPMScheduler

        scheduler = scheduler or _scheduler_from_config(components.scheduler_config) or DDPMScheduler.from_config(
            components.scheduler_config)
        return self.pipeline_class()(
            vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False)


class SD1Family(ModelFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, no added conditioning."""


class SDXLFamily(ModelFamily):
    """SDXL: two text encoders (penultimate hidden states concatenated; pooled projection of the second)
    and added ``time_ids`` ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")

    def vae_dtype(self, vae_config: Any, weight_dtype: torch.dtype) -> torch.dtype:
        """fp32 when training in fp16 and the VAE's config says ``force_upcast`` (the SDXL VAE overflows in fp16,
        as the SDXL pipeline knows; an fp16-fix VAE says ``force_upcast: false``); else ``weight_dtype``. bf16
        has fp32's exponent range, so the VAE runs in bf16 under bf16 (half the decode memory)."""
        config = vae_config if isinstance(vae_config, dict) else dict(vae_config)
        if weight_dtype == torch.float16 and config.get("force_upcast", True):
            return torch.float32
        return weight_dtype

    def check_unet(self, unet: Any) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ReFLConfigError("this base model is not SDXL (no text_time conditioning): pass --model_family sd1")

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
            ids = self._token_ids(tokenizer, prompts, encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unconditional(self, components: Components, batch: int) -> Conditioning:
        """Zeros, as the SDXL pipeline's ``force_zeros_for_empty_prompt`` default."""
        cond = self.encode_prompts(components, [""])
        return Conditioning(torch.zeros_like(cond.hidden).expand(batch, -1, -1),
                            torch.zeros_like(cond.pooled).expand(batch, -1))

    def time_ids(self, height: int, width: int, *, original: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        original = original or (height, width)
        return torch.tensor([original[0], original[1], crop[0], crop[1], height, width], dtype=torch.float32)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int,
                    time_ids: torch.Tensor | None = None) -> dict[str, Any]:
        batch = cond.hidden.shape[0]
        if time_ids is None:
            time_ids = self.time_ids(height, width)
        if time_ids.ndim == 1:
            time_ids = time_ids.unsqueeze(0).expand(batch, -1)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.hidden.device, cond.hidden.dtype)}
        return {"encoder_hidden_states": cond.hidden, "added_cond_kwargs": added}

    def build_pipeline(self, components: Components, unet: Any, scheduler: Any | None = None) -> Any:
        from diffusers import DDPMScheduler

        scheduler = scheduler or _scheduler_from_config(components.scheduler_config) or DDPMScheduler.from_config(
            components.scheduler_config)
        return self.pipeline_class()(
            vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=unet, scheduler=scheduler,
            image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)


class FlowMatchFamily(ModelFamily):
    """Rectified-flow transformers (SD3, FLUX.1): ``FlowMatchEulerDiscreteScheduler``, velocity prediction
    ``v = noise - x0`` on ``x_t = (1 - sigma) x0 + sigma noise``, so ``x0 = x_t - sigma_t v``.

    The schedule is the pipeline's: the base scheduler config's ``shift``, or with ``use_dynamic_shifting`` the
    ``mu`` of :func:`diffusers.pipelines.flux.pipeline_flux.calculate_shift` from the image sequence length."""

    denoiser_name = "transformer"
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    # the MMDiT attention projections, image and text streams (SD3.5's second attention ``attn2`` included)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    default_max_sequence_length = 256
    default_sigmas = False  # FluxPipeline passes sigmas linspace(1, 1/N, N); StableDiffusion3Pipeline does not
    default_max_shift = 1.16  # the pipelines' fallback when a dynamic-shifting config lacks max_shift

    def __init__(self, *, max_sequence_length: int | None = None) -> None:
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    def check_unet(self, unet: Any) -> None:
        if type(unet).__name__ != self.denoiser_class_name:
            raise ReFLConfigError(f"--model_family {self.name} expects a {self.denoiser_class_name}, this base "
                                  f"model has a {type(unet).__name__}")

    def load_components(self, base: str, *, revision: str | None = None, cache_dir: str | None = None,
                        **options: Any) -> Components:
        """As :meth:`ModelFamily.load_components` (same options), after checking ``model_index.json`` names this
        family's pipeline (a FLUX folder run as sd3 fails here with the right ``--model_family``, before any
        weight loads)."""
        from diffusers import DiffusionPipeline

        try:
            index = DiffusionPipeline.load_config(base, revision=revision, cache_dir=cache_dir)
        except Exception:  # no model_index.json (a bare folder): the denoiser class check runs after loading
            index = {}
        found = index.get("_class_name")
        if found and found != self.pipeline_class_name:
            hint = next((f" (pass --model_family {n})" for n, f in FAMILIES.items()
                         if f.pipeline_class_name == found), "")
            raise ReFLConfigError(f"--model_family {self.name} expects a {self.pipeline_class_name}, "
                                  f"{base!r} is a {found}{hint}")
        return super().load_components(base, revision=revision, cache_dir=cache_dir, **options)

    def _encoder_pipeline(self, components: Components) -> Any:
        """The family's pipeline around the loaded components, for its own ``encode_prompt``."""
        raise NotImplementedError

    def _device(self, components: Components) -> torch.device:
        return next(e for e in components.text_encoders if e is not None).device

    def set_timesteps(self, scheduler: Any, num_inference_steps: int, latents: torch.Tensor) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        kwargs: dict[str, Any] = {"device": latents.device}
        if config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(
                self.image_seq_len(latents), config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                config.get("max_shift", self.default_max_shift))
        if self.default_sigmas and not config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, **kwargs)
        return scheduler.timesteps

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens of the transformer for ``latents`` ``[B, C, h, w]`` (2x2 patches)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def unconditional(self, components: Components, batch: int) -> Conditioning:
        """The empty prompt, encoded (the pipeline's negative prompt default)."""
        return Conditioning.cat([self.encode_prompts(components, [""])] * batch)

    def build_pipeline(self, components: Components, unet: Any, scheduler: Any | None = None) -> Any:
        pipe = self._encoder_pipeline(components)
        pipe.register_modules(transformer=unet, scheduler=scheduler or _scheduler_from_config(
            components.scheduler_config))
        return pipe


class SD3Family(FlowMatchFamily):
    """SD3-medium, SD3.5-medium / large: CLIP-L and CLIP-G (penultimate hidden states, pooled projections
    concatenated) and T5-XXL (optional: ``--drop_t5`` gives zeros, as ``StableDiffusion3Pipeline`` without it)."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_class_name = "SD3Transformer2DModel"
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_subfolders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, *, max_sequence_length: int | None = None, drop_t5: bool = False) -> None:
        super().__init__(max_sequence_length=max_sequence_length)
        self.drop_t5 = drop_t5

    @classmethod
    def from_config(cls, config: Any) -> "SD3Family":
        return cls(max_sequence_length=config.max_sequence_length, drop_t5=config.drop_t5)

    def uses_text_encoder(self, index: int) -> bool:
        return not (self.drop_t5 and index == 2)

    def _encoder_pipeline(self, components: Components) -> Any:
        (te1, te2, te3), (tok1, tok2, tok3) = components.text_encoders, components.tokenizers
        return self.pipeline_class()(
            transformer=components.unet, scheduler=None, vae=components.vae, text_encoder=te1, tokenizer=tok1,
            text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt``: hidden ``[B, 77 + T5 tokens, D_t5]``, pooled
        ``[B, P_l + P_g]``."""
        hidden, _, pooled, _ = self._encoder_pipeline(components).encode_prompt(
            list(prompts), None, None, device=self._device(components), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(hidden, pooled)

    def predict(self, unet: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MMDiT's velocity for ``latents`` ``[B, C, h, w]`` (timestep in [0, 1000], as the pipeline)."""
        return unet(hidden_states=latents.to(cond.hidden.dtype), timestep=t.expand(latents.shape[0]),
                    encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled, return_dict=False)[0]


class FluxFamily(FlowMatchFamily):
    """FLUX.1-dev / schnell: CLIP-L pooled output and T5-XXL sequence; 2x2-packed latents with position ids;
    FLUX.1-dev's distilled guidance is an embedding (``--flux_guidance``), not a second batch."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_class_name = "FluxTransformer2DModel"
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    tokenizer_classes = ("CLIPTokenizer", "T5TokenizerFast")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    default_max_sequence_length = 512
    default_sigmas = True
    default_max_shift = 1.15

    def __init__(self, *, max_sequence_length: int | None = None, guidance: float = 3.5) -> None:
        super().__init__(max_sequence_length=max_sequence_length)
        self.guidance = guidance

    @classmethod
    def from_config(cls, config: Any) -> "FluxFamily":
        return cls(max_sequence_length=config.max_sequence_length, guidance=config.flux_guidance)

    def _encoder_pipeline(self, components: Components) -> Any:
        (te1, te2), (tok1, tok2) = components.text_encoders, components.tokenizers
        return self.pipeline_class()(scheduler=None, vae=components.vae, text_encoder=te1, tokenizer=tok1,
                                     text_encoder_2=te2, tokenizer_2=tok2, transformer=components.unet)

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: Sequence[str]) -> Conditioning:
        """``FluxPipeline.encode_prompt``: T5 hidden ``[B, max_sequence_length, D_t5]``, CLIP pooled ``[B, D]``."""
        hidden, pooled, _ = self._encoder_pipeline(components).encode_prompt(
            list(prompts), None, device=self._device(components), max_sequence_length=self.max_sequence_length)
        return Conditioning(hidden, pooled)

    def unconditional(self, components: Components, batch: int) -> Conditioning:
        raise ReFLConfigError("FLUX.1 is guidance-distilled: leave --guidance_scale at 1 and set --flux_guidance")

    def predict(self, unet: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pack ``latents`` ``[B, C, h, w]`` into 2x2 patches, call the transformer (timestep / 1000, the guidance
        embedding when the model has one), unpack the velocity to ``[B, C, h, w]``."""
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        dtype, device = cond.hidden.dtype, latents.device
        packed = FluxPipeline._pack_latents(latents.to(dtype), batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if _unwrap(unet).config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        out = unet(hidden_states=packed, timestep=(t.expand(batch) / 1000).to(dtype), guidance=guidance,
                   pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden, txt_ids=txt_ids,
                   img_ids=img_ids, return_dict=False)[0]
        return out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            batch, channels, height, width)


def _unwrap(model: Any) -> Any:
    """The model inside DDP / FSDP / compile wrappers (they hide ``.config``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _scheduler_from_config(config: dict[str, Any]) -> Any | None:
    """The base model's own scheduler class (e.g. PNDM, Euler) from its config, or None if unknown."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    return cls.from_config(config) if cls is not None and hasattr(cls, "from_config") else None


FAMILIES: dict[str, type[ModelFamily]] = {"sd1": SD1Family, "sdxl": SDXLFamily, "sd3": SD3Family,
                                          "flux": FluxFamily}


def get_family(name: str, config: Any | None = None) -> ModelFamily:
    """The family called ``name`` (sd1, sdxl, sd3, flux), with the options ``config`` (a ReFLConfig) sets."""
    if name not in FAMILIES:
        raise ReFLConfigError(f"--model_family {name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name].from_config(config) if config is not None else FAMILIES[name]()
