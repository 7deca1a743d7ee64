"""One denoising step that also returns the log-probability of its result: the policy of online RL on diffusion
models (Flow-GRPO for flow-matching transformers, DDPO for DDIM UNets).

Both steps are Gaussian: ``prev_sample ~ N(prev_sample_mean, std^2 I)``; ``log_prob`` is the per-element Gaussian
log-density averaged over every dimension but the batch. Given ``prev_sample`` (the sample recorded during the
rollout) they score it under the current model instead of drawing a new one, which is what the policy-gradient
update needs.

- :func:`sde_step_with_logprob`: the reverse-time SDE of a rectified flow with the same marginals as the ODE
  (Liu et al. 2025, "Flow-GRPO", eq. 9), ``sigma_t = noise_level * sqrt(sigma / (1 - sigma))``; numerically the
  function of the same name in ``yifan123/flow_grpo`` (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``).
- :func:`ddim_step_with_logprob`: the DDIM step with ``eta`` (Song et al. 2021, eq. 12 and 16); numerically
  ``kvablack/ddpo-pytorch``'s ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``.

``tests/fixtures/grpo/`` holds the originals' outputs; ``tests/test_grpo.py`` compares.

>>> prev, log_prob, mean, std = sde_step_with_logprob(scheduler, velocity, t, x_t, noise_level=0.7)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["sde_step_with_logprob", "ddim_step_with_logprob", "gaussian_log_prob"]


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(sample; mean, std^2)`` per element, averaged over all dimensions but the first: shape ``[B]``.
    ``sample`` is detached (the density's gradient flows through ``mean`` and ``std`` only)."""
    log_prob = (-((sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """``N(0, I)`` as diffusers' ``randn_tensor`` draws it: on the generator's device, then moved."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def sde_step_with_logprob(scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor,
                          sample: torch.Tensor, noise_level: float = 0.7, prev_sample: torch.Tensor | None = None,
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Flow-GRPO's SDE sampler on a ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps`` ran.

    Args:
        scheduler: the flow-matching scheduler (``sigmas`` ``[N + 1]`` ending in 0, ``timesteps`` ``[N]``).
        model_output: velocity ``v`` ``[B, C, h, w]`` (cast to float32: bf16 overflows in the mean).
        timestep: ``[B]`` (or ``[1]``, broadcast) timesteps taken from ``scheduler.timesteps``.
        sample: ``x_t`` ``[B, C, h, w]``.
        noise_level: ``a`` in ``std_dev_t = a * sqrt(sigma / (1 - sigma))`` (Flow-GRPO's 0.7); at ``sigma = 1``
            (the first step of a shifted schedule) ``sigmas[1]`` stands in for the denominator's sigma.
        prev_sample: the next sample to score; drawn from ``generator`` when None.
        generator: for the noise when ``prev_sample`` is None.

    Returns:
        ``(prev_sample [B, C, h, w], log_prob [B], prev_sample_mean [B, C, h, w], std_dev_t [B, 1, 1, 1])``, all
        float32. The step's standard deviation is ``std_dev_t * sqrt(sigma - sigma_prev)``.
    """
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = [scheduler.index_for_timestep(t) for t in timestep]
    sigma = scheduler.sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = scheduler.sigmas[[i + 1 for i in step_index]].view(-1, 1, 1, 1)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma  # negative: sigma decreases towards the data

    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    if prev_sample is None:
        noise = _noise(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    log_prob = gaussian_log_prob(prev_sample, prev_sample_mean, std_dev_t * torch.sqrt(-1 * dt))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def _broadcast(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[B]`` (or a scalar) -> ``shape``, aligned on the left."""
    return values.reshape(values.shape + (1,) * (len(shape) - values.ndim)).broadcast_to(shape)


def ddim_step_with_logprob(scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                           eta: float = 1.0, use_clipped_model_output: bool = False,
                           generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step with noise ``eta`` on a ``DDIMScheduler`` whose ``set_timesteps`` ran, as DDPO takes it.

    Args:
        scheduler: a ``DDIMScheduler`` (its ``prediction_type``, ``clip_sample`` / ``thresholding`` apply).
        model_output: the UNet's prediction ``[B, C, h, w]`` (epsilon, sample or v).
        timestep: ``[B]`` integer timesteps (or a scalar tensor).
        sample: ``x_t`` ``[B, C, h, w]``.
        eta: DDIM's noise weight (DDPO's 1.0); must be > 0 for a finite log-probability.
        use_clipped_model_output: re-derive epsilon from the clipped x0 (as diffusers).
        generator: for the noise when ``prev_sample`` is None; giving both raises ``ValueError`` (as the original).
        prev_sample: the next sample to score.

    Returns:
        ``(prev_sample in sample's dtype, log_prob [B], prev_sample_mean, std_dev_t)`` (the last two broadcast to
        ``sample``'s shape: the KL penalty's inputs). As in DDPO the previous timestep is clamped to 0, so the
        last step uses ``alphas_cumprod[0]`` rather than ``final_alpha_cumprod`` (equal for SD's
        ``set_alpha_to_one=False``).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("the DDIM scheduler has no schedule: call set_timesteps first")
    timestep = torch.as_tensor(timestep)
    config = scheduler.config
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, config.num_train_timesteps - 1)

    alphas = scheduler.alphas_cumprod
    alpha_prod_t = alphas.gather(0, timestep.cpu().reshape(-1)).reshape(timestep.shape)
    alpha_prod_t_prev = torch.where(prev_timestep.cpu() >= 0,
                                    alphas.gather(0, prev_timestep.cpu().reshape(-1)).reshape(timestep.shape),
                                    scheduler.final_alpha_cumprod)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    alpha_prod_t = _broadcast(alpha_prod_t, sample.shape).to(sample.device)
    alpha_prod_t_prev = _broadcast(alpha_prod_t_prev, sample.shape).to(sample.device)
    beta_prod_t = 1 - alpha_prod_t

    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
    elif config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
        pred_epsilon = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
    else:
        raise ValueError(f"prediction_type {config.prediction_type!r}: expected epsilon, sample or v_prediction")
    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)

    std_dev_t = _broadcast(eta * variance ** 0.5, sample.shape).to(sample.device)
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction

    if prev_sample is not None and generator is not None:
        raise ValueError("give either generator or prev_sample, not both")
    if prev_sample is None:
        noise = _noise(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = gaussian_log_prob(prev_sample, prev_sample_mean, std_dev_t)
    return prev_sample.type(sample.dtype), log_prob, prev_sample_mean, std_dev_t
