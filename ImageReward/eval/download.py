"""Evaluation data on disk: the downloads of the original's test data (archives are extracted by the one
safe extractor, :mod:`ImageReward.preference.archives`).

Every download goes through the one downloader (:mod:`ImageReward.pretrained`): Hub files via
``huggingface_hub`` (cached, resumable, honours ``HF_HUB_OFFLINE``), other URLs via
:func:`~ImageReward.pretrained.download_url` (streamed to a temporary file, renamed when complete).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DownloadError, InvalidInputError
from ..image_io import list_images
from ..preference.archives import extract_archive_to
from ..pretrained import download_url, hub_unreachable, offline

__all__ = ["ensure_test_json", "ensure_test_images",
           "ensure_benchmark_prompts", "ensure_benchmark_generations", "TEST_JSON_URL", "BENCHMARK_PROMPTS_URL",
           "BENCHMARK_GENERATIONS", "DEFAULT_BENCHMARK_MODELS"]

logger = logging.getLogger(__name__)

_GITHUB_RAW = "https://raw.githubusercontent.com/THUDM/ImageReward"
TEST_JSON_URL = f"{_GITHUB_RAW}/6d863e141e9cb43c07f992e3796af538cf01740e/data/test.json"
BENCHMARK_PROMPTS_URL = f"{_GITHUB_RAW}/1beb4e4de0932acbe7fc090c51208048b6269b58/benchmark/benchmark-prompts.json"
TEST_IMAGES_HUB = ("THUDM/ImageReward", "test_images.zip")
TEST_IMAGES_URL = "https://cloud.tsinghua.edu.cn/f/9bd245027652422499f4/?dl=1"

# model folder name -> (url, archive name) as in the original scripts/test-benchmark.sh. The Versatile
# Diffusion archive is extracted into the folder ``vd`` that the default model list expects.
BENCHMARK_GENERATIONS: dict[str, tuple[str, str]] = {
    "cogview2": ("https://cloud.tsinghua.edu.cn/f/f9b91bba105a42d29b3c/?dl=1", "cogview2.zip"),
    "dalle2": ("https://cloud.tsinghua.edu.cn/f/8388887b25be4feca7d1/?dl=1", "dalle2.zip"),
    "openjourney": ("https://cloud.tsinghua.edu.cn/f/99423f19652f454897eb/?dl=1", "openjourney.zip"),
    "sd1-4": ("https://cloud.tsinghua.edu.cn/f/a5d5fa46ec084bcb8156/?dl=1", "sd1-4.zip"),
    "sd2-1": ("https://cloud.tsinghua.edu.cn/f/f20bb683f2014be6afff/?dl=1", "sd2-1.zip"),
    "vd": ("https://cloud.tsinghua.edu.cn/f/bca4232c7ee9443192fe/?dl=1", "versatile-diffusion.zip"),
}
DEFAULT_BENCHMARK_MODELS: tuple[str, ...] = ("openjourney", "sd2-1", "dalle2", "sd1-4", "vd", "cogview2")


def _need_download(path: Path, what: str, url: str) -> None:
    if offline():
        raise DownloadError(f"{what} not found at {path} and HF_HUB_OFFLINE is set: download {url} "
                            f"to {path}, or pass its local path")


def _ensure_file(path: str | os.PathLike, what: str, url: str, download: bool) -> Path:
    """``path`` if it exists, else ``url`` downloaded there (when allowed and online)."""
    path = Path(path)
    if path.is_file():
        return path
    if not download:
        raise DownloadError(f"{what} {path} not found (downloads disabled); get it from {url}")
    _need_download(path, what, url)
    logger.info("downloading %s to %s", url, path)
    return download_url(url, path)


def ensure_test_json(path: str | os.PathLike, *, download: bool = True) -> Path:
    """``path`` if it exists, else download the original ``data/test.json`` there (when allowed)."""
    return _ensure_file(path, "test set", TEST_JSON_URL, download)


def ensure_test_images(img_prefix: str | os.PathLike, *, download: bool = True,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of test images; when missing, fetch ``test_images.zip`` (Hub ``THUDM/ImageReward``, else
    the original Tsinghua link), then extract it safely into ``img_prefix``."""
    folder = Path(img_prefix)
    if folder.is_dir():
        return folder
    repo, filename = TEST_IMAGES_HUB
    if not download:
        raise DownloadError(f"test images {folder} not found (downloads disabled); get {filename} from "
                            f"https://huggingface.co/{repo} and unzip it there")
    archive_dir = Path(cache_dir) if cache_dir is not None else folder.parent
    archive = archive_dir / filename
    if not archive.is_file():
        _need_download(folder, "test images", f"https://huggingface.co/{repo}/resolve/main/{filename}")
        try:
            from huggingface_hub import hf_hub_download

            unreachable = hub_unreachable()
            if unreachable:  # at once, not after huggingface_hub's ~25 s of retries
                raise DownloadError(unreachable)
            archive = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=str(archive_dir)))
        except Exception as err:  # Hub unreachable: the original's mirror
            logger.warning("Hub download of %s failed (%s); trying %s", filename, err, TEST_IMAGES_URL)
            archive = download_url(TEST_IMAGES_URL, archive)
    logger.info("extracting %s into %s", archive, folder)
    return extract_archive_to(archive, folder)


def ensure_benchmark_prompts(path: str | os.PathLike, *, download: bool = True) -> Path:
    """``path`` if it exists, else download the original ``benchmark/benchmark-prompts.json`` there."""
    return _ensure_file(path, "benchmark prompts", BENCHMARK_PROMPTS_URL, download)


def ensure_benchmark_generations(img_dir: str | os.PathLike, models: list[str], *, download: bool = True) -> None:
    """Make sure ``img_dir/<model>`` holds images for each model with a published archive.

    Unlike the original script, this works on a fresh clone (``img_dir`` is created), checks each model
    folder on its own (not "is the whole folder empty"), and puts Versatile Diffusion in ``vd``. Models
    without a published archive must already be on disk.
    """
    img_dir = Path(img_dir)
    for model in models:
        folder = img_dir / model
        if folder.is_dir() and list_images(folder, recursive=False):  # a lone .ipynb_checkpoints/ is not data
            continue
        if model not in BENCHMARK_GENERATIONS:
            raise InvalidInputError(f"no generations for model {model!r} in {folder} and no published archive "
                                    f"to download (known: {sorted(BENCHMARK_GENERATIONS)})")
        url, archive_name = BENCHMARK_GENERATIONS[model]
        if not download:
            raise DownloadError(f"generations of {model!r} not found in {folder} (downloads disabled); "
                                f"download {url} ({archive_name}) and unzip it there")
        _need_download(folder, f"generations of {model!r}", f"{url} ({archive_name}, then unzip it)")
        img_dir.mkdir(parents=True, exist_ok=True)
        archive = download_url(url, img_dir / archive_name)
        if folder.is_dir():
            folder.rmdir()  # empty
        extract_archive_to(archive, folder)
        archive.unlink()
