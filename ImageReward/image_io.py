"""The one image loader: turns whatever a user passes as "an image" into a ``PIL.Image``.

Accepted: a path (``str`` or ``os.PathLike``), encoded file bytes, a ``PIL.Image.Image``, a ``numpy`` array (``HxW`` or
``HxWxC`` with C in 1/3/4; ``uint8``, or floats in [0, 1]) or a ``torch.Tensor`` (``CxHxW`` or ``HxWxC``,
same value rules). Anything else, and any file that cannot be decoded, raises a typed error that names
the offending item, so a bad input can never silently score another image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError, UnsupportedInputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, Any]

# File extensions taken for images when a folder is listed (score-dataset folders, benchmark generations).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

__all__ = ["ImageLike", "IMAGE_EXTENSIONS", "load_image", "describe"]


def describe(item: Any, index: int | None = None) -> str:
    """A short human-readable name for an input item, used in error messages."""
    where = f"image #{index} " if index is not None else "image "
    if isinstance(item, (str, os.PathLike)):
        return f"{where}{os.fspath(item)!r}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"{where}({len(item)} bytes)"
    if isinstance(item, Image.Image):
        return f"{where}(PIL {item.mode} {item.size[0]}x{item.size[1]})"
    shape = getattr(item, "shape", None)
    if shape is not None:
        return f"{where}({type(item).__name__} of shape {tuple(shape)})"
    return f"{where}({type(item).__name__})"


def load_image(item: ImageLike, *, index: int | None = None) -> Image.Image:
    """Return ``item`` as a fully decoded ``PIL.Image`` (mode unchanged: preprocessing converts).

    >>> load_image(Image.new("RGB", (4, 4))).size
    (4, 4)
    """
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        return _open_path(Path(os.fspath(item)), item, index)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(item)), item, index)
    if isinstance(item, np.ndarray):
        return _from_array(item, item, index)
    if type(item).__module__.startswith("torch"):
        tensor = item.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        return _from_array(tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy(), item, index)
    raise UnsupportedInputError(
        f"{describe(item, index)}: unsupported type {type(item).__name__}; "
        "expected a file path, image bytes, PIL.Image, numpy array or torch.Tensor"
    )


def _open_path(path: Path, item: Any, index: int | None) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(f"{describe(item, index)}: file does not exist")
    if path.is_dir():
        raise ImageLoadError(f"{describe(item, index)}: is a directory, expected an image file")
    return _decode(path, item, index)


def _decode(source: Path | io.BytesIO, item: Any, index: int | None) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()  # decode now: truncated files fail here, not later inside preprocessing
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{describe(item, index)}: cannot decode image ({err})") from err


def _from_array(array: np.ndarray, item: Any, index: int | None) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UnsupportedInputError(
            f"{describe(item, index)}: expected HxW or HxWxC (C=1,3,4) pixels, got shape {tuple(array.shape)}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise UnsupportedInputError(f"{describe(item, index)}: expected uint8 or float pixels, got {array.dtype}")
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0 or np.isnan(array).any()):
            raise ImageLoadError(f"{describe(item, index)}: float pixels must lie in [0, 1]")
        array = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{describe(item, index)}: image is empty")
    return Image.fromarray(np.ascontiguousarray(array))
