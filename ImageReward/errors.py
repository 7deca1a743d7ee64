"""Typed errors: every failure the library reports on purpose is an ``ImageRewardError``.

Each subclass also derives from the matching built-in exception, so ``except ValueError`` style code
written against the original package keeps working.
"""

from __future__ import annotations

from typing import Any, Sequence


class ImageRewardError(Exception):
    """Base class of every error raised on purpose by this library."""


class ImageLoadError(ImageRewardError, ValueError):
    """An image could not be read: missing path, directory, corrupt or truncated file."""


class UnsupportedInputError(ImageRewardError, TypeError):
    """An argument has a type the library does not accept (e.g. a prompt that is not a ``str``)."""


class InvalidInputError(ImageRewardError, ValueError):
    """Arguments of the right type that do not fit together (empty list, mismatched counts, ...)."""


class CheckpointError(ImageRewardError, RuntimeError):
    """A checkpoint is unsafe, unreadable, or does not match the model (missing / extra / mis-shaped keys)."""


class UnknownModelError(ImageRewardError, ValueError):
    """A model or scorer name that is neither registered nor an existing local path."""


class DependencyError(ImageRewardError, ImportError):
    """An installed package is missing or too old for what was asked (e.g. HPSv3 needs transformers >= 4.45,
    where the Qwen2-VL classes first appear); the message names the package and the version needed."""


class DownloadError(ImageRewardError, OSError):
    """A file could not be downloaded (offline, unreachable, or failed its checksum). ``reason``: why, in a
    few words (e.g. ``"HF_HUB_OFFLINE is set"``); ``missing``: when known, every registered file
    (:class:`~ImageReward.pretrained.PretrainedCfg`) the requested scorer still needs, so that a UI can list
    them all at once."""

    def __init__(self, message: str, *, reason: str | None = None, missing: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.reason = reason or message.splitlines()[0]
        self.missing = list(missing)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes, keywords included
        return (_rebuild_download_error, (str(self), self.reason, self.missing))


def _rebuild_download_error(message: str, reason: str, missing: list[Any]) -> DownloadError:
    return DownloadError(message, reason=reason, missing=missing)


class DiskSpaceError(ImageRewardError, OSError):
    """Too little free disk space for a file or folder about to be written (checked before writing it)."""


class ResumeSettingsError(InvalidInputError):
    """A training run asked to resume with settings that change the run (another batch size, learning rate,
    seed, base model, ...) than those its checkpoint was made with. ``changed``: the dotted setting names."""

    def __init__(self, message: str, *, changed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.changed = list(changed)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_resume_error, (str(self), self.changed))


def _rebuild_resume_error(message: str, changed: list[str]) -> "ResumeSettingsError":
    return ResumeSettingsError(message, changed=changed)


class RemoteScorerError(ImageRewardError, ConnectionError):
    """A reward server (``imagereward serve``) could not be reached or did not answer, after the retries."""
