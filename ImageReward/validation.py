"""Argument checks shared by every public function and command: numbers, devices, dtypes, pixel tensors.

Each check raises a typed error (:mod:`ImageReward.errors`) that names the argument and what was expected,
and is cheap enough to run at the top of every call (no GPU work except one ``aminmax`` on pixel tensors).
The ``arg_*`` functions are the same checks as ``argparse`` types: a bad option is a usage error (exit 2).

>>> check_positive_int("batch_size", 8)
8
>>> resolve_dtype("bf16")
torch.bfloat16
"""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Callable

import torch

from .errors import InvalidInputError, UnsupportedInputError

__all__ = ["ArgumentTypeError", "check_int", "check_positive_int", "check_non_negative_int", "check_optional_int",
           "check_float", "resolve_device", "resolve_dtype", "DTYPE_NAMES", "check_pixels", "check_range",
           "arg_positive_int", "arg_non_negative_int", "arg_positive_float", "arg_non_negative_float", "arg_dtype"]


class ArgumentTypeError(InvalidInputError, UnsupportedInputError):
    """An argument of the wrong type (``batch_size="8"``): both an :class:`InvalidInputError` and an
    :class:`UnsupportedInputError`, so code catching either sees it."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; bools, floats and strings are refused.

    Raises :class:`ArgumentTypeError` (wrong type) or :class:`InvalidInputError` (out of range), naming ``name``.
    """
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """An ``int >= 1`` (sizes, counts, steps)."""
    return check_int(name, value, minimum=1)


def check_non_negative_int(name: str, value: Any) -> int:
    """An ``int >= 0`` (worker counts, resample counts)."""
    return check_int(name, value, minimum=0)


def check_optional_int(name: str, value: Any, *, minimum: int = 1) -> int | None:
    """``None`` (meaning "the default" / "no limit"), or an ``int >= minimum``."""
    return None if value is None else check_int(name, value, minimum=minimum)


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False) -> float:
    """A finite real number in range (``strict_minimum``: ``> minimum`` instead of ``>=``)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise InvalidInputError(f"{name} must be {'>' if strict_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be <= {maximum}, got {value}")
    return value


# ------------------------------------------------------------------------------------------------ device
def _available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def resolve_device(device: Any, name: str = "device") -> torch.device:
    """``None`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``1`` (a CUDA index),
    ``"mps"`` or a ``torch.device`` -> a ``torch.device`` that exists on this machine.

    Checked before any weight is read: :class:`InvalidInputError` names the argument and the devices available;
    :class:`ArgumentTypeError` for a value that is not a device at all.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _is_int(device):
        device = f"cuda:{int(device)}"
    if isinstance(device, str):
        text = device.strip()
        if text.lower() in DTYPE_NAMES or text.startswith("torch."):
            raise InvalidInputError(f"{name}={device!r} is a dtype, not a device; pass dtype={device!r} instead")
        try:
            device = torch.device(text.lower() if text.lower() in ("cpu", "cuda", "mps", "xpu") else text)
        except (RuntimeError, ValueError) as err:
            raise InvalidInputError(f"{name}={device!r} is not a device; available: {_available_devices()}") from err
    if not isinstance(device, torch.device):
        raise ArgumentTypeError(f"{name} must be a str or torch.device such as 'cpu' or 'cuda:0', "
                                f"got {type(device).__name__}")
    kind, index = device.type, device.index
    if kind == "cpu":
        return device
    backends: dict[str, Callable[[], bool]] = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "xpu": lambda: bool(getattr(torch, "xpu", None) and torch.xpu.is_available()),
    }
    if kind not in backends or not backends[kind]():
        raise InvalidInputError(f"{name}={str(device)!r} is not available on this machine; "
                                f"available: {_available_devices()}")
    counts = {"cuda": torch.cuda.device_count, "xpu": lambda: torch.xpu.device_count()}
    if index is not None and kind in counts and index >= counts[kind]():
        raise InvalidInputError(f"{name}={str(device)!r}: this machine has {counts[kind]()} {kind} device(s); "
                                f"available: {_available_devices()}")
    return device


# ------------------------------------------------------------------------------------------------- dtype
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "full": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | None:
    """``None`` (float32), a ``torch.dtype`` or a name (``"bf16" "bfloat16" "fp16" "float16" "half" "fp32"
    "float32"``, optionally ``"torch."``-prefixed) -> ``torch.float32`` / ``float16`` / ``bfloat16``.

    Anything else (``float64``, ``int8``, ``"auto"``, a device name) raises :class:`InvalidInputError`.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise InvalidInputError(f"{name}={dtype!r} is not supported; use one of {sorted(DTYPE_NAMES)} "
                                    "or torch.float32 / torch.float16 / torch.bfloat16")
        return DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidInputError(f"{name}={dtype} is not supported; use torch.float32, torch.float16 or "
                                    "torch.bfloat16")
        return dtype
    raise ArgumentTypeError(f"{name} must be a torch.dtype or a name such as 'bf16', got {type(dtype).__name__}")


# ------------------------------------------------------------------------------------------------ pixels
def check_range(tensor: torch.Tensor, low: float, high: float, what: str, hint: str = "") -> None:
    """Raise :class:`InvalidInputError` unless every value of a floating ``tensor`` is finite and within
    ``[low, high]`` (one ``aminmax``; NaN and inf fail the comparison)."""
    if tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor.detach())
    lo, hi = float(lo), float(hi)
    if not (low <= lo and hi <= high):  # NaN compares False: caught here
        problem = "non-finite values (NaN or inf)" if not (math.isfinite(lo) and math.isfinite(hi)) else \
            f"values in [{lo:.4g}, {hi:.4g}]"
        raise InvalidInputError(f"{what} must lie in [{low:g}, {high:g}], got {problem}{hint}")


def check_pixels(pixels: Any, what: str = "pixels", *, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
    """A differentiable image batch: a floating ``torch.Tensor`` ``[B, 3, H, W]`` (B, H, W >= 1), finite,
    values within ``value_range`` (``(0, 1)``, or ``(-1, 1)`` when asked for explicitly)."""
    if not isinstance(pixels, torch.Tensor):
        raise UnsupportedInputError(f"{what} must be a torch.Tensor [B, 3, H, W], got {type(pixels).__name__}")
    if pixels.is_meta:
        raise UnsupportedInputError(f"{what} is a meta tensor: it holds no pixels")
    if not pixels.is_floating_point():
        raise UnsupportedInputError(f"{what} must be a floating tensor with values in {list(value_range)}, got "
                                    f"{pixels.dtype} (for uint8 pixels use pixels.float() / 255)")
    if pixels.ndim != 4 or pixels.shape[1] != 3 or 0 in pixels.shape:
        raise InvalidInputError(f"{what} must have shape [B, 3, H, W] with B, H, W >= 1, got {tuple(pixels.shape)}")
    hint = ("; map a VAE decode with (x / 2 + 0.5).clamp(0, 1), or pass value_range=(-1, 1)"
            if tuple(value_range) == (0.0, 1.0) else "")
    check_range(pixels, value_range[0], value_range[1], what, hint)


# --------------------------------------------------------------------------------------- argparse types
def _argparse_type(check: Callable[[str, Any], Any], convert: Callable[[str], Any], kind: str
                   ) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check("value", value)
        except InvalidInputError as err:
            raise argparse.ArgumentTypeError(str(err).replace("value ", "", 1)) from None

    parse.__name__ = kind  # argparse shows "invalid <name> value"
    return parse


arg_positive_int = _argparse_type(check_positive_int, int, "positive integer")
arg_non_negative_int = _argparse_type(check_non_negative_int, int, "non-negative integer")
arg_positive_float = _argparse_type(lambda n, v: check_float(n, v, minimum=0.0, strict_minimum=True), float,
                                    "positive number")
arg_non_negative_float = _argparse_type(lambda n, v: check_float(n, v, minimum=0.0), float, "non-negative number")


def arg_dtype(text: str) -> str:
    """argparse type for ``--dtype``: any name :func:`resolve_dtype` accepts, returned canonical."""
    try:
        return str(resolve_dtype(text)).removeprefix("torch.")
    except InvalidInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
