"""The loaders behind the resolver: ``load`` (ImageReward checkpoints), ``load_score`` (registered scorers), the
scorer registry, and device/dtype placement. Users and commands call :func:`ImageReward.load_scorer`
(``ImageReward/resolve.py``), which decides which of these a name means.

>>> import ImageReward as RM
>>> RM.available_models()
['ImageReward-v1.0']

Registering a scorer is one call, :func:`register_scorer` (see ``ImageReward/resolve.py`` for the recipe);
the built-in baselines register themselves in ``ImageReward/baselines.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .checkpoint import read_state_dict
from .errors import InvalidInputError, UnknownModelError
from .models.blip import BLIPConfig, TextConfig
from .models.image_reward import CONFIG_NAME, ImageReward
from .pretrained import IMAGE_REWARD_MODELS, Requirement, check_download_root, fetch
from .validation import ArgumentTypeError, resolve_device, resolve_dtype

__all__ = ["load", "load_score", "available_models", "available_scores", "default_device", "place_model",
           "register_scorer", "ScorerEntry", "scorer_entry", "locate_checkpoint", "checkpoint_file"]

logger = logging.getLogger(__name__)

# name -> builder(device=, download_root=, dtype=, **kwargs) -> Scorer, filled by register_scorer.
_SCORERS: dict[str, Callable[..., Any]] = {}
_ENTRIES: dict[str, "ScorerEntry"] = {}


@dataclass(frozen=True)
class ScorerEntry:
    """A registered scorer: its name, its builder, the files it needs (each a :class:`PretrainedCfg`, or a
    tuple of alternatives of which any one will do; for listings and "missing files" messages) and a
    one-line description."""

    name: str
    builder: Callable[..., Any]
    files: tuple[Requirement, ...] = ()
    description: str = ""


def register_scorer(name: str, builder: Callable[..., Any], *, files: tuple[Requirement, ...] = (),
                    description: str = "") -> ScorerEntry:
    """Make ``name`` a scorer everywhere a model name is accepted (``load_scorer``, ``load_score``, the CLI,
    eval, ReFL, the plugins): ``builder(device=..., download_root=..., dtype=..., **kwargs)`` returns a
    :class:`~ImageReward.scorer.Scorer` in eval mode. Registering a name twice replaces the first entry.
    A name must not contain ``,`` or end in ``:<number>`` (that is the weighted-mix syntax)."""
    if not name or "," in name:
        raise ValueError(f"scorer name {name!r} must be non-empty and contain no ','")
    entry = ScorerEntry(name, builder, tuple(files), description)
    _SCORERS[name] = builder
    _ENTRIES[name] = entry
    return entry


def scorer_entry(name: str) -> ScorerEntry:
    """The registry entry of a registered scorer name (``UnknownModelError`` if there is none)."""
    if name not in _SCORERS:
        raise UnknownModelError(f"score {name!r} not found; available scores = {available_scores()}")
    entry = _ENTRIES.get(name)
    return entry if entry is not None and entry.builder is _SCORERS[name] else ScorerEntry(name, _SCORERS[name])


def available_models() -> list[str]:
    """Names of the registered ImageReward checkpoints (accepted by :func:`load`)."""
    return list(IMAGE_REWARD_MODELS)


def available_scores() -> list[str]:
    """Names of the registered scorers (accepted by :func:`load_score`): the built-in baselines and any
    scorer registered since."""
    return list(_SCORERS)


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu`` (evaluated at call time, not import time)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place_model(model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | None, *,
                keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """Move to ``device`` and cast to ``dtype``; submodules named in ``keep_fp32`` stay float32."""
    model.to(resolve_device(device))
    dtype = resolve_dtype(dtype)
    if dtype is None or dtype == torch.float32:
        model.float()
    else:
        model.to(dtype)
        for name in keep_fp32:
            model.get_submodule(name).float()
    return model.eval()


def _place_image_reward(model, device, dtype):
    place_model(model, device, None)
    dtype = resolve_dtype(dtype)
    if dtype is not None and dtype != torch.float32:
        model.set_image_dtype(dtype)
    return model


def load(
    name: str = "ImageReward-v1.0",
    device: str | torch.device | None = None,
    download_root: str | os.PathLike | None = None,
    med_config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load an ImageReward model by registry name, local checkpoint file, or saved folder.

    ``name``: ``"ImageReward-v1.0"`` (downloaded once into ``download_root``, default
    ``~/.cache/ImageReward``), a ``.pt``/``.pth``/``.safetensors`` file, or a folder written by
    ``save_pretrained``. Loading is strict and never unpickles code. ``dtype`` float16/bfloat16 runs the
    image side in that precision (see ``ImageReward.set_image_dtype``; rewards within ~6e-3 of fp32); names such
    as ``"bf16"`` are accepted (:func:`~ImageReward.validation.resolve_dtype`). Returns the model in eval mode
    on ``device``.

    ``device``, ``dtype``, ``download_root`` and ``med_config`` are checked before any weight is read:
    :class:`InvalidInputError` names the argument (and the devices available); a corrupt or incomplete
    checkpoint or ``config.json`` raises :class:`CheckpointError`, an unknown name :class:`UnknownModelError`.

    >>> model = load("checkpoints/ImageReward.pt", device="cpu")   # doctest: +SKIP
    """
    _check_model_name(name)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    check_download_root(download_root)
    med = _read_med_config(med_config)
    path = locate_checkpoint(name, download_root, revision=revision)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        model = ImageReward.from_pretrained(path)
        logger.info("loaded ImageReward from %s", path)
        return _place_image_reward(model, device, dtype)
    path = checkpoint_file(path)

    try:
        config = BLIPConfig(text=TextConfig.from_med_config(med, encoder_width=1024))
    except (TypeError, ValueError, KeyError) as err:
        raise InvalidInputError(f"med_config: not a BERT config ({err})") from err
    model = ImageReward.from_state_dict(read_state_dict(path), config, source=str(path))
    logger.info("loaded ImageReward checkpoint %s", path)
    return _place_image_reward(model, device, dtype)


def _check_model_name(name: Any, what: str = "name") -> None:
    if not isinstance(name, (str, os.PathLike)):
        raise ArgumentTypeError(f"{what} must be a model name ({available_models()}) or a checkpoint path, "
                                f"got {type(name).__name__}")
    if not os.fspath(name).strip():
        raise UnknownModelError(f"{what} is empty: pass a model name ({available_models()}) or a checkpoint path")


def _read_med_config(med_config: Any) -> dict | None:
    """``med_config`` (a mapping, a JSON file, or ``None``) as a dict; a bad one raises before any weight
    is read."""
    if med_config is None:
        return None
    if isinstance(med_config, Mapping):
        return dict(med_config)
    if not isinstance(med_config, (str, os.PathLike)):
        raise ArgumentTypeError(f"med_config must be a mapping or a JSON file path, got {type(med_config).__name__}")
    from .textio import read_json

    data = read_json(med_config, what="med_config")
    if not isinstance(data, dict):
        raise InvalidInputError(f"med_config {os.fspath(med_config)!r} must hold a JSON object")
    return data


def locate_checkpoint(name: str | os.PathLike, download_root: str | os.PathLike | None = None, *,
                      revision: str | None = None) -> Path:
    """A registered checkpoint name (downloaded once into ``download_root``) or an existing local file or
    folder -> its local path. Anything else raises :class:`UnknownModelError`."""
    if isinstance(name, str) and name in IMAGE_REWARD_MODELS:
        return fetch(IMAGE_REWARD_MODELS[name], download_root, revision=revision)
    if os.path.exists(os.fspath(name)):
        return Path(name)
    raise UnknownModelError(f"model {os.fspath(name)!r} not found: not a registered name ({available_models()}) "
                            "nor an existing file or folder")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file of a checkpoint path: the file itself, or inside a folder ``model.safetensors``
    (written by ``save_pretrained``), else ``ImageReward.pt``."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = [path / name for name in ("model.safetensors", "ImageReward.pt") if (path / name).is_file()]
    if not candidates:
        raise UnknownModelError(f"folder {str(path)!r} holds neither {CONFIG_NAME} nor a checkpoint file")
    return candidates[0]


def load_score(
    name: str = "CLIP",
    device: str | torch.device | None = None,
    download_root: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
):
    """Load a registered scorer (``"CLIP"``, ``"BLIP"``, ``"Aesthetic"``, ``"HPSv2"``,
    ``"HPSv2.1"``, ``"PickScore"``, ...) with the same API as ImageReward.

    Files already in ``download_root`` (the original's names) are used without any network access.
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a scorer name ({available_scores()}), got {type(name).__name__}")
    if name not in _SCORERS:
        raise UnknownModelError(f"score {name!r} not found; available scores = {available_scores()}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    check_download_root(download_root)
    return _SCORERS[name](device=device, download_root=download_root, dtype=dtype, **kwargs)
