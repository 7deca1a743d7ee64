"""The one checkpoint loader: safe reading (``weights_only`` / safetensors) and strict, explained loading.

``read_state_dict`` never unpickles arbitrary objects: ``.pt``/``.pth``/``.bin`` files go through
``torch.load(weights_only=True)`` and a file that would need to run code is refused with
:class:`~ImageReward.errors.CheckpointError`. The loader is called as ``torch.serialization.load``, not
``torch.load``: host applications replace the ``torch.load`` attribute (the AUTOMATIC1111 WebUI's
``modules/safe.py`` swaps in its own unpickler, which refuses the zip layout current torch writes and returns
``None``), while ``weights_only=True`` already gives the safety such patches exist for.

``load_state_dict_strict`` loads by name and refuses any missing, unexpected or mis-shaped key except those
the caller allows *by name* (fnmatch patterns); the allowed-and-ignored keys are logged, never silently dropped.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, TypeVar

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["read_state_dict", "strip_prefix", "load_state_dict_strict", "build_from_state_dict", "LoadReport"]

logger = logging.getLogger(__name__)


def read_state_dict(path: str | os.PathLike, *, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` mapping from ``.safetensors`` or a ``torch.save`` file, safely.

    ``nested_key`` picks a sub-dict (e.g. ``"model"`` for Salesforce BLIP's ``{"model": state_dict}``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"cannot read safetensors checkpoint {str(path)!r}: {err}") from err
    try:
        data = torch.serialization.load(path, map_location="cpu", weights_only=True)  # immune to host patches
    except Exception as err:
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it contains Python objects that would run code when "
                "unpickled (only tensors and plain containers are accepted; convert it to safetensors)"
            ) from err
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {text.splitlines()[0] if text else err!r}") from err
    if nested_key is not None:
        if not isinstance(data, Mapping) or nested_key not in data:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {nested_key!r} entry")
        data = data[nested_key]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(data).__name__}, expected a state dict")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} has non-tensor entries: {bad[:10]}")
    return dict(data)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (DDP's ``module.``) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


@dataclass
class LoadReport:
    """What :func:`load_state_dict_strict` did: the allowed keys it skipped, by name."""

    ignored_unexpected: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
    assign: bool = False,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` by name; raise :class:`CheckpointError` listing every problem.

    ``allow_missing`` / ``allow_unexpected`` are fnmatch patterns of keys known to be absent or unused.
    ``assign=True`` adopts the checkpoint tensors instead of copying (for modules built on the meta device).
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    report = LoadReport(
        ignored_unexpected=[k for k in unexpected if _matches(k, allow_unexpected)],
        allowed_missing=[k for k in missing if _matches(k, allow_missing)],
    )
    bad_missing = [k for k in missing if k not in report.allowed_missing]
    bad_unexpected = [k for k in unexpected if k not in report.ignored_unexpected]
    if bad_missing or bad_unexpected or mismatched:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, keys in (("missing keys", bad_missing), ("unexpected keys", bad_unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        if any(k.startswith("module.") for k in bad_unexpected):
            lines.append("  (keys start with 'module.': a DDP-wrapped save; strip the prefix)")
        raise CheckpointError("\n".join(lines))
    filtered = {k: v for k, v in state_dict.items() if k in expected}
    result = module.load_state_dict(filtered, strict=False, assign=assign)
    if result.unexpected_keys or set(result.missing_keys) - set(report.allowed_missing):
        raise CheckpointError(f"{source}: internal load mismatch {result}")
    if report.ignored_unexpected:
        logger.info("%s: ignored %d known-unused keys (%s%s)", source, len(report.ignored_unexpected),
                    ", ".join(report.ignored_unexpected[:5]), ", ..." if len(report.ignored_unexpected) > 5 else "")
    if report.allowed_missing:
        logger.info("%s: %d keys absent and left at their defaults (%s)", source, len(report.allowed_missing),
                    ", ".join(report.allowed_missing[:5]))
    return report


M = TypeVar("M", bound=nn.Module)


def build_from_state_dict(
    factory: Callable[[], M],
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    defaults: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    source: str = "checkpoint",
) -> M:
    """``factory()`` built on the meta device (no memory, no random init) that adopts the checkpoint's tensors,
    loaded strictly by name. Allowed-missing keys get a value first: ``position_ids`` buffers are ``arange``,
    anything else comes from ``defaults(key, meta_tensor)``, and without it such a key is an error (nothing is
    ever left uninitialised). Cast afterwards (``factory.place_model``): tensors keep the checkpoint's dtype.

    >>> head = build_from_state_dict(lambda: nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
    >>> head.weight.tolist()
    [[1.0, 1.0]]
    """
    allow_missing = tuple(allow_missing)
    with torch.device("meta"):
        module = factory()
    complete = dict(state_dict)
    for key, value in module.state_dict().items():
        if key in complete or not _matches(key, allow_missing):
            continue
        if key.rpartition(".")[2] == "position_ids":
            complete[key] = torch.arange(value.shape[-1]).expand(value.shape).clone()
        elif defaults is not None:
            complete[key] = defaults(key, value)
        else:
            raise CheckpointError(f"{source}: {key} is missing and has no default: it would be left uninitialised")
    load_state_dict_strict(module, complete, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                           source=source, assign=True)
    for name, buffer in list(module.named_buffers()):  # non-persistent buffers are not in any state dict
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            if leaf != "position_ids":
                raise CheckpointError(f"{source}: buffer {name} would be left uninitialised")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._buffers[leaf] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
    still_meta = [name for name, param in module.named_parameters() if param.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: parameters left uninitialised: {still_meta[:5]}")
    return module.eval()
