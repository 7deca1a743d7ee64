"""The one image loader: turns whatever a user passes as "an image" into a ``PIL.Image``.

Accepted: a path (``str`` or ``os.PathLike``), encoded file bytes, a ``PIL.Image.Image``, a ``numpy`` array (``HxW`` or
``HxWxC`` with C in 1/3/4; ``uint8``, ``uint16`` (scaled by 255/65535), or floats in [0, 1]) or a ``torch.Tensor``
(``CxHxW`` or ``HxWxC``, same value rules). Anything else, and any file that cannot be decoded, raises a typed
error that names the offending item, so a bad input can never silently score another image.

A 3-D array or tensor whose first *and* last dimensions could both be channels (1, 3 or 4), e.g. ``[3, 64, 3]``,
has no single reading (``CxHxW`` and ``HxWxC`` are different pictures): it raises :class:`UnsupportedInputError`
naming the shape, rather than guessing: pass a ``PIL.Image`` then. A 4-D batch is refused too (pass a list).

Folders are listed by :func:`list_images` / :func:`list_subfolders` (every entry point that reads a folder uses
them): hidden entries (names starting with ``.``, such as ``.ipynb_checkpoints/`` or macOS ``._photo.png``) and
operating-system clutter (``__MACOSX``, ``Thumbs.db``, ``desktop.ini``) are skipped, as torchvision's
``ImageFolder`` and Hugging Face's ``imagefolder`` do, with a count in the log.

Images are read as people see them (differences from the original, see ``docs/differences.md``):

* the EXIF ``Orientation`` tag (2-8) is applied, as ``transformers``/``diffusers`` ``load_image``, ComfyUI and the
  WebUI do (``exif_transpose=False`` keeps the original's behaviour: pixels as stored);
* high-bit-depth images (PIL modes ``I;16*``, ``I``, ``F``) are scaled to 8 bits, never clipped: ``I;16`` by
  255/65535; ``I`` as 16-bit when its values exceed 255; ``F`` in [0, 1] times 255, in [0, 255] as is; other
  values are refused. 48-bit RGB PNGs are reduced to 8 bits per channel by Pillow when decoded;
* an alpha channel that hides nothing (every value 254 or 255: opaque, or only its lowest bit used, as SD WebUI
  Forge's default *Stealth infotext* stores the generation parameters) is dropped, so such a PNG scores as its RGB
  pixels (the original resized it as premultiplied RGBA, whose rounding moves scores by ~1e-4).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, UnsupportedInputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, Any]

# File extensions taken for images when a folder is listed (score-dataset folders, benchmark generations).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Names that are never data: OS and tool clutter (dot-names are skipped as well, see is_hidden).
SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "ehthumbs.db", "$recycle.bin",
                          "system volume information"})

__all__ = ["ImageLike", "IMAGE_EXTENSIONS", "SYSTEM_NAMES", "load_image", "describe", "to_eight_bit", "is_hidden",
           "list_images", "list_subfolders"]

logger = logging.getLogger(__name__)

# modes that preprocessing converts to RGB directly (8 bits per sample)
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


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


def load_image(item: ImageLike, *, index: int | None = None, exif_transpose: bool = True) -> Image.Image:
    """Return ``item`` as a fully decoded ``PIL.Image`` of 8 bits per sample (the mode is otherwise unchanged:
    preprocessing converts to RGB). ``exif_transpose``: apply the EXIF orientation of files, bytes and PIL
    images (default, as ``transformers.image_utils.load_image``); ``False`` uses the pixels as stored.

    Raises :class:`ImageLoadError` (missing, not a regular file, undecodable, closed, empty, out-of-range
    pixels) or :class:`UnsupportedInputError` (a type or layout this loader does not read), naming the item.

    >>> load_image(Image.new("RGB", (4, 4))).size
    (4, 4)
    """
    if isinstance(item, Image.Image):
        return _checked_pil(item, item, index, exif_transpose)
    if isinstance(item, (str, os.PathLike)):
        return _checked_pil(_open_path(Path(os.fspath(item)), item, index), item, index, exif_transpose)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _checked_pil(_decode(io.BytesIO(bytes(item)), item, index), item, index, exif_transpose)
    if isinstance(item, np.ndarray):
        _check_unambiguous(item.shape, item, index)
        return _from_array(item, item, index)
    if type(item).__module__.startswith("torch"):
        if getattr(item, "is_meta", False):
            raise UnsupportedInputError(f"{describe(item, index)}: a meta tensor holds no pixels")
        tensor = item.detach().cpu()
        _check_unambiguous(tuple(tensor.shape), item, index)
        if tensor.ndim == 3 and tensor.shape[0] in _CHANNELS and tensor.shape[-1] not in _CHANNELS:
            tensor = tensor.permute(1, 2, 0)
        return _from_array(tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy(), item, index)
    raise UnsupportedInputError(
        f"{describe(item, index)}: unsupported type {type(item).__name__}; "
        "expected a file path, image bytes, PIL.Image, numpy array or torch.Tensor"
    )


_CHANNELS = (1, 3, 4)


def _check_unambiguous(shape: tuple[int, ...], item: Any, index: int | None) -> None:
    """Refuse a 3-D layout that reads as two different pictures (``[C, H, W]`` and ``[H, W, C]``)."""
    if len(shape) == 4:
        raise UnsupportedInputError(
            f"{describe(item, index)}: a 4-D batch of {shape[0]} images, where one image was expected; pass a "
            "list of images (e.g. list(batch)), each C x H x W or H x W x C")
    if len(shape) == 3 and shape[0] in _CHANNELS and shape[-1] in _CHANNELS:
        raise UnsupportedInputError(
            f"{describe(item, index)}: ambiguous layout {tuple(shape)}: read as C x H x W it is a "
            f"{shape[1]}x{shape[2]} picture with {shape[0]} channel(s), read as H x W x C a {shape[0]}x{shape[1]} "
            f"picture with {shape[2]} channel(s); pass a PIL image instead")


def _open_path(path: Path, item: Any, index: int | None) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(f"{describe(item, index)}: file does not exist")
    if path.is_dir():
        raise ImageLoadError(f"{describe(item, index)}: is a directory, expected an image file")
    if not path.is_file():  # a FIFO, socket or device: opening it could block forever
        raise ImageLoadError(f"{describe(item, index)}: is not a regular file (a pipe, socket or device)")
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
    if array.dtype == np.uint16:  # 16-bit pixels: scaled, never clipped
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise UnsupportedInputError(f"{describe(item, index)}: expected uint8, uint16 or float pixels in [0, 1], "
                                        f"got {array.dtype}")
        if array.size and (not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0):
            raise ImageLoadError(f"{describe(item, index)}: float pixels must lie in [0, 1]")
        array = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{describe(item, index)}: image is empty")
    return Image.fromarray(np.ascontiguousarray(array))


def _checked_pil(image: Image.Image, item: Any, index: int | None, exif_transpose: bool) -> Image.Image:
    """A usable 8-bit PIL image: not closed, not empty, orientation applied, high bit depths scaled."""
    try:
        image.load()  # a closed image raises here, a lazily opened one is decoded now
    except (ValueError, OSError, SyntaxError, AttributeError) as err:
        raise ImageLoadError(f"{describe(item, index)}: cannot read the PIL image ({err or 'closed'})") from err
    if image.size[0] == 0 or image.size[1] == 0:
        raise ImageLoadError(f"{describe(item, index)}: image is empty ({image.size[0]}x{image.size[1]})")
    if exif_transpose and _orientation(image) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    return to_eight_bit(image, describe(item, index))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: use the pixels as stored
        return 1


def _without_opaque_alpha(image: Image.Image) -> Image.Image:
    """``RGBA`` / ``LA`` whose alpha is everywhere 254 or 255 as ``RGB`` / ``L``; any other image as it is."""
    if image.mode not in ("RGBA", "LA") or image.getchannel("A").getextrema()[0] < 254:
        return image
    return image.convert("RGB" if image.mode == "RGBA" else "L")


def to_eight_bit(image: Image.Image, what: str = "image") -> Image.Image:
    """``image`` in a mode of 8 bits per sample that converts to RGB: 16-bit, 32-bit integer and float
    grayscale are scaled (never clipped, see the module docstring); ``La`` goes through ``LA``; an alpha channel
    that hides nothing (all values >= 254) is dropped. Values that
    cannot be pixels (negative, NaN, beyond 16 bits) raise :class:`ImageLoadError` naming ``what``."""
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return _without_opaque_alpha(image)
    if mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if mode == "I":
        pixels = np.asarray(image, dtype=np.int64)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ImageLoadError(f"{what}: 32-bit integer pixels in [{low}, {high}] are neither 8- nor 16-bit "
                                 "values; convert the image to 8 bits first")
        if high > 255:  # 16-bit data (e.g. a 16-bit PNG decoded as "I")
            pixels = (pixels * 255 + 32767) // 65535
        return Image.fromarray(pixels.astype(np.uint8), mode="L")
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 255.0:
            raise ImageLoadError(f"{what}: float pixels must lie in [0, 1] (or [0, 255]), got [{low:.4g}, {high:.4g}]")
        if high <= 1.0:
            pixels = pixels * 255.0
        return Image.fromarray(np.round(pixels).astype(np.uint8), mode="L")
    try:
        return image.convert("LA" if mode == "La" else "RGBA" if "A" in mode or "a" in mode else "RGB")
    except (ValueError, OSError) as err:
        raise UnsupportedInputError(f"{what}: PIL mode {mode!r} cannot be converted to RGB ({err})") from err


# ---------------------------------------------------------------------------------------------- folders
def is_hidden(name: str) -> bool:
    """True for a file or folder name that holds no data: hidden (``.ipynb_checkpoints``, ``.DS_Store``, macOS
    ``._photo.png`` resource forks) or operating-system clutter (``__MACOSX``, ``Thumbs.db``, ``desktop.ini``).

    >>> [is_hidden(n) for n in (".ipynb_checkpoints", "__MACOSX", "Thumbs.db", "cat.png")]
    [True, True, True, False]
    """
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def list_images(folder: str | os.PathLike, *, recursive: bool = True,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``), sorted by their path relative to
    ``folder`` (``/``-separated). Entries for which :func:`is_hidden` is true are skipped, with the folders
    below them; how many is logged (INFO). As ``Path.rglob``: links to files are listed, linked folders are
    not entered.

    >>> list_images("generations/")   # doctest: +SKIP
    [PosixPath('generations/0001.png'), PosixPath('generations/0002.png')]
    """
    root = Path(folder)
    found: list[Path] = []
    skipped = 0
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as err:
            logger.warning("cannot list %s (%s): skipped", current, err)
            continue
        for entry in entries:
            if is_hidden(entry.name):
                skipped += 1
            elif entry.is_dir(follow_symlinks=False):  # as Path.rglob: linked folders are not entered
                if recursive:
                    pending.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in extensions and entry.is_file():
                found.append(Path(entry.path))
    if skipped:
        logger.info("%s: skipped %d hidden or system entr%s (names starting with '.', __MACOSX, Thumbs.db, ...)",
                    root, skipped, "y" if skipped == 1 else "ies")
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def list_subfolders(folder: str | os.PathLike) -> list[str]:
    """Names of the sub-folders of ``folder``, sorted, without hidden or system ones (see :func:`is_hidden`;
    how many were skipped is logged). A missing folder has none."""
    if not os.path.isdir(folder):
        return []
    names = [entry.name for entry in os.scandir(folder) if entry.is_dir()]
    kept = sorted(name for name in names if not is_hidden(name))
    if len(kept) < len(names):
        logger.info("%s: skipped %d hidden or system folder(s): %s", folder, len(names) - len(kept),
                    ", ".join(sorted(set(names) - set(kept))))
    return kept
