"""Where a name becomes a scorer: the one resolver behind every command, the trainers and the plugins.

>>> import ImageReward as RM
>>> RM.load_scorer("ImageReward-v1.0:1,Aesthetic:0.1", device="cpu")   # doctest: +SKIP
>>> resolve("CLIP").kind
'scorer'

A model string is read in this order; the first rule that applies wins, in every entry point (``imagereward
score/rank/score-dataset``, ``eval-preference``/``eval-benchmark``, ReFL ``--reward``/``--monitor_reward``,
reward-model training's ``preload_path``, the WebUI script and the ComfyUI loader):

1. a registered ImageReward checkpoint (``available_models()``: ``ImageReward-v1.0``), downloaded once;
2. a registered scorer (``available_scores()``: ``CLIP``, ``BLIP``, ``Aesthetic``, ...);
3. a weighted mix ``NAME[:WEIGHT],...`` (a ``,``, or a name ending in ``:<number>``; a missing weight is 1),
   each part resolved by rules 1, 2, 4, 5 into a :class:`~ImageReward.models.mix.WeightedReward` whose value
   is ``sum_i w_i * s_i``;
4. an existing local file (``.pt``/``.pth``/``.safetensors``) or folder (``save_pretrained`` output), loaded
   as an ImageReward checkpoint;
5. a Hugging Face Hub id ``OWNER/NAME`` (no file extension) of a repository holding an ImageReward checkpoint;

and, between rules 3 and 4, a reward server's URL ``http[s]://HOST:PORT[/score/NAME]`` (``imagereward serve``),
loaded as a :class:`~ImageReward.serving.client.RemoteScorer` (a mix part may be one too: the port is not a
weight, ``http://127.0.0.1:18081/score/x:0.5`` weighs the served ``x`` by 0.5).

So a folder named ``CLIP`` in the working directory does *not* shadow the CLIP scorer; write ``./CLIP`` for the
folder. Anything else raises :class:`~ImageReward.errors.UnknownModelError` before any weights are read.
:func:`available_scorers` lists every name of rules 1 and 2.

Registering a new scorer is one call, in the module that builds it (see ``ImageReward/baselines.py``)::

    from ImageReward.factory import place_model, register_scorer
    from ImageReward.pretrained import PretrainedCfg, fetch

    PICKSCORE = PretrainedCfg(name="PickScore", filename="pickscore.safetensors",
                              hf_repo="yuvalkirstain/PickScore_v1", hf_filename="model.safetensors",
                              revision="<40-hex commit>", license="MIT")

    def build_pickscore(device=None, download_root=None, dtype=None, **kwargs):
        path = kwargs.pop("checkpoint", None) or fetch(PICKSCORE, download_root)
        return place_model(PickScorer.from_checkpoint(path), device, dtype)   # a Scorer subclass

    register_scorer("PickScore", build_pickscore, files=(PICKSCORE,), description="...")

and one import line, in the block "built-in scorers" below, of the module that holds that call (so the name
exists as soon as ``ImageReward`` is imported; models and heavy libraries are imported inside the builder).
The name then works in ``RM.load_scorer``, ``RM.load_score``, mixes, every command, ReFL and both plugins,
and is listed by ``available_scores()`` / ``available_scorers()``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import factory
from .errors import DownloadError, InvalidInputError, UnknownModelError
from .models.mix import WeightedReward
from .pretrained import IMAGE_REWARD_MODELS, PretrainedCfg, check_download_root, default_cache_dir, fetch_hub_repo, offline
from .scorer import Scorer
from .validation import resolve_device, resolve_dtype

# built-in scorers: each module registers its names with factory.register_scorer when imported
from . import baselines  # noqa: F401, I001  (CLIP, BLIP, Aesthetic)

__all__ = ["Resolved", "resolve", "load_scorer", "checkpoint_path", "available_scorers", "parse_mix",
           "missing_files", "weight_files", "CHECKPOINT_EXTENSIONS"]

logger = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_URL = re.compile(r"^https?://(?P<rest>[^/]*(/.*)?)$", re.IGNORECASE)
_WEIGHT_SUFFIX = re.compile(r"^(?P<name>.*):\s*(?P<weight>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class Resolved:
    """What a model string means, decided without reading weights or touching the network.

    ``kind``: ``"checkpoint"`` (registered ImageReward checkpoint), ``"scorer"`` (registered scorer),
    ``"mix"``, ``"remote"`` (a reward server's URL), ``"path"`` (local file or folder) or ``"hub"`` (Hub
    repository id). ``target``: the name,
    path or repository id; ``parts``: for a mix, ``((Resolved, weight), ...)``."""

    spec: str
    kind: str
    target: str
    parts: tuple[tuple["Resolved", float], ...] = ()


def available_scorers() -> list[str]:
    """Every registered name: the ImageReward checkpoints, then the registered scorers."""
    models = factory.available_models()
    return models + [name for name in factory.available_scores() if name not in models]


def parse_mix(spec: str) -> list[tuple[str, float]] | None:
    """``"ImageReward-v1.0:1,Aesthetic:0.1"`` -> ``[("ImageReward-v1.0", 1.0), ("Aesthetic", 0.1)]``; ``None``
    when ``spec`` is not a mix (no ``,`` and no ``:<number>`` suffix). A Windows drive letter or a path with a
    colon is not mistaken for a weight. Raises :class:`InvalidInputError` for an empty name or a weight that
    is zero or not finite.

    >>> parse_mix("ImageReward-v1.0,Aesthetic:0.1")
    [('ImageReward-v1.0', 1.0), ('Aesthetic', 0.1)]
    >>> parse_mix("CLIP") is None
    True
    """
    text = spec.strip()
    if "," not in text and _split_weight(text)[1] is None:
        return None
    parts: list[tuple[str, float]] = []
    for item in text.split(","):
        name, found = _split_weight(item.strip())
        weight = 1.0 if found is None else found
        if not name:
            raise InvalidInputError(f"mix {spec!r}: empty scorer name (expected 'NAME[:WEIGHT],...')")
        if weight == 0 or weight != weight or weight in (float("inf"), float("-inf")):
            raise InvalidInputError(f"mix {spec!r}: weight of {name!r} must be a non-zero finite number, got {weight}")
        parts.append((name, weight))
    return parts


def _split_weight(item: str) -> tuple[str, float | None]:
    """``"NAME:0.5"`` -> ``("NAME", 0.5)``; no weight -> ``(item, None)``. In a server URL
    (``http://host:port[/path]``) the port is not a weight: only a ``:<number>`` after the port or the path is."""
    match = _WEIGHT_SUFFIX.match(item)
    if not match:
        return item, None
    url = _URL.match(item)
    if url and ("/" not in url["rest"] and url["rest"].count(":") < 2):  # http://host:port: no weight
        return item, None
    return match["name"].strip(), float(match["weight"])


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.lower().endswith(CHECKPOINT_EXTENSIONS)


def resolve(spec: str | os.PathLike, *, allow_mix: bool = True) -> Resolved:
    """Apply the documented order to ``spec`` (see the module docstring). Raises
    :class:`~ImageReward.errors.UnknownModelError` naming ``spec`` and what it could have been,
    :class:`~ImageReward.errors.InvalidInputError` for a malformed or nested mix."""
    if isinstance(spec, os.PathLike):
        return Resolved(os.fspath(spec), "path", os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"unknown scorer {spec!r}: expected a model name, a mix NAME[:WEIGHT],..., "
                                "a local checkpoint path or a Hub id")
    text = spec.strip()
    if text in factory.available_models():
        return Resolved(text, "checkpoint", text)
    if text in factory.available_scores():
        return Resolved(text, "scorer", text)
    mix = parse_mix(text)
    if mix is None and _URL.match(text):
        return Resolved(text, "remote", text)
    if mix is not None:
        if not allow_mix:
            raise InvalidInputError(f"{spec!r}: a mix cannot be nested inside another mix")
        return Resolved(text, "mix", text, tuple((resolve(name, allow_mix=False), w) for name, w in mix))
    if os.path.exists(text):
        return Resolved(text, "path", text)
    if _is_hub_id(text):
        return Resolved(text, "hub", text)
    raise UnknownModelError(
        f"unknown scorer {text!r}: not a registered checkpoint {factory.available_models()}, not a registered "
        f"scorer {factory.available_scores()}, not a mix 'NAME[:WEIGHT],...', and no such file or folder "
        "(it does not exist) nor a Hub id OWNER/NAME")


def _requirements(resolved: Resolved) -> list:
    if resolved.kind == "mix":
        return [req for part, _ in resolved.parts for req in _requirements(part)]
    if resolved.kind == "checkpoint":
        return [IMAGE_REWARD_MODELS[resolved.target]]
    if resolved.kind == "scorer":
        return list(factory.scorer_entry(resolved.target).files)
    return []  # a local path is there or not; a Hub id's files are not known before asking the Hub


def missing_files(spec: str | os.PathLike | Resolved, download_root: str | os.PathLike | None = None
                  ) -> list[PretrainedCfg]:
    """The registered weight files ``spec`` (a name or a mix) still needs in ``download_root`` (default
    ``~/.cache/ImageReward``), all of them at once, without touching the network: for a requirement with
    alternatives (CLIP's ``ViT-L-14.pt`` or its Hub safetensors), the first one. ``[]`` when everything is
    there, and for local paths and Hub ids. Print them with :meth:`PretrainedCfg.describe`.

    >>> [cfg.filename for cfg in missing_files("ImageReward-v1.0:1,CLIP:0.5", "/empty")]   # doctest: +SKIP
    ['ImageReward.pt', 'ViT-L-14.pt']
    """
    resolved = spec if isinstance(spec, Resolved) else resolve(spec)
    root = download_root if download_root is not None else default_cache_dir()
    missing: list[PretrainedCfg] = []
    for req in _requirements(resolved):
        choices = req if isinstance(req, tuple) else (req,)
        if all(cfg.local_path(root) is None for cfg in choices) and choices[0] not in missing:
            missing.append(choices[0])
    return missing


def weight_files(spec: str | os.PathLike | Resolved | None = None) -> list[PretrainedCfg]:
    """Every registered file ``spec`` may read, alternatives included (``None``: those of every registered
    name), e.g. to tell the official weight files apart from user checkpoints in a folder."""
    specs = [resolve(name) for name in available_scorers()] if spec is None else \
        [spec if isinstance(spec, Resolved) else resolve(spec)]
    files: list[PretrainedCfg] = []
    for resolved in specs:
        for req in _requirements(resolved):
            files.extend(cfg for cfg in (req if isinstance(req, tuple) else (req,)) if cfg not in files)
    return files


def load_scorer(spec: str | os.PathLike | Resolved, device: str | torch.device | None = None,
                download_root: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
                revision: str | None = None) -> Scorer:
    """The scorer ``spec`` names (order in the module docstring), in eval mode on ``device`` (default: cuda
    when available), weights cached in ``download_root`` (default ``~/.cache/ImageReward``). ``dtype``
    float16/bfloat16 runs the image side in that precision. ``revision`` applies to a Hub id or a registered
    checkpoint. Raises ``UnknownModelError``, ``InvalidInputError``, ``CheckpointError``, and
    ``DownloadError`` naming every registered file that is missing (see :func:`missing_files`), at once when
    ``HF_HUB_OFFLINE=1``.

    >>> load_scorer("CLIP", device="cpu", dtype=torch.bfloat16)   # doctest: +SKIP
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # before anything is fetched or read
    check_download_root(download_root)
    resolved = spec if isinstance(spec, Resolved) else resolve(spec)
    missing = missing_files(resolved, download_root)
    if missing and offline():
        raise _missing_error(resolved, missing, download_root, "HF_HUB_OFFLINE is set")
    try:
        return _load(resolved, device, download_root, dtype, revision)
    except DownloadError as err:
        if not missing or err.missing:
            raise
        raise _missing_error(resolved, missing, download_root, err.reason) from err


def _missing_error(resolved: Resolved, missing: list[PretrainedCfg], download_root: Any, reason: str) -> DownloadError:
    root = download_root if download_root is not None else default_cache_dir()
    listing = "; ".join(cfg.describe() for cfg in missing)  # one line: the CLI prints errors as one line
    return DownloadError(f"cannot load {resolved.spec!r} ({reason}); put these files into {os.fspath(root)}: {listing}",
                         reason=reason, missing=missing)


def _load(resolved: Resolved, device: torch.device, download_root: Any, dtype: torch.dtype | None,
          revision: str | None) -> Scorer:
    if resolved.kind == "mix":
        scorers = [_load(part, device, download_root, dtype, revision) for part, _ in resolved.parts]
        return WeightedReward(scorers, [w for _, w in resolved.parts], [part.target for part, _ in resolved.parts])
    if resolved.kind == "scorer":
        return factory.load_score(resolved.target, device=device, download_root=download_root, dtype=dtype)
    if resolved.kind == "remote":  # served by `imagereward serve`; device and dtype are the server's
        from .serving.client import RemoteScorer

        return RemoteScorer(resolved.target)
    target: Any = resolved.target
    if resolved.kind == "hub":
        logger.info("%r is a Hub id: fetching its checkpoint", target)
        target = os.fspath(fetch_hub_repo(target, download_root, revision=revision))
    return factory.load(target, device=device, download_root=download_root, revision=revision, dtype=dtype)


def checkpoint_path(spec: str | os.PathLike, download_root: str | os.PathLike | None = None, *,
                    revision: str | None = None) -> Path:
    """The local file or folder of an ImageReward checkpoint named by rules 1, 4 or 5 (for code that loads
    the weights into a model it built itself, e.g. reward-model training's ``preload_path``). A scorer name
    or a mix raises :class:`InvalidInputError`."""
    resolved = resolve(spec)
    if resolved.kind in ("scorer", "mix", "remote"):
        raise InvalidInputError(f"{resolved.spec!r} is a {resolved.kind}, not an ImageReward checkpoint")
    if resolved.kind == "hub":
        return fetch_hub_repo(resolved.target, download_root, revision=revision)
    return factory.locate_checkpoint(resolved.target, download_root, revision=revision)
