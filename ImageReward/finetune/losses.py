"""The two ReFL losses: the reward hinge, and the (optional) pre-training noise-prediction loss.

>>> refl_loss(torch.tensor([1.0, 3.0]), grad_scale=1e-3)
tensor(0.0005)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["refl_loss", "pretrain_loss", "min_snr_weights"]


def refl_loss(rewards: torch.Tensor, grad_scale: float = 1e-3, margin: float = 2.0) -> torch.Tensor:
    """``grad_scale * mean(relu(margin - rewards))`` (the original's ``ReFL.py:755-756``)."""
    return grad_scale * F.relu(margin - rewards.float()).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights ``min(SNR, gamma) / SNR`` (epsilon) or ``/ (SNR + 1)`` (v-prediction)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def pretrain_loss(model_pred: torch.Tensor, target: torch.Tensor, *, scheduler=None, timesteps=None,
                  snr_gamma: float | None = None) -> torch.Tensor:
    """Noise-prediction MSE in float32, optionally Min-SNR weighted per sample."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample.device)).mean()
