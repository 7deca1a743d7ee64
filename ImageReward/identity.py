"""What a scorer named on the command line *is*: a key that changes when its weights or its precision change.

Used wherever a stored score must not outlive the weights that produced it: the evaluation score cache
(:mod:`ImageReward.eval.cache`) and ``score-dataset``'s resume check (:mod:`ImageReward.scoring.runner`). Names are
read by the one resolver (:func:`ImageReward.resolve.resolve`), so ``tiny`` and ``./tiny`` (the same folder) have
one identity, and a retrained checkpoint written over the old one gets another.

>>> scorer_identity("ImageReward-v1.0")
'ImageReward-v1.0|float32'
"""

from __future__ import annotations

from pathlib import Path

from .image_io import is_hidden
from .resolve import Resolved, resolve

__all__ = ["scorer_identity", "identity_change"]


def scorer_identity(spec: str | Resolved, dtype: str = "float32") -> str:
    """A key for a scorer named on the command line: registered names as they are, local checkpoints by
    absolute path plus the name, size and mtime of their files (hidden files such as ``.ipynb_checkpoints/``
    left out), a mix by its parts and weights; ``dtype`` (the image side's precision) is part of it."""
    resolved = spec if isinstance(spec, Resolved) else resolve(spec)
    if resolved.kind == "mix":
        return "mix:" + ",".join(f"{scorer_identity(part, dtype)}*{weight!r}" for part, weight in resolved.parts)
    if resolved.kind == "path":
        path = Path(resolved.target).resolve()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(is_hidden(part) for part in p.relative_to(path).parts))
        else:
            files = [path]
        signature = ",".join(f"{p.relative_to(path).as_posix() if path.is_dir() else p.name}:{p.stat().st_size}:"
                             f"{p.stat().st_mtime_ns}" for p in files)
        return f"path:{path}|{signature}|{dtype}"
    if resolved.kind == "remote":  # a reward server's URL, without its ?token=
        return f"remote:{resolved.target.split('?', 1)[0]}|{dtype}"
    return f"{resolved.target}|{dtype}"


def identity_change(old: str, new: str) -> str:
    """A short account of how two :func:`scorer_identity` keys differ, for error messages: the files whose
    size or modification time changed for the same checkpoint, else both keys.

    >>> identity_change("CLIP|float32", "CLIP|bfloat16")
    "another scorer or precision ('CLIP|float32' then, 'CLIP|bfloat16' now)"
    """
    old_parts, new_parts = old.split("|"), new.split("|")
    if old.startswith("path:") and new.startswith("path:") and len(old_parts) == len(new_parts) == 3 \
            and old_parts[0] == new_parts[0] and old_parts[2] == new_parts[2]:
        before = dict(item.split(":", 1) for item in old_parts[1].split(",") if ":" in item)
        after = dict(item.split(":", 1) for item in new_parts[1].split(",") if ":" in item)
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        return (f"new weights at the same path {old_parts[0][5:]!r} (changed since then: "
                f"{', '.join(changed) or 'file list'})")
    return f"another scorer or precision ({old!r} then, {new!r} now)"
