"""The ReFL rollout: denoise without gradients up to a random step, one UNet call with gradients, x0, decode.

This is the algorithm of the original ``ReFL.py:700-756`` as functions the trainer, validation and tests share.

>>> scheduler = training_scheduler(pipe.scheduler.config)                      # doctest: +SKIP
>>> x0 = rollout(unet, scheduler, family, cond, latents, stop_index=35)       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .families import Conditioning, ModelFamily

__all__ = ["training_scheduler", "rollout", "decode", "draw_stop_index", "initial_latents"]

logger = logging.getLogger(__name__)


def training_scheduler(base_config: dict[str, Any]) -> Any:
    """``DDPMScheduler`` from the base model's scheduler config, with ``clip_sample`` off.

    A default ``DDPMScheduler()`` clips x0 to [-1, 1], which zeroes the reward gradient wherever it clips;
    SD configs say ``clip_sample: false`` and so does this scheduler, whatever the config holds.
    """
    from diffusers import DDPMScheduler

    if base_config.get("clip_sample", False):
        logger.warning("base scheduler config has clip_sample=%s; ReFL uses clip_sample=False (clipping x0 kills "
                       "the reward gradient)", base_config.get("clip_sample"))
    return DDPMScheduler.from_config(dict(base_config), clip_sample=False)


def draw_stop_index(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (both inclusive), from ``generator``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def initial_latents(batch: int, channels: int, height: int, width: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """``N(0, I)`` latents drawn on the CPU from ``generator`` (same numbers on any device)."""
    return torch.randn(batch, channels, height, width, generator=generator).to(device)


def _predict(unet: Any, scheduler: Any, family: ModelFamily, latents: torch.Tensor, t: torch.Tensor,
             cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
             time_ids: torch.Tensor | None) -> torch.Tensor:
    height, width = latents.shape[-2:]
    if uncond is not None and guidance_scale > 1.0:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        both = Conditioning.cat([uncond, cond])
        ids = None if time_ids is None else torch.cat([time_ids, time_ids]) if time_ids.ndim == 2 else time_ids
        eps_uncond, eps_cond = unet(model_in, t, **family.unet_kwargs(both, height, width, ids)).sample.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    model_in = scheduler.scale_model_input(latents, t)
    return unet(model_in, t, **family.unet_kwargs(cond, height, width, time_ids)).sample


def rollout(unet: Any, scheduler: Any, family: ModelFamily, cond: Conditioning, latents: torch.Tensor, *,
            num_inference_steps: int = 40, stop_index: int | None = None, uncond: Conditioning | None = None,
            guidance_scale: float = 1.0, generator: torch.Generator | None = None,
            time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise ``latents``; return x0 predicted at ``timesteps[stop_index]`` with gradients through that one
    UNet call (the steps before it run under ``no_grad``). ``stop_index=None``: run every step without
    gradients and return the final sample (inference at the training setting)."""
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    latents = latents.float() * scheduler.init_noise_sigma
    prefix = timesteps if stop_index is None else timesteps[:stop_index]
    with torch.no_grad():
        for t in prefix:
            eps = _predict(unet, scheduler, family, latents, t, cond, uncond, guidance_scale, time_ids)
            latents = scheduler.step(eps.float(), t, latents, generator=generator).prev_sample
    if stop_index is None:
        return latents
    assert not latents.requires_grad, "the no-grad prefix must not build a graph"
    t = timesteps[stop_index]
    eps = _predict(unet, scheduler, family, latents, t, cond, uncond, guidance_scale, time_ids)
    return scheduler.step(eps.float(), t, latents, generator=generator).pred_original_sample


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(x0 / scaling_factor [+ shift])`` mapped to ``[0, 1]`` and clamped, float32 ``[B, 3, H, W]``."""
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    image = vae.decode(latents.to(vae.dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)
