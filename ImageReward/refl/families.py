"""Model families: what differs between Stable Diffusion 1.x and SDXL, behind one small interface.

A family loads the components of a base model, encodes prompts into UNet conditioning (hidden states plus
SDXL's added conditioning), and builds the matching diffusers pipeline. The trainer never branches on the
family itself.

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

__all__ = ["Components", "Conditioning", "ModelFamily", "SD1Family", "SDXLFamily", "get_family", "FAMILIES"]

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The parts of a base model the trainer uses (tokenizers and encoders in family order)."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str = ""
    revision: str | None = None

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]


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

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.hidden.to(dtype), None if self.pooled is None else self.pooled.to(dtype))


class ModelFamily:
    """Base class: SD1.x behaviour. Subclasses override what differs."""

    name = "sd1"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    tokenizer_subfolders: tuple[str, ...] = ("tokenizer",)
    text_encoder_subfolders: tuple[str, ...] = ("text_encoder",)

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

        quiet_torchvision_fallback()
        common = {"revision": revision, "cache_dir": cache_dir}
        tokenizers = [transformers.CLIPTokenizer.from_pretrained(base, subfolder=sub, **common)
                      for sub in self.tokenizer_subfolders]
        encoders = [getattr(transformers, cls).from_pretrained(base, subfolder=sub, variant=variant, **common,
                                                               **dtype_kwargs("transformers", weight_dtype))
                    for cls, sub in zip(self.text_encoder_classes, self.text_encoder_subfolders)]
        vae_source = {"pretrained_model_name_or_path": vae} if vae else \
            {"pretrained_model_name_or_path": base, "subfolder": "vae", "variant": variant}
        vae_config = AutoencoderKL.load_config(**vae_source, **common)
        vae_model = AutoencoderKL.from_pretrained(**vae_source, **common,
                                                  **dtype_kwargs("diffusers", self.vae_dtype(vae_config, weight_dtype)))
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=variant, **common,
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

    # ---------------------------------------------------------------- pipelines
    def build_pipeline(self, components: Components, unet: Any, scheduler: Any | None = None) -> Any:
        """An inference pipeline from in-memory components (the base's own scheduler unless given)."""
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


def _scheduler_from_config(config: dict[str, Any]) -> Any | None:
    """The base model's own scheduler class (e.g. PNDM, Euler) from its config, or None if unknown."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    return cls.from_config(config) if cls is not None and hasattr(cls, "from_config") else None


FAMILIES: dict[str, type[ModelFamily]] = {"sd1": SD1Family, "sdxl": SDXLFamily}


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``"sd1"`` or ``"sdxl"``)."""
    if name not in FAMILIES:
        raise ReFLConfigError(f"--model_family {name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]()
