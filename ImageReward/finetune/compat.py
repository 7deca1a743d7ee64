"""Working across the transformers / diffusers versions people run: transformers 4 and 5, with or without
torchvision.

* transformers 5 renamed the PIL image processors (``CLIPImageProcessor`` needs torchvision there and falls back
  to ``CLIPImageProcessorPil``, logging a warning each time diffusers imports a pipeline module). A pipeline
  saved in such an environment names ``CLIPImageProcessorPil`` in ``model_index.json``, a class transformers 4
  does not have: :func:`make_pipeline_portable` writes the standard name back.
* transformers 5 saves a tokenizer as ``tokenizer.json`` only; transformers 4's ``CLIPTokenizer`` (the class
  ``model_index.json`` names) reads ``vocab.json`` + ``merges.txt``: :func:`make_pipeline_portable` writes them
  from the ``tokenizer.json`` BPE model when they are missing.
* transformers 5 flattened ``CLIPTextModel`` and saves its weights without the ``text_model.`` prefix, which
  transformers 4 then silently skips (a random text encoder, with only a "newly initialized" warning):
  :func:`make_pipeline_portable` writes the prefixed names, which both versions load.
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
    """Make a saved diffusers pipeline load on transformers 4 and 5 alike. Returns the components changed.

    * ``model_index.json``: transformers-5-only class names -> the standard ones (``CLIPImageProcessorPil`` ->
      ``CLIPImageProcessor``; transformers 5 maps the standard name back to the PIL class without torchvision).
    * BPE tokenizers saved as ``tokenizer.json`` only get the ``vocab.json`` and ``merges.txt`` that
      transformers 4's slow tokenizer classes read (same vocabulary and merges, in the original CLIP format).
    * ``CLIPTextModel`` weights get their ``text_model.`` prefix back (the layout of every released SD model)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    changed = []
    for name, value in index.items():
        if not (isinstance(value, list) and len(value) == 2 and value[0] == "transformers" and isinstance(value[1], str)):
            continue
        if value[1].endswith("ImageProcessor" + _PIL_SUFFIX):
            value[1] = value[1][: -len(_PIL_SUFFIX)]
            changed.append(name)
        elif value[1].endswith("Tokenizer") and _write_slow_bpe_files(folder / name):
            changed.append(name)
        elif value[1] == "CLIPTextModel" and _prefix_clip_text_keys(folder / name):
            changed.append(name)
    if changed:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        logger.info("saved pipeline made loadable on transformers 4 and 5: %s", ", ".join(changed))
    return changed


def _write_slow_bpe_files(tokenizer_dir: Path) -> bool:
    """Write ``vocab.json`` / ``merges.txt`` from ``tokenizer.json`` (a BPE model) if they are missing."""
    fast = tokenizer_dir / "tokenizer.json"
    vocab_path, merges_path = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
    if not fast.is_file() or (vocab_path.is_file() and merges_path.is_file()):
        return False
    model = json.loads(fast.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return False
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab_path.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    return True


_CLIP_TEXT_PREFIX = "text_model."


def _prefix_clip_text_keys(model_dir: Path) -> bool:
    """Rename ``CLIPTextModel`` weights saved without ``text_model.`` (transformers 5) to the prefixed names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = False
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata()
            if all(key.startswith(_CLIP_TEXT_PREFIX) for key in keys):
                continue
            tensors = {key if key.startswith(_CLIP_TEXT_PREFIX) else _CLIP_TEXT_PREFIX + key: handle.get_tensor(key)
                       for key in keys}
        save_file(tensors, str(path), metadata=metadata)
        changed = True
    for index_path in model_dir.glob("*.safetensors.index.json"):
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = {k if k.startswith(_CLIP_TEXT_PREFIX) else _CLIP_TEXT_PREFIX + k: v
                               for k, v in index.get("weight_map", {}).items()}
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return changed
