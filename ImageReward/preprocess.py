"""Image preprocessing, without torchvision.

Two paths with the same geometry:

* :func:`preprocess_pil` reproduces the original's torchvision pipeline on PIL images bit for bit:
  bicubic resize of the short side to ``image_size`` (long side truncated, done by PIL in the image's own
  mode), centre crop with rounded offsets, *then* RGB conversion, ``/255`` and CLIP mean/std.
* :func:`preprocess_tensor` is the differentiable twin for ``[B, 3, H, W]`` pixels in ``[0, 1]`` (ReFL,
  ``score_grad``): bicubic resize with antialiasing, centre crop, normalisation.

:class:`PreprocessConfig` also describes the two other pipelines the CLIP-based preference models use:

* transformers' ``CLIPImageProcessor`` (PickScore): RGB conversion *first*, PIL bicubic resize of the short
  side, centre crop with **floored** offsets (``crop_offset="floor"``, ``convert_rgb_first=True``);
* open_clip's ``ResizeMaxSize`` (HPSv2, ``geometry="longest_edge_pad"``): ``ToTensor`` first, then a
  *tensor* bicubic resize with antialiasing (torchvision's default since 0.17; no clamping) of the **long**
  side to ``image_size`` with Python-rounded sizes, then zero padding to a square (left/top get
  ``pad // 2``), then mean/std. Both :func:`preprocess_pil` and :func:`preprocess_tensor` run it on tensors,
  so the PIL path and the differentiable path are the same operations.

and the one of HPSv3 (Qwen2-VL), ``geometry="smart_resize"``: no crop and no fixed size. hpsv3's
``fetch_image`` (a copy of ``qwen_vl_utils``) converts to RGB (alpha dropped), picks a size whose sides are
multiples of ``resize_factor`` (28) with about ``min_pixels``..``max_pixels`` pixels (:func:`smart_resize`,
200,704 for HPSv3), resizes with PIL bicubic, then the slow ``Qwen2VLImageProcessor`` rescales
(``uint8 -> float64 * (1/255) -> float32``) and normalises in float32. The result is ``[3, h, w]`` with ``h, w``
depending on the image, so a batch of such images is a list (see ``engine.stack_pixels``); the model cuts it
into Qwen2-VL patches itself (``models/hpsv3.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError

__all__ = ["CLIP_MEAN", "CLIP_STD", "PreprocessConfig", "preprocess_pil", "preprocess_tensor", "resized_size",
           "resize_longest_edge_and_pad", "smart_resize"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: above this many pixels after the resize (aspect ratios beyond ~1:1300 at 224), only the cropped part is
#: resized; every ordinary image takes the original's exact path (docs/differences.md)
MAX_RESIZED_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class PreprocessConfig:
    """How a scorer wants its pixels: a square ``image_size`` image, then ``(x - mean) / std``.

    ``geometry``: ``"shortest_edge_crop"`` (resize the short side, centre-crop; OpenAI CLIP, BLIP,
    transformers) or ``"longest_edge_pad"`` (resize the long side on tensors, zero-pad; open_clip's
    ``ResizeMaxSize``, used by HPSv2). ``crop_offset``: ``"round"`` (torchvision ``CenterCrop``) or
    ``"floor"`` (transformers ``CLIPImageProcessor``). ``convert_rgb_first``: convert to RGB before resizing
    (transformers) instead of after cropping (the original torchvision pipelines).
    ``geometry="smart_resize"`` (HPSv3, Qwen2-VL): sides multiples of ``resize_factor``, about
    ``min_pixels``..``max_pixels`` pixels (:func:`smart_resize`), no crop; ``image_size`` is unused.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    geometry: str = "shortest_edge_crop"
    crop_offset: str = "round"
    convert_rgb_first: bool = False
    resize_factor: int = 28
    min_pixels: int = 0
    max_pixels: int = 0

    def __post_init__(self) -> None:
        if self.geometry not in ("shortest_edge_crop", "longest_edge_pad", "smart_resize"):
            raise InvalidInputError("geometry must be 'shortest_edge_crop', 'longest_edge_pad' or 'smart_resize', "
                                    f"got {self.geometry!r}")
        if self.crop_offset not in ("round", "floor"):
            raise InvalidInputError(f"crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")

    def crop_start(self, length: int) -> int:
        """Offset of a centred ``image_size`` window in ``length`` pixels, by this config's rounding rule."""
        if self.crop_offset == "floor":
            return (length - self.image_size) // 2
        return int(round((length - self.image_size) / 2.0))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` rule: short side -> ``size``, long side ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """``(h, w)``: sides multiples of ``factor``, close to ``height x width`` in aspect, with about
    ``min_pixels``..``max_pixels`` pixels. hpsv3 1.0.0's ``smart_resize`` (``hpsv3/dataset/utils.py``, a copy
    of ``qwen_vl_utils``), with Python's round-half-even: sides round to the nearest multiple (at least
    ``factor``); above ``max_pixels`` both shrink by ``sqrt(h*w/max)`` and floor, below ``min_pixels`` both grow
    by ``sqrt(min/(h*w))`` and ceil. So the result may overshoot ``min_pixels`` (28x20 -> 532x392 for 200,704)
    or stay under ``max_pixels``. Raises :class:`InvalidInputError` for an aspect ratio above 200 (the original
    raises ``ValueError`` there).

    >>> smart_resize(512, 512, 28, 200704, 200704)
    (448, 448)
    """
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(f"image of {width}x{height} pixels: aspect ratio {max(height, width) / min(height, width):.1f} "
                                "is above 200, which Qwen2-VL (HPSv3) does not take; crop or pad it first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _smart_resize_pil(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """hpsv3's ``fetch_image`` then the slow ``Qwen2VLImageProcessor``'s rescale and normalise: ``[3, h, w]``."""
    image = image.convert("RGB")  # alpha dropped, not composited (as fetch_image)
    height, width = smart_resize(image.height, image.width, config.resize_factor, config.min_pixels, config.max_pixels)
    image = image.resize((width, height), Image.BICUBIC)
    # transformers' rescale: float64 multiply by the float64 1/255, cast to float32; normalise in float32
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))


def preprocess_pil(image: Image.Image, config: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """PIL image -> float32 ``[3, S, S]`` tensor, exactly as the original ``_transform(224)`` (or, per
    ``config``, transformers' ``CLIPImageProcessor`` / open_clip's ``ResizeMaxSize``; ``[3, h, w]`` for
    HPSv3's ``smart_resize``).

    >>> preprocess_pil(Image.new("RGB", (300, 200))).shape
    torch.Size([3, 224, 224])
    """
    if config.geometry == "smart_resize":
        return _smart_resize_pil(image, config)
    size = config.image_size
    if config.geometry == "longest_edge_pad":
        rgb = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        return _normalise(resize_longest_edge_and_pad(rgb[None].float() / 255.0, size)[0], config)
    if config.convert_rgb_first:
        image = image.convert("RGB")
    new_size = resized_size(*image.size, size)
    top, left = config.crop_start(new_size[1]), config.crop_start(new_size[0])
    if new_size[0] * new_size[1] > MAX_RESIZED_PIXELS:
        # an extreme aspect ratio (a 1 x 10000 strip would become 224 x 2240000): resize only the part the
        # crop keeps (PIL's ``box``), within a few grey levels of the full resize, instead of gigabytes
        scale_x, scale_y = image.size[0] / new_size[0], image.size[1] / new_size[1]
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        image = image.resize((size, size), Image.BICUBIC, box=box).convert("RGB")
    else:
        if new_size != image.size:
            image = image.resize(new_size, Image.BICUBIC)
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
    if config.geometry == "longest_edge_pad":
        return _normalise(resize_longest_edge_and_pad(pixels, size), config)
    height, width = pixels.shape[-2:]
    if config.geometry == "smart_resize":  # HPSv3: the same sizes as the PIL path, antialiased bicubic (PIL's a=-0.5)
        new_h, new_w = smart_resize(height, width, config.resize_factor, config.min_pixels, config.max_pixels)
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        return _normalise(pixels, config)
    new_w, new_h = resized_size(width, height, size)
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = config.crop_start(new_h), config.crop_start(new_w)
    pixels = pixels[..., top : top + size, left : left + size]
    return _normalise(pixels, config)


def _normalise(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[..., 3, H, W]`` pixels (torchvision ``Normalize``)."""
    shape = (3, 1, 1)
    mean = torch.tensor(config.mean, dtype=pixels.dtype, device=pixels.device).view(shape)
    std = torch.tensor(config.std, dtype=pixels.dtype, device=pixels.device).view(shape)
    return (pixels - mean) / std


def resize_longest_edge_and_pad(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize(size)`` on ``[B, C, H, W]`` float pixels, differentiable.

    The long side becomes ``size`` and the short side ``round(short * size / long)`` (Python rounding),
    by bicubic interpolation with antialiasing and no clamping (torchvision >= 0.17 ``resize`` on a
    tensor); then zeros pad the short side to ``size``, ``pad // 2`` before and the rest after. Unlike the
    original, an image whose long side is already ``size`` is padded too (the original skips both steps
    when the scale is exactly 1 and then crashes on a non-square image).

    >>> resize_longest_edge_and_pad(torch.ones(1, 3, 48, 64), 32).shape
    torch.Size([1, 3, 32, 32])
    """
    height, width = pixels.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - pixels.shape[-2], size - pixels.shape[-1]
    if pad_h or pad_w:
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return pixels
