"""Checks of a ReFL run's model files, before anything heavy loads: the base model
(``--pretrained_model_name_or_path``, ``--pretrained_vae_model_name_or_path``) and the reward models
(``--reward``, ``--monitor_reward``). Also what ``--dry_run`` reports about them.

A local folder must hold every file the trainer reads (each missing one is named). A Hub id whose files are
not all in the Hugging Face cache needs the Hub: when it cannot be reached (``HF_HUB_OFFLINE=1``, or
:func:`~ImageReward.pretrained.hub_unreachable`), the run fails at once with one line naming the option,
every missing file, and that a local folder works, instead of minutes of retries. A name that is neither a
folder here nor a Hub id ``OWNER/NAME`` (a mistyped folder) is reported as a missing folder.

>>> check_models(cfg, get_family(cfg.model_family, cfg))   # doctest: +SKIP
['base model: /models/sd15 (local folder, 9 files checked)', 'reward: ImageReward-v1.0 (weights present)']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..pretrained import default_cache_dir, hub_unreachable, offline, url_unreachable
from ..resolve import _is_hub_id, missing_files, resolve
from ..errors import ImageRewardError
from .config import ReFLConfig, ReFLConfigError, parse_reward_spec

__all__ = ["check_models", "check_family", "dry_run_report", "required_files", "missing_in_folder"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


def required_files(family: Any, *, lora: bool, own_vae: bool, variant: str | None = None
                   ) -> list[tuple[str, tuple[str, ...]]]:
    """``[(shown name, accepted file names or weight-file patterns), ...]`` of a diffusers folder of ``family``:
    the used tokenizers and text encoders, the VAE (unless ``own_vae``), the denoiser, the scheduler config, and
    ``model_index.json`` for a full fine-tune (its final pipeline is rebuilt from the base folder)."""
    suffix = f".{variant}" if variant else ""
    needed: list[tuple[str, tuple[str, ...]]] = []
    for i, (tok, enc) in enumerate(zip(family.tokenizer_subfolders, family.text_encoder_subfolders)):
        if not family.uses_text_encoder(i):
            continue
        needed.append((f"{tok}/tokenizer_config.json", tuple(f"{tok}/{name}" for name in _TOKENIZER_FILES)))
        needed.append((f"{enc}/config.json", (f"{enc}/config.json",)))
        needed.append((f"{enc}/model{suffix}.safetensors", (f"{enc}/*weights*",)))
    parts = [family.denoiser_name] + ([] if own_vae else ["vae"])
    for part in parts:
        needed.append((f"{part}/config.json", (f"{part}/config.json",)))
        needed.append((f"{part}/diffusion_pytorch_model{suffix}.safetensors", (f"{part}/*weights*",)))
    needed.append(("scheduler/scheduler_config.json", ("scheduler/scheduler_config.json",)))
    if not lora:
        needed.append(("model_index.json", ("model_index.json",)))
    return needed


def _present(folder: Path, accepted: tuple[str, ...]) -> bool:
    for name in accepted:
        if name.endswith("/*weights*"):
            sub = folder / name[: -len("/*weights*")]
            if sub.is_dir() and any(p.name.endswith(_WEIGHT_SUFFIXES) for p in sub.iterdir()):
                return True
        elif (folder / name).is_file():
            return True
    return False


def missing_in_folder(folder: str | os.PathLike, needed: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """The shown names of the ``needed`` files (:func:`required_files`) that ``folder`` lacks."""
    folder = Path(folder)
    return [shown for shown, accepted in needed if not _present(folder, accepted)]


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder of a Hub repo (no network), or None when nothing is cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        return None


def _hub_cache(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _no_hub() -> str | None:
    """Why the Hub cannot be used now, or None."""
    return "HF_HUB_OFFLINE is set" if offline() else hub_unreachable()


def _cannot_fetch(cfg: Any) -> str | None:
    """Why the registered file ``cfg`` (a :class:`~ImageReward.pretrained.PretrainedCfg`) cannot be downloaded
    now (from the Hub or from its URL), or None."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if cfg.hf_repo:
        return hub_unreachable()
    return url_unreachable(cfg.url) if cfg.url else "no remote source is known"


def check_family(folder: Path, name: str, family: Any) -> None:
    """A base folder whose ``model_index.json`` names another family's pipeline raises :class:`ReFLConfigError`
    with the right ``--model_family`` (a FLUX folder run as sd3), before its files are listed as missing."""
    from .families import FAMILIES

    index = folder / "model_index.json"
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the loader reports it
    other = next((n for n, f in FAMILIES.items() if f.pipeline_class_name == found), None)
    if found and found != family.pipeline_class_name and other is not None:
        raise ReFLConfigError(f"--model_family {family.name} expects a {family.pipeline_class_name}, {name!r} is a "
                              f"{found} (pass --model_family {other})")


def _check_model(option: str, name: str, needed: list[tuple[str, tuple[str, ...]]], *, revision: str | None,
                 cache_dir: str | None, what: str, family: Any | None = None) -> str:
    """Raise :class:`ReFLConfigError` (one line) when ``name`` (the value of ``--option``) cannot provide the
    ``needed`` files now; else return how it will be loaded."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ReFLConfigError(f"--{option} {name!r}: is a file; expected a {what} folder or a Hub id OWNER/NAME")
        if family is not None:
            check_family(path, name, family)
        missing = missing_in_folder(path, needed)
        if missing:
            raise ReFLConfigError(f"--{option} {name!r}: the folder lacks {', '.join(missing)} (expected a {what} "
                                  "folder as written by save_pretrained)")
        return f"{name} (local folder, {len(needed)} files checked)"
    if not _is_hub_id(name):
        raise ReFLConfigError(f"--{option} {name!r}: no such folder (expected a local {what} folder, or a Hub id "
                              "OWNER/NAME)")
    snapshot = _hub_snapshot(name, revision, cache_dir)
    if snapshot is not None and family is not None:
        check_family(snapshot, name, family)
    missing = [shown for shown, _ in needed] if snapshot is None else missing_in_folder(snapshot, needed)
    if not missing:
        return f"{name} (Hub id, all {len(needed)} files cached in {snapshot})"
    reason = _no_hub()
    if reason:
        raise ReFLConfigError(
            f"--{option} {name!r}: cannot download from the Hugging Face Hub ({reason}) and these files are not in "
            f"the Hub cache {_hub_cache(cache_dir)}: {', '.join(missing)}. Download them where there is network "
            f"(hf download {name}), or pass a local {what} folder: --{option} /path/to/folder "
            f"(no such folder here either)")
    return f"{name} (Hub id: {len(missing)} of {len(needed)} files to download)"


def _check_reward(option: str, spec: str, download_root: str | None) -> str:
    """Every scorer of the reward ``spec`` exists, and its registered files are there or can be downloaded."""
    parts = parse_reward_spec(spec, option=option)
    missing = []
    for name, _ in parts:
        try:
            missing += [cfg for cfg in missing_files(resolve(name, allow_mix=False), download_root)
                        if cfg not in missing]
        except ImageRewardError as err:
            raise ReFLConfigError(f"--{option} {spec!r}: {err}") from None
    if not missing:
        return f"{spec} (weights present)" if parts else spec
    reason = next(filter(None, map(_cannot_fetch, missing)), None)
    root = download_root or default_cache_dir()
    listing = "; ".join(cfg.describe() for cfg in missing)
    if reason:
        raise ReFLConfigError(f"--{option} {spec!r}: cannot download ({reason}); put these files into {root}: "
                              f"{listing} (or pass --reward_download_root FOLDER holding them)")
    return f"{spec} (to download into {root}: {listing})"


def check_models(config: ReFLConfig, family: Any, *, reward: bool = True, monitor: bool = True) -> list[str]:
    """Check the base model, the VAE and the reward models of ``config`` without loading them; returns one
    description line per model. Raises :class:`ReFLConfigError`, one line naming every option whose files are
    missing (all of them at once, so one fix covers the run)."""
    cfg = config
    own_vae = bool(cfg.pretrained_vae_model_name_or_path)
    checks = [("base model", lambda: _check_model(
        "pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
        required_files(family, lora=bool(cfg.lora_rank), own_vae=own_vae, variant=cfg.variant),
        revision=cfg.revision, cache_dir=cfg.cache_dir, what=f"diffusers {family.pipeline_class_name}",
        family=family))]
    if own_vae:
        vae_files = [("config.json", ("config.json",)), ("diffusion_pytorch_model.safetensors", ("./*weights*",))]
        checks.append(("VAE", lambda: _check_model(
            "pretrained_vae_model_name_or_path", cfg.pretrained_vae_model_name_or_path, vae_files, revision=None,
            cache_dir=cfg.cache_dir, what="diffusers AutoencoderKL")))
    if reward:
        checks.append(("reward", lambda: _check_reward("reward", cfg.reward, cfg.reward_download_root)))
    if monitor and cfg.monitor_reward:
        checks.append(("monitor reward", lambda: _check_reward("monitor_reward", cfg.monitor_reward,
                                                               cfg.reward_download_root)))
    lines, errors = [], []
    for what, check in checks:
        try:
            lines.append(f"{what}: {check()}")
        except ReFLConfigError as err:
            errors.append(str(err))
    if errors:
        raise ReFLConfigError(" | ".join(errors))
    return lines


def dry_run_report(trainer: Any) -> list[str]:
    """What ``refl.py --dry_run`` prints: what a :class:`~ImageReward.finetune.ReFLTrainer` (constructed, so its
    options, prompts and resume settings are checked) would do after its model files are checked, without
    loading a model."""
    import math

    from ..disk import format_bytes, free_bytes
    from .trainer import find_checkpoint

    cfg = trainer.config
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps * processes
    batches = math.ceil(len(trainer.prompts) / (cfg.train_batch_size * processes))
    updates = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(batches / cfg.gradient_accumulation_steps)
    lines = ["dry run: options, prompts and model files checked; nothing was loaded or trained",
             f"family: {cfg.model_family}", *trainer.check_model_files(),
             f"prompts: {len(trainer.prompts)} from {cfg.train_data or cfg.dataset_name}",
             f"training: {'LoRA rank %d' % cfg.lora_rank if cfg.lora_rank else 'full ' + trainer.family.denoiser_name}"
             f"{' + EMA' if cfg.use_ema else ''}, {updates} updates of {per_update} prompts "
             f"({cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x {processes} process"
             f"{'es' if processes > 1 else ''}), "
             f"lr {cfg.learning_rate:g}, seed {cfg.seed if cfg.seed is not None else 'random'}",
             f"output: {cfg.output_dir} ({format_bytes(free_bytes(cfg.output_dir))} free), checkpoint every "
             f"{cfg.checkpointing_steps} updates"]
    if cfg.resume_from_checkpoint:
        path = find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
        changes = ", ".join(f"--{c.name} {c.old!r} -> {c.new!r}" for c in trainer.resume_changes)
        lines.append(f"resume: from {path} (settings checked{'; changed: ' + changes if changes else ''})"
                     if path is not None else "resume: no checkpoint yet, a fresh run")
    return lines
