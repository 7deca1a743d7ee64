"""Checks of a reward-model training run before anything heavy loads: the initial weights (``blip_path``,
``train.preload_path``, ``med_config``) and the data files; and what ``train-rm --dry_run`` reports.

A checkpoint that is neither on disk nor downloadable now (``HF_HUB_OFFLINE=1``, or its host cannot be
reached: :func:`~ImageReward.pretrained.url_unreachable`) fails at once with one line naming the config key,
the file and where to put it, instead of a download that retries or hangs.

>>> check_model_files(load_config("src/config/config.yaml"))   # doctest: +SKIP
['blip_path: model_large.pth (cached in /root/.cache/ImageReward)']
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..baselines import BLIP_LARGE
from ..errors import ImageRewardError, InvalidInputError
from ..pretrained import default_cache_dir, hub_unreachable, offline, url_unreachable
from ..resolve import missing_files, resolve
from .config import RMTrainConfig

__all__ = ["check_model_files", "dry_run_report"]


def _no_network(url: str | None = None) -> str | None:
    return "HF_HUB_OFFLINE is set" if offline() else (url_unreachable(url) if url else hub_unreachable())


def _check_blip(cfg: RMTrainConfig) -> str:
    source = cfg.blip_path
    if not source:
        return "blip_path: none (random initialisation)"
    if source.startswith(("http://", "https://")):
        name = BLIP_LARGE.filename if source == BLIP_LARGE.url else source.rstrip("/").rsplit("/", 1)[-1]
        root = Path(cfg.train.download_root or default_cache_dir()).expanduser()
        if (root / name).is_file():
            return f"blip_path: {name} (cached in {root})"
        reason = _no_network(source)
        if reason:
            raise InvalidInputError(
                f"config key 'blip_path' {source!r}: cannot download ({reason}); put {name} into {root} (or set "
                f"train.download_root to the folder holding it), or set blip_path to a local file (\"\" = random "
                "initialisation)")
        return f"blip_path: {name} (to download into {root})"
    if not Path(source).expanduser().is_file():
        raise InvalidInputError(f"config key 'blip_path' {source!r}: no such file (expected a BLIP checkpoint file, "
                                "a URL, or \"\" for random initialisation; paths are relative to the working "
                                "directory)")
    return f"blip_path: {source} (local file)"


def _check_preload(cfg: RMTrainConfig) -> str | None:
    source = cfg.train.preload_path
    if not source:
        return None
    root = cfg.train.download_root or None
    try:
        resolved = resolve(source, allow_mix=False)
    except ImageRewardError as err:
        raise InvalidInputError(f"config key 'train.preload_path' {source!r}: {err}") from None
    if resolved.kind == "scorer":
        raise InvalidInputError(f"config key 'train.preload_path' {source!r}: a scorer, not an ImageReward checkpoint")
    missing = missing_files(resolved, root)
    if missing:
        reason = next(filter(None, (_no_network(None if c.hf_repo else c.url) for c in missing)), None)
        listing = "; ".join(cfg_.describe() for cfg_ in missing)
        where = root or default_cache_dir()
        if reason:
            raise InvalidInputError(f"config key 'train.preload_path' {source!r}: cannot download ({reason}); put "
                                    f"these files into {where}: {listing} (or set train.preload_path to a local "
                                    "checkpoint file or folder)")
        return f"preload_path: {source} (to download into {where}: {listing})"
    return f"preload_path: {source} ({resolved.kind})"


def check_model_files(cfg: RMTrainConfig) -> list[str]:
    """Raise :class:`~ImageReward.errors.InvalidInputError` (one line, naming the config key) when an initial
    checkpoint or ``med_config`` is missing and cannot be downloaded now; else one description line each."""
    lines = [_check_blip(cfg)]
    preload = _check_preload(cfg)
    if preload:
        lines.append(preload)
    if cfg.BLIP.vit != "tiny" and cfg.med_config and not Path(cfg.med_config).is_file():
        raise InvalidInputError(f"config key 'med_config' {cfg.med_config!r}: no such file (paths are relative to "
                                "the working directory; run from train/)")
    return lines


def dry_run_report(cfg: RMTrainConfig) -> list[str]:
    """What ``imagereward train-rm --dry_run`` prints: the config, the model files and the data are checked (the
    grouped JSON files read and validated, missing images counted) and, when resuming, the state's settings;
    nothing is loaded, trained or written."""
    from ..disk import format_bytes, free_bytes
    from .data import drop_missing_images, expand_pairs, read_groups
    from .states import find_latest_state
    from .trainer import check_resume_settings

    t = cfg.train
    lines = ["dry run: config, model files and data checked; nothing was loaded, trained or written",
             *check_model_files(cfg)]
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    pairs = {}
    for split in ("train", "valid", "test"):
        path = Path(cfg.data_base) / f"{split}.json"
        if not path.is_file():
            if split == "test":
                lines.append(f"test: {path} absent (no test accuracy at the end)")
                continue
            raise InvalidInputError(f"{split} data {str(path)!r} does not exist (config key 'data_base'; run "
                                    "src/make_dataset.py first)")
        groups, missing = drop_missing_images(read_groups(path, encoding=cfg.data_encoding or None), cfg.image_base,
                                              source=str(path))
        pairs[split] = len(expand_pairs(groups))
        lines.append(f"{split}: {len(groups)} prompts, {pairs[split]} pairs from {path}"
                     + (f", {len(missing)} images missing under {cfg.image_base!r} (skipped)" if missing else ""))
    if not pairs["train"]:
        raise InvalidInputError(f"{Path(cfg.data_base) / 'train.json'} yields no non-tie pairs with readable images")
    batches = math.ceil(pairs["train"] / (t.batch_size * processes))
    steps = t.epochs * math.ceil(batches / t.accumulation_steps)
    run_dir = Path(cfg.checkpoint_base) / cfg.run_name(processes)
    per_step = t.batch_size * t.accumulation_steps * processes
    lines.append(f"training: {steps} optimizer steps ({t.epochs} epochs) of {per_step} "
                 f"pairs ({t.batch_size} x {t.accumulation_steps} accumulation x {processes} processes), lr {t.lr:g} "
                 f"{t.lr_decay_style}, fix_rate {t.fix_rate}, seed {t.seed}"
                 + (f", stopping at max_steps {t.max_steps}" if t.max_steps else ""))
    lines.append(f"output: {run_dir} ({format_bytes(free_bytes(run_dir))} free), export {t.export_format}")
    if t.resume_from_checkpoint:
        states = run_dir / "states"
        state = find_latest_state(states) if t.resume_from_checkpoint == "latest" else Path(t.resume_from_checkpoint)
        if state is not None and not state.is_dir() and (states / t.resume_from_checkpoint).is_dir():
            state = states / t.resume_from_checkpoint
        if state is None:
            lines.append("resume: no state yet, a fresh run")
        elif not (state / "progress.json").is_file():
            raise InvalidInputError(f"resume_from_checkpoint {t.resume_from_checkpoint!r}: {state} is not a saved "
                                    "training state")
        else:
            changes = check_resume_settings(cfg, state)
            listing = ", ".join(f"{c.name} {c.old!r} -> {c.new!r}" for c in changes)
            lines.append(f"resume: from {state} (settings checked{'; changed: ' + listing if listing else ''})")
    return lines
