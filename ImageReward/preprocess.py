"""Image preprocessing, without torchvision.

Two paths with the same geometry:

* :func:`preprocess_pil` reproduces the original's torchvision pipeline on PIL images bit for bit:
  bicubic resize of the short side to ``image_size`` (long side truncated, done by PIL in the image's own
  mode), centre crop with rounded offsets, *then* RGB conversion, ``/255`` and CLIP mean/std.
* :func:`preprocess_tensor` is the differentiable twin for ``[B, 3, H, W]`` pixels in ``[0, 1]`` (ReFL,
  ``score_grad``): bicubic resize with antialiasing, centre crop, normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError

__all__ = ["CLIP_MEAN", "CLIP_STD", "PreprocessConfig", "preprocess_pil", "preprocess_tensor", "resized_size"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a scorer wants its pixels: square ``image_size`` crop, then ``(x - mean) / std``."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` rule: short side -> ``size``, long side ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_pil(image: Image.Image, config: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """PIL image -> float32 ``[3, S, S]`` tensor, exactly as the original ``_transform(224)``.

    >>> preprocess_pil(Image.new("RGB", (300, 200))).shape
    torch.Size([3, 224, 224])
    """
    size = config.image_size
    new_size = resized_size(*image.size, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    # ToTensor + Normalize in float32 numpy: the same IEEE operations as torch's (bit-identical), but never
    # multi-threaded, so that decoding threads (Scorer.score_batch) do not each start an OpenMP team.
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))


def preprocess_tensor(pixels: torch.Tensor, config: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """Differentiable ``[B, 3, H, W]`` pixels in ``[0, 1]`` -> normalised ``[B, 3, S, S]``.

    >>> preprocess_tensor(torch.rand(2, 3, 64, 96)).shape
    torch.Size([2, 3, 224, 224])
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InvalidInputError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
    size = config.image_size
    height, width = pixels.shape[-2:]
    new_w, new_h = resized_size(width, height, size)
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    pixels = pixels[..., top : top + size, left : left + size]
    mean = torch.tensor(config.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std
