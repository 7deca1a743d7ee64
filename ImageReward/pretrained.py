"""Registry of named pretrained checkpoints, and the one downloader.

Each :class:`PretrainedCfg` says where a file lives (a Hugging Face Hub repo/file/revision, or a direct
URL with its SHA-256), the file name it has in the download folder (the original's cache layout, so
existing ``~/.cache/ImageReward`` folders are reused) and its licence. How the images are preprocessed is
a property of the built scorer (``Scorer.preprocess_config``, read from the model's own config), not of the
file. Scorers other than the ImageReward checkpoints list their files where they are registered
(:func:`ImageReward.factory.register_scorer`).

:func:`fetch` looks in the download folder first (no network at all when the file is there), then the
Hub (``huggingface_hub``, which honours ``HF_HUB_OFFLINE``), then the URL. When nothing can be reached it
raises :class:`~ImageReward.errors.DownloadError` saying what to download and where to put it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Union
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DownloadError, InvalidInputError

__all__ = ["PretrainedCfg", "Requirement", "IMAGE_REWARD_MODELS", "default_cache_dir", "offline", "hub_unreachable",
           "url_unreachable", "fetch", "fetch_folder", "fetch_hub_repo", "download_url", "sha256_of"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedCfg:
    """One named checkpoint file: its source, local name, checksum and licence."""

    name: str
    filename: str
    hf_repo: str | None = None
    hf_filename: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    alt_filenames: tuple[str, ...] = ()
    # When set, ``filename`` is a folder (a transformers model or processor) that must hold these files; an
    # entry that is a tuple is satisfied by any one of its names (the first is the one downloaded).
    folder_files: tuple[str | tuple[str, ...], ...] = ()
    license: str = ""
    description: str = ""

    def source(self) -> str:
        if self.hf_repo:
            if self.folder_files:
                return f"https://huggingface.co/{self.hf_repo}/tree/{self.revision or 'main'}"
            return f"https://huggingface.co/{self.hf_repo}/resolve/{self.revision or 'main'}/{self.hf_filename or self.filename}"
        return self.url or "(no remote source)"

    def local_path(self, download_root: str | os.PathLike | None = None) -> Path | None:
        """The file (or, for a folder, the complete folder) in ``download_root`` (default
        :func:`default_cache_dir`), or ``None`` when it is not there. Never touches the network."""
        root = Path(download_root).expanduser() if download_root is not None else default_cache_dir()
        if self.folder_files:
            folder = root / self.filename
            complete = all(any((folder / name).is_file() for name in _choices(entry)) for entry in self.folder_files)
            return folder if complete else None
        return next((root / name for name in (self.filename, *self.alt_filenames) if (root / name).is_file()), None)

    def describe(self) -> str:
        """``"NAME  (from SOURCE)"``, with a folder's files, for lists of what to download."""
        files = f"/ ({', '.join(' or '.join(_choices(entry)) for entry in self.folder_files)})" if self.folder_files else ""
        return f"{self.filename}{files}  (from {self.source()})"


def _choices(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else entry


# A scorer's requirement: one file, or a tuple of alternatives (any one of them will do; the first is preferred).
Requirement = Union[PretrainedCfg, tuple[PretrainedCfg, ...]]


IMAGE_REWARD_MODELS: dict[str, PretrainedCfg] = {
    "ImageReward-v1.0": PretrainedCfg(
        name="ImageReward-v1.0",
        filename="ImageReward.pt",
        hf_repo="THUDM/ImageReward",
        hf_filename="ImageReward.pt",
        license="Apache-2.0",
        description="ImageReward v1.0 (NeurIPS 2023): BLIP ViT-L/16 + BERT cross-attention + MLP head, "
        "trained on 137k ImageRewardDB comparisons",
    ),
}


def default_cache_dir() -> Path:
    """``$IMAGEREWARD_CACHE`` if set, else the original's ``~/.cache/ImageReward``."""
    return Path(os.environ.get("IMAGEREWARD_CACHE", os.path.expanduser("~/.cache/ImageReward")))


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached right now, or ``None`` when it can, when ``HF_HUB_OFFLINE`` is set
    (huggingface_hub then fails at once by itself, and nothing may touch the network) or when a proxy is
    configured (which this check cannot see through). One TCP connection to ``$HF_ENDPOINT`` (default
    huggingface.co:443), at most 5 s, remembered for a minute. Without it an offline machine waits ~25 s in
    huggingface_hub's retries (1+2+4+8+8 s of back-off) for every missing file before the error."""
    return url_unreachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


def url_unreachable(url: str) -> str | None:
    """:func:`hub_unreachable` for the host of any ``http(s)://`` URL (e.g. a checkpoint on a plain web
    server): why it cannot be reached, or ``None`` (also under ``HF_HUB_OFFLINE`` or a proxy)."""
    if offline() or urllib.request.getproxies().keys() & {"https", "http", "all"}:
        return None
    endpoint = urllib.parse.urlsplit(url)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return _probe(endpoint.hostname or "huggingface.co", port, int(time.monotonic() // 60))


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, minute: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        return f"cannot reach {host}:{port} ({err.strerror or type(err).__name__}); no network?"
    return None


def _hub_error(cfg_or_repo: str, root: Path) -> None:
    """Raise :class:`DownloadError` at once when the Hub cannot be reached (see :func:`hub_unreachable`)."""
    reason = hub_unreachable()
    if reason:
        raise DownloadError(f"could not get {cfg_or_repo} ({reason}). Put the files into {root}, or set "
                            "HF_HUB_OFFLINE=1 when working offline", reason=reason)


def _missing_message(cfg: PretrainedCfg, root: Path, reason: str) -> str:
    return (
        f"could not get {cfg.name!r} ({reason}). Download {cfg.source()} and save it as "
        f"{root / cfg.filename}, or pass download_root=<folder holding {cfg.filename}>, or a local file path."
    )


def check_download_root(download_root: Any, name: str = "download_root") -> None:
    """``None`` or a path that is (or can become) a folder: a file there, or under a file, raises
    :class:`InvalidInputError` naming ``name`` before anything is read or downloaded."""
    from .validation import ArgumentTypeError

    if download_root is None:
        return
    if not isinstance(download_root, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a folder path, got {type(download_root).__name__}")
    path = Path(download_root).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise InvalidInputError(f"{name}={os.fspath(download_root)!r}: {str(folder)!r} is a file, not a folder")
            return


def fetch(cfg: PretrainedCfg, download_root: str | os.PathLike | None = None, *, revision: str | None = None) -> Path:
    """Return a local path to ``cfg``'s file, downloading it into ``download_root`` when absent."""
    check_download_root(download_root)
    root = Path(download_root).expanduser() if download_root is not None else default_cache_dir()
    for name in (cfg.filename, *cfg.alt_filenames):
        candidate = root / name
        if candidate.is_file():
            logger.info("using cached %s", candidate)
            return candidate
        if candidate.exists():
            raise DownloadError(f"{candidate} exists and is not a regular file")
    root.mkdir(parents=True, exist_ok=True)
    if cfg.hf_repo:
        return _fetch_from_hub(cfg, root, revision or cfg.revision)
    if cfg.url:
        if offline():
            raise DownloadError(_missing_message(cfg, root, "HF_HUB_OFFLINE is set"), reason="HF_HUB_OFFLINE is set")
        return download_url(cfg.url, root / cfg.filename, sha256=cfg.sha256)
    raise DownloadError(_missing_message(cfg, root, "no remote source is known"), reason="no remote source is known")


def fetch_folder(cfg: PretrainedCfg, download_root: str | os.PathLike | None = None, *,
                 revision: str | None = None) -> Path:
    """Return the local folder ``download_root / cfg.filename`` holding ``cfg.folder_files`` of the Hub repo
    ``cfg.hf_repo`` (a transformers model or processor folder). Nothing touches the network when the folder
    is complete (:meth:`PretrainedCfg.local_path`); otherwise the missing files (the first choice of each) are
    downloaded at ``revision or cfg.revision``. Raises :class:`~ImageReward.errors.DownloadError`."""
    root = Path(download_root).expanduser() if download_root is not None else default_cache_dir()
    folder = cfg.local_path(root)
    if folder is not None:
        logger.info("using cached %s", folder)
        return folder
    folder = root / cfg.filename
    missing = [_choices(entry)[0] for entry in cfg.folder_files
               if not any((folder / name).is_file() for name in _choices(entry))]
    if not cfg.hf_repo:
        raise DownloadError(_missing_message(cfg, root, "no remote source is known"), reason="no remote source is known")
    _hub_error(f"{cfg.name!r}", root)
    from huggingface_hub import hf_hub_download

    folder.mkdir(parents=True, exist_ok=True)
    for name in missing:
        try:
            hf_hub_download(repo_id=cfg.hf_repo, filename=name, revision=revision or cfg.revision, local_dir=str(folder))
        except Exception as err:  # offline mode, no route to the Hub, 404, ...
            reason = "offline (HF_HUB_OFFLINE=1)" if offline() else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise DownloadError(f"could not get {name} of {cfg.name!r} ({reason}). Download {cfg.describe()} "
                                f"into {folder}, or pass download_root=<folder holding {cfg.filename}/>.",
                                reason=reason) from err
    return folder


def _fetch_from_hub(cfg: PretrainedCfg, root: Path, revision: str | None) -> Path:
    reason = hub_unreachable()
    if reason:
        raise DownloadError(_missing_message(cfg, root, reason), reason=reason)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=cfg.hf_repo, filename=cfg.hf_filename or cfg.filename,
                               revision=revision, local_dir=str(root))
    except Exception as err:  # offline mode, no route to the Hub, 404, ...
        reason = "offline (HF_HUB_OFFLINE=1)" if offline() else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DownloadError(_missing_message(cfg, root, reason), reason=reason) from err
    path = Path(path)
    if cfg.sha256 and sha256_of(path) != cfg.sha256:
        raise DownloadError(f"{path} failed its SHA-256 check (expected {cfg.sha256}); delete it and retry")
    final = root / cfg.filename
    if path != final and not final.exists():
        shutil.move(str(path), final)
        path = final
    return path


# The files a Hub repository may hold for ImageReward.load: a save_pretrained folder (config.json +
# model.safetensors) or the original's single ImageReward.pt.
HUB_CHECKPOINT_FILES = ("config.json", "model.safetensors", "ImageReward.pt")


def fetch_hub_repo(repo_id: str, download_root: str | os.PathLike | None = None, *, revision: str | None = None
                   ) -> Path:
    """Download the checkpoint files of Hub repository ``repo_id`` (``HUB_CHECKPOINT_FILES`` only) into
    ``download_root/hub/<owner>--<name>`` and return that folder. Raises
    :class:`~ImageReward.errors.DownloadError` (offline, unknown repository, or no checkpoint in it)."""
    from huggingface_hub import snapshot_download

    root = Path(download_root) if download_root is not None else default_cache_dir()
    folder = root / "hub" / repo_id.replace("/", "--")
    _hub_error(f"Hub repository {repo_id!r}", folder)
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(folder),
                          allow_patterns=list(HUB_CHECKPOINT_FILES))
    except Exception as err:  # offline mode, no route to the Hub, 404, ...
        reason = "offline (HF_HUB_OFFLINE=1)" if offline() else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DownloadError(f"could not get Hub repository {repo_id!r} ({reason}); download its "
                            f"{' / '.join(HUB_CHECKPOINT_FILES)} into {folder}, or pass a local path",
                            reason=reason) from err
    if not any((folder / name).is_file() for name in HUB_CHECKPOINT_FILES[1:]):
        raise DownloadError(f"Hub repository {repo_id!r} holds no ImageReward checkpoint "
                            f"(expected one of {list(HUB_CHECKPOINT_FILES[1:])})")
    return folder


def download_url(url: str, destination: str | os.PathLike, *, sha256: str | None = None,
                 chunk_size: int = 1 << 16, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``destination`` with a progress bar, check ``sha256`` when given, and rename
    atomically: a partial or corrupt download never appears under the final name."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                for block in iter(lambda: response.read(chunk_size), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 and digest.hexdigest() != sha256:
            raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}")
        os.replace(temp_name, destination)
    except DownloadError:
        raise
    except Exception as err:
        raise DownloadError(f"could not download {url} to {destination}: {err}") from err
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return destination
