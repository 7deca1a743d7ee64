"""Working across the transformers / diffusers versions people run: transformers 4 and 5, with or without
torchvision.

* transformers 5 renamed the PIL image processors (``CLIPImageProcessor`` needs torchvision there and falls back
  to ``CLIPImageProcessorPil``, logging a warning each time diffusers imports a pipeline module). A pipeline
  saved in such an environment names ``CLIPImageProcessorPil`` in ``model_index.json``, a class transformers 4
  does not have: :func:`make_pipeline_portable` writes the standard name back.
* transformers 4.56 and recent diffusers renamed ``torch_dtype=`` to ``dtype=`` (the old name warns):
  :func:`dtype_kwargs`.

>>> make_pipeline_portable("out/refl")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["quiet_torchvision_fallback", "make_pipeline_portable", "dtype_kwargs"]

logger = logging.getLogger(__name__)

# transformers/utils/import_utils.py (5.x): "`X` requires torchvision (not installed); falling back to `XPil` ..."
_FALLBACK_MESSAGE = "requires torchvision (not installed); falling back to"
_PIL_SUFFIX = "Pil"


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops only transformers' "requires torchvision ... falling back to ...Pil" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _FALLBACK_MESSAGE not in record.getMessage()


def quiet_torchvision_fallback() -> None:
    """Silence transformers 5's warning that a ``*ImageProcessor`` falls back to its PIL twin without torchvision.

    diffusers imports ``CLIPImageProcessor`` (and ``SiglipImageProcessor``) when a pipeline module loads, so every
    ReFL run printed two such warnings about classes it never uses for training. Only that message is dropped,
    on the logger that emits it; every other transformers warning still shows. Idempotent."""
    emitter = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in emitter.filters):
        emitter.addFilter(_TorchvisionFallbackFilter())


def dtype_kwargs(library: str, dtype: torch.dtype) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for a load dtype: ``dtype=`` where ``library`` ("transformers" or
    "diffusers") has it (transformers >= 4.56; the diffusers releases that deprecate ``torch_dtype``), else the
    older ``torch_dtype=`` (same meaning; the new name would be ignored there, the old one warns here)."""
    if library == "transformers":
        import transformers

        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        new_name = (major, minor) >= (4, 56)
    else:
        from diffusers.utils import deprecation_utils

        new_name = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if new_name else {"torch_dtype": dtype}


def make_pipeline_portable(folder: str | os.PathLike) -> list[str]:
    """Rewrite transformers-5-only class names in a saved pipeline's ``model_index.json`` to the standard ones
    both transformers 4 and 5 load (``CLIPImageProcessorPil`` -> ``CLIPImageProcessor``; transformers 5 maps the
    standard name back to the PIL class when torchvision is absent). Returns the components rewritten."""
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    changed = []
    for name, value in index.items():
        if (isinstance(value, list) and len(value) == 2 and value[0] == "transformers" and isinstance(value[1], str)
                and value[1].endswith("ImageProcessor" + _PIL_SUFFIX)):
            value[1] = value[1][: -len(_PIL_SUFFIX)]
            changed.append(name)
    if changed:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        logger.info("model_index.json: standard image processor class names for %s (loads on transformers 4 and 5)",
                    ", ".join(changed))
    return changed
