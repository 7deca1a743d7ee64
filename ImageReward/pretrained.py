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

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DownloadError

__all__ = ["PretrainedCfg", "IMAGE_REWARD_MODELS", "default_cache_dir", "offline", "fetch", "fetch_hub_repo",
           "download_url", "sha256_of"]

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
    license: str = ""
    description: str = ""

    def source(self) -> str:
        if self.hf_repo:
            return f"https://huggingface.co/{self.hf_repo}/resolve/{self.revision or 'main'}/{self.hf_filename or self.filename}"
        return self.url or "(no remote source)"


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


def _missing_message(cfg: PretrainedCfg, root: Path, reason: str) -> str:
    return (
        f"could not get {cfg.name!r} ({reason}). Download {cfg.source()} and save it as "
        f"{root / cfg.filename}, or pass download_root=<folder holding {cfg.filename}>, or a local file path."
    )


def fetch(cfg: PretrainedCfg, download_root: str | os.PathLike | None = None, *, revision: str | None = None) -> Path:
    """Return a local path to ``cfg``'s file, downloading it into ``download_root`` when absent."""
    root = Path(download_root) if download_root is not None else default_cache_dir()
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
            raise DownloadError(_missing_message(cfg, root, "HF_HUB_OFFLINE is set"))
        return download_url(cfg.url, root / cfg.filename, sha256=cfg.sha256)
    raise DownloadError(_missing_message(cfg, root, "no remote source is known"))


def _fetch_from_hub(cfg: PretrainedCfg, root: Path, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=cfg.hf_repo, filename=cfg.hf_filename or cfg.filename,
                               revision=revision, local_dir=str(root))
    except Exception as err:  # offline mode, no route to the Hub, 404, ...
        reason = "offline (HF_HUB_OFFLINE=1)" if offline() else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DownloadError(_missing_message(cfg, root, reason)) from err
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
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(folder),
                          allow_patterns=list(HUB_CHECKPOINT_FILES))
    except Exception as err:  # offline mode, no route to the Hub, 404, ...
        reason = "offline (HF_HUB_OFFLINE=1)" if offline() else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DownloadError(f"could not get Hub repository {repo_id!r} ({reason}); download its "
                            f"{' / '.join(HUB_CHECKPOINT_FILES)} into {folder}, or pass a local path") from err
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
