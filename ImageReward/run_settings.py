"""Which settings of a training run may change when it resumes: one declarative rule per config field, used by
both trainers (``finetune.ReFLConfig``, ``rm_training.RMTrainConfig``).

A field's ``metadata["resume"]`` says what happens when a resumed run's value differs from the checkpoint's:

- ``"refuse"`` (the default, also for every field added later without a rule): the setting changes the run
  (batch size, accumulation, learning rate, seed, base model, reward, LoRA rank, ...); resuming raises
  :class:`~ImageReward.errors.ResumeSettingsError` naming every such setting with both values.
- ``"accept"``: harmless for the result (where files go, logging, checkpoint cadence, more steps); resuming
  logs a warning per change and the trainer appends the change to its history file (a JSON line per start or
  resume, e.g. ``refl_args.history.jsonl``), so earlier settings are never lost.
- ``"ignore"``: not compared (``resume_from_checkpoint`` itself).

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Cfg:
...     lr: float = 1e-5
...     output_dir: str = field(default="out", metadata={"resume": "accept"})
>>> policies = resume_policies(Cfg)
>>> refused, accepted = compare_settings({"lr": 1e-5, "output_dir": "a"}, {"lr": 1e-4, "output_dir": "b"}, policies)
>>> [c.name for c in refused], [c.name for c in accepted]
(['lr'], ['output_dir'])
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from .disk import disk_errors
from .errors import ResumeSettingsError

__all__ = ["REFUSE", "ACCEPT", "IGNORE", "Change", "resume_policies", "flatten", "compare_settings",
           "check_resume", "append_history"]

logger = logging.getLogger(__name__)

REFUSE, ACCEPT, IGNORE = "refuse", "accept", "ignore"


class Change(NamedTuple):
    """One setting that differs: dotted ``name``, the checkpoint's value, the current value."""

    name: str
    old: Any
    new: Any


def resume_policies(cls: type, prefix: str = "") -> dict[str, str]:
    """``{"dotted.field": "refuse" | "accept" | "ignore"}`` for the dataclass ``cls``; fields whose type is a
    dataclass are walked (``train.lr``). A field without ``metadata["resume"]`` is ``"refuse"``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for item in dataclasses.fields(cls):
        kind = hints.get(item.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out.update(resume_policies(kind, f"{prefix}{item.name}."))
            continue
        policy = item.metadata.get("resume", REFUSE)
        if policy not in (REFUSE, ACCEPT, IGNORE):
            raise ValueError(f"{cls.__name__}.{item.name}: metadata['resume'] must be refuse, accept or ignore")
        out[prefix + item.name] = policy
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level of dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(old: Any, new: Any) -> bool:
    # JSON round trip: tuples became lists, ints written for floats (1 vs 1.0) compare equal
    return json.loads(json.dumps(old, default=str)) == json.loads(json.dumps(new, default=str))


def compare_settings(saved: Mapping[str, Any], current: Mapping[str, Any], policies: Mapping[str, str], *,
                     defaults: Mapping[str, Any] | None = None) -> tuple[list[Change], list[Change]]:
    """``(refused, accepted)`` changes between the checkpoint's settings ``saved`` and ``current`` (nested or
    dotted mappings). A setting the checkpoint does not hold (made by a version without that field) counts
    as its value in ``defaults`` when given; a setting ``current`` lacks (a field removed since) is skipped."""
    saved, current = flatten(saved), flatten(current)
    defaults = flatten(defaults or {})
    refused: list[Change] = []
    accepted: list[Change] = []
    for name, new in current.items():
        policy = policies.get(name, REFUSE)
        if policy == IGNORE:
            continue
        if name in saved:
            old = saved[name]
        elif name in defaults:
            old = defaults[name]
        else:
            continue
        if not _same(old, new):
            (refused if policy == REFUSE else accepted).append(Change(name, old, new))
    return refused, accepted


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], policies: Mapping[str, str], *,
                 source: str | os.PathLike, option: Callable[[str], str] = lambda name: f"--{name}",
                 defaults: Mapping[str, Any] | None = None) -> list[Change]:
    """Raise :class:`ResumeSettingsError` when a setting that changes the run differs from the checkpoint
    ``source`` (each named by ``option(name)``, e.g. ``--gradient_accumulation_steps`` or
    ``train.accumulation_steps``, with both values); log a warning per accepted change and return them."""
    refused, accepted = compare_settings(saved, current, policies, defaults=defaults)
    if refused:
        listing = "; ".join(f"{option(c.name)} {c.old!r} -> {c.new!r}" for c in refused)
        raise ResumeSettingsError(
            f"cannot resume from {os.fspath(source)}: {listing} (the checkpoint was made with the first value; "
            "these settings change the run). Resume with the checkpoint's values, or start a new run in another "
            "output folder", changed=[c.name for c in refused])
    for change in accepted:
        logger.warning("resuming from %s with %s changed: %r -> %r (recorded in the run's history)",
                       os.fspath(source), option(change.name), change.old, change.new)
    return accepted


def append_history(path: str | os.PathLike, event: str, settings: Mapping[str, Any], *,
                   changes: list[Change] = (), **extra: Any) -> None:
    """Append one JSON line ``{"time", "event", "changed", "settings", ...extra}`` to ``path`` (the run's
    history of settings: one line per start and resume, never rewritten)."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "event": event,
              **extra, "changed": {c.name: [c.old, c.new] for c in changes}, "settings": dict(settings)}
    path = Path(path)
    with disk_errors(path.name, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
