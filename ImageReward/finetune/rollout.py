"""The ReFL rollout: denoise without gradients up to a random step, the last K denoiser calls with gradients,
x0, decode.

K = 1 is the algorithm of the original ``ReFL.py:700-756``; K > 1 backpropagates through the last K steps of
the chain (DRaFT-K, Clark et al. 2024; a K drawn per update is AlignProp's randomised truncation, Prabhudesai
et al. 2023). The same functions serve DDPM-family UNets (x0 from the scheduler) and flow-matching transformers
(``x0 = x_t - sigma_t * v``); the trainer, validation and tests share them.

>>> scheduler = training_scheduler(pipe.scheduler.config)                      # doctest: +SKIP
>>> x0 = rollout(unet, scheduler, family, cond, latents, stop_index=35)       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .families import Conditioning, ModelFamily

__all__ = ["training_scheduler", "is_flow_matching", "rollout", "decode", "draw_stop_index", "draw_backprop_steps",
           "initial_latents"]

logger = logging.getLogger(__name__)


def is_flow_matching(scheduler_or_config: Any) -> bool:
    """Whether a scheduler (or its config dict) is a flow-matching one (SD3, FLUX)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    name = config.get("_class_name", "") or type(scheduler_or_config).__name__
    return str(name).startswith("FlowMatch")


def training_scheduler(base_config: dict[str, Any]) -> Any:
    """The rollout scheduler from the base model's scheduler config.

    Flow-matching bases (SD3, FLUX): ``FlowMatchEulerDiscreteScheduler`` with the config's ``shift`` /
    dynamic shifting, deterministic (``stochastic_sampling`` off). Others: ``DDPMScheduler`` with ``clip_sample``
    off. A default ``DDPMScheduler()`` clips x0 to [-1, 1], which zeroes the reward gradient wherever it clips;
    SD configs say ``clip_sample: false`` and so does this scheduler, whatever the config holds.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_matching(base_config):
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config), stochastic_sampling=False)
    if base_config.get("clip_sample", False):
        logger.warning("base scheduler config has clip_sample=%s; ReFL uses clip_sample=False (clipping x0 kills "
                       "the reward gradient)", base_config.get("clip_sample"))
    return DDPMScheduler.from_config(dict(base_config), clip_sample=False)


def draw_stop_index(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (both inclusive), from ``generator``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def draw_backprop_steps(max_steps: int, randomised: bool, generator: torch.Generator) -> int:
    """K for one update: ``max_steps``, or uniform in ``[1, max_steps]`` when ``randomised`` (AlignProp).
    Draws nothing from ``generator`` unless randomised, so K = 1 runs keep the ReFL random stream."""
    return draw_stop_index(1, max_steps, generator) if randomised and max_steps > 1 else max_steps


def initial_latents(batch: int, channels: int, height: int, width: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """``N(0, I)`` latents drawn on the CPU from ``generator`` (same numbers on any device)."""
    return torch.randn(batch, channels, height, width, generator=generator).to(device)


def _predict(unet: Any, scheduler: Any, family: ModelFamily, latents: torch.Tensor, t: torch.Tensor,
             cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
             time_ids: torch.Tensor | None) -> torch.Tensor:
    """The denoiser output (noise or velocity) at ``t``, with classifier-free guidance when ``uncond`` is given."""
    if uncond is not None and guidance_scale > 1.0:
        both = Conditioning.cat([uncond, cond])
        ids = None if time_ids is None else torch.cat([time_ids, time_ids]) if time_ids.ndim == 2 else time_ids
        out_uncond, out_cond = family.predict(unet, scheduler, torch.cat([latents, latents]), t, both, ids).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return family.predict(unet, scheduler, latents, t, cond, time_ids)


def rollout(unet: Any, scheduler: Any, family: ModelFamily, cond: Conditioning, latents: torch.Tensor, *,
            num_inference_steps: int = 40, stop_index: int | None = None, uncond: Conditioning | None = None,
            guidance_scale: float = 1.0, generator: torch.Generator | None = None,
            time_ids: torch.Tensor | None = None, backprop_steps: int = 1,
            checkpoint_steps: bool = False) -> torch.Tensor:
    """Denoise ``latents`` ``[B, C, h, w]``; return x0 predicted at ``timesteps[stop_index]`` (float32).

    Steps ``stop_index - backprop_steps + 1 .. stop_index`` run with gradients (the ones before under
    ``no_grad``), so the reward gradient flows through ``backprop_steps`` denoiser calls. With
    ``checkpoint_steps`` each of those calls is recomputed in the backward pass (``torch.utils.checkpoint``),
    keeping one step's activations alive instead of K. ``stop_index=None``: run every step without gradients
    and return the final sample (inference at the training setting).

    Raises ValueError if ``backprop_steps`` does not fit before ``stop_index``.
    """
    timesteps = family.set_timesteps(scheduler, num_inference_steps, latents)
    flow = is_flow_matching(scheduler)
    latents = latents.float() * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at sigma 1
    if stop_index is not None and not 1 <= backprop_steps <= stop_index + 1:
        raise ValueError(f"backprop_steps={backprop_steps} needs 1 <= K <= stop_index + 1 = {stop_index + 1}")
    first_grad = len(timesteps) if stop_index is None else stop_index - backprop_steps + 1

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _predict(unet, scheduler, family, x, t, cond, uncond, guidance_scale, time_ids).float()

    def predict_grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if checkpoint_steps:
            return torch.utils.checkpoint.checkpoint(predict, x, t, use_reentrant=False)
        return predict(x, t)

    with torch.no_grad():
        for t in timesteps[:first_grad]:
            latents = scheduler.step(predict(latents, t), t, latents, generator=generator).prev_sample
    if stop_index is None:
        return latents
    assert not latents.requires_grad, "the no-grad prefix must not build a graph"
    for t in timesteps[first_grad:stop_index]:
        latents = scheduler.step(predict_grad(latents, t), t, latents, generator=generator).prev_sample
    t = timesteps[stop_index]
    out = predict_grad(latents, t)
    if flow:
        return latents - scheduler.sigmas[stop_index].to(latents.device) * out
    return scheduler.step(out, t, latents, generator=generator).pred_original_sample


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(x0 / scaling_factor [+ shift])`` mapped to ``[0, 1]`` and clamped, float32 ``[B, 3, H, W]``."""
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    image = vae.decode(latents.to(vae.dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)
