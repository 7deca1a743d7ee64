"""The paper's pre-training regulariser: a noise-prediction loss on image-text pairs (absent from the
original SD1.x code; broken in the original SDXL code), added to the ReFL loss in the same optimizer step.

Each pair is augmented once per draw (resize, crop, flip from the trainer's generator), and the SDXL
time ids are computed from *that* augmentation, so latents and time ids always agree. When augmentation
is deterministic (``--center_crop`` and no ``--random_flip``) latents and time ids are cached per image.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..image_io import load_image
from .data import ImageTextExample
from .families import Components, ModelFamily
from .losses import pretrain_loss

__all__ = ["augment", "PretrainBranch"]


def augment(path: str, resolution: int, *, center_crop: bool, random_flip: bool, generator: torch.Generator
            ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], bool]:
    """Image -> ``[3, R, R]`` in ``[-1, 1]``, its original (h, w), the crop's top-left (y, x), flipped?"""
    image = load_image(path).convert("RGB")
    original = (image.height, image.width)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    scale = resolution / min(original)
    size = (max(resolution, round(original[0] * scale)), max(resolution, round(original[1] * scale)))
    pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if center_crop:
        top, left = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    else:
        top = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    pixels = pixels[:, top : top + resolution, left : left + resolution]
    flipped = bool(random_flip and torch.rand(1, generator=generator).item() < 0.5)
    if flipped:
        pixels = pixels.flip(-1)
    return pixels * 2 - 1, original, (top, left), flipped


class PretrainBranch:
    """Draws pre-training pairs, encodes them to latents (cached when deterministic), computes the loss."""

    def __init__(self, examples: Sequence[ImageTextExample], family: ModelFamily, components: Components,
                 noise_scheduler: Any, *, resolution: int, center_crop: bool, random_flip: bool,
                 snr_gamma: float | None) -> None:
        self.examples, self.family, self.components = list(examples), family, components
        self.scheduler = noise_scheduler
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.snr_gamma = snr_gamma
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def deterministic(self) -> bool:
        return self.center_crop and not self.random_flip

    @torch.no_grad()
    def _latent(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self.cache:
            return self.cache[index]
        vae = self.components.vae
        pixels, original, crop, _ = augment(self.examples[index].image, self.resolution,
                                            center_crop=self.center_crop, random_flip=self.random_flip,
                                            generator=generator)
        dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
        latent = (dist.mean + dist.std * noise).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latent = ((latent - shift) * vae.config.scaling_factor)[0]
        time_ids = self.family.time_ids(self.resolution, self.resolution, original=original, crop=crop)
        time_ids = torch.zeros(6) if time_ids is None else time_ids
        if self.deterministic:
            self.cache[index] = (latent, time_ids)
        return latent, time_ids

    def loss(self, unet: Any, indices: Sequence[int], generator: torch.Generator, weight_dtype: torch.dtype
             ) -> torch.Tensor:
        """Noise-prediction loss of the UNet on the pairs ``indices`` (float32 scalar)."""
        pairs = [self._latent(i, generator) for i in indices]
        latents = torch.stack([p[0] for p in pairs])
        device = latents.device
        cond = self.family.encode_prompts(self.components, [self.examples[i].text for i in indices]).to(weight_dtype)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),),
                                  generator=generator).to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        time_ids = torch.stack([p[1] for p in pairs]).to(device)
        kwargs = self.family.unet_kwargs(cond, self.resolution, self.resolution, time_ids)
        pred = unet(noisy, timesteps, **kwargs).sample
        return pretrain_loss(pred, target, scheduler=self.scheduler, timesteps=timesteps, snr_gamma=self.snr_gamma)
