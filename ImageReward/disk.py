"""Writing training outputs safely: free-space checks before large writes, one :class:`DiskSpaceError` for a
disk that fills up during a write, and atomic replacement of files and folders. Shared by both trainers
(ReFL in ``finetune/`` and reward-model training in ``rm_training/``).

A full disk shows up in many disguises: ``OSError(ENOSPC)`` from Python, ``RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos 64 vs 0`` or ``PytorchStreamWriter failed writing file`` from
``torch.save``, ``SafetensorError: ... No space left on device (os error 28)`` from safetensors.
:func:`disk_errors` turns each of them into one :class:`DiskSpaceError` naming what was being written, where,
and what to do; everything written before (earlier checkpoints) is untouched because every write goes to a
temporary name that is renamed only when complete.

>>> with disk_errors("checkpoint-4", "out/checkpoint-4.tmp"):   # doctest: +SKIP
...     accelerator.save_state("out/checkpoint-4.tmp")
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DiskSpaceError

__all__ = ["format_bytes", "free_bytes", "ensure_free_space", "is_disk_full", "disk_errors", "replace_dir",
           "atomic_write_text"]

# how a full disk reads in the messages of torch's zip writer and of safetensors (which raise no OSError)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "unexpected pos", "disk quota exceeded",
                   "file write failed", "failed writing file")


def format_bytes(count: float) -> str:
    """``1234567890`` -> ``'1.23 GB'`` (decimal units, as ``df -H``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(path: str | os.PathLike, needed: int, what: str, *,
                      hint: str = "free space, lower train.checkpoints_total_limit, or move checkpoint_base") -> None:
    """Raise :class:`~ImageReward.errors.DiskSpaceError` before writing ``what`` (about ``needed`` bytes) under
    ``path`` when its file system has less than ``needed`` + 5% + 64 MB free. Nothing has been written then."""
    free = free_bytes(path)
    want = int(needed * 1.05) + (64 << 20)
    if free < want:
        raise DiskSpaceError(f"not enough disk space to write {what} under {path}: needs about "
                             f"{format_bytes(want)}, {format_bytes(free)} free ({hint})")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that failed for lack of space."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DiskSpaceError):
            return True
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError":
            text = str(err).lower()
            if any(marker in text for marker in _DISK_FULL_TEXT):
                return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


@contextmanager
def disk_errors(what: str, path: str | os.PathLike, *, hint: str = "") -> Iterator[None]:
    """Inside, a write that fails for lack of disk space raises :class:`DiskSpaceError` naming ``what``,
    ``path`` and the free space left (``hint``: what the user can do, e.g. how to resume); any other error
    passes unchanged."""
    try:
        yield
    except DiskSpaceError:
        raise
    except Exception as err:  # noqa: BLE001 - only disk-full errors are converted; the rest pass unchanged
        if not is_disk_full(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        try:
            left = f"{format_bytes(free_bytes(path))} free"
        except OSError:
            left = "free space unknown"
        raise DiskSpaceError(f"disk full while writing {what} under {os.fspath(path)} ({left}; {first})"
                             + (f"; {hint}" if hint else "")) from err


def replace_dir(temp: Path, final: Path) -> None:
    """Move the finished folder ``temp`` to ``final``, replacing an older ``final`` (never a half-written one:
    a crash leaves either the old folder or the new one, plus at most a ``*.old`` / ``*.tmp`` leftover)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(temp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str, *, errors: str = "strict") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``path.tmp`` and a rename, creating the parent folder: ``path`` is
    either the old file or the complete new one; a full disk raises :class:`DiskSpaceError` and leaves the old
    file. ``errors="backslashreplace"`` writes a lone surrogate (an undecodable file name) as its escape."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    try:
        with disk_errors(path.name, path.parent):
            temp.write_text(text, encoding="utf-8", errors=errors)
            os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path
