"""The one archive extractor for downloaded data (test images, benchmark generations, ImageRewardDB parts):
every entry is checked before anything is written (no absolute paths, ``..``, drive letters or symlinks), and
an archive is extracted into a temporary sibling folder renamed into place only when complete, so an
interrupted run never leaves a half-extracted folder that looks finished.

>>> extract_archive_to("test_images.zip", "data/test_images")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import InvalidInputError

__all__ = ["safe_extract_zip", "extract_archive_to"]


def _check_member(info: zipfile.ZipInfo, archive: str) -> PurePosixPath:
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidInputError(f"{archive}: entry {info.filename!r} is a symbolic link; refusing to extract")
    if path.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise InvalidInputError(f"{archive}: entry {info.filename!r} would be written outside the target folder")
    return path


def safe_extract_zip(archive: str | os.PathLike, destination: str | os.PathLike) -> list[Path]:
    """Extract ``archive`` into ``destination``; refuse absolute paths, ``..``, drive letters and symlinks.

    Every entry is checked before anything is written. Returns the extracted file paths.

    >>> safe_extract_zip("test_images.zip", "data")   # doctest: +SKIP
    """
    archive = os.fspath(archive)
    destination = Path(destination).resolve()
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise InvalidInputError(f"{archive}: not a readable zip archive ({err})") from err
    written = []
    with handle:
        members = [(info, _check_member(info, archive)) for info in handle.infolist()]
        for info, path in members:
            target = destination.joinpath(*path.parts).resolve()
            if target != destination and destination not in target.parents:
                raise InvalidInputError(f"{archive}: entry {info.filename!r} escapes {destination}")
        for info, path in members:
            target = destination.joinpath(*path.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with handle.open(info) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            written.append(target)
    return written


def extract_archive_to(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract ``archive`` so that its content ends up in the folder ``target``.

    An archive holding a single top-level folder (``test_images/...``) has that folder renamed to
    ``target``; otherwise its entries go directly into ``target``. Extraction happens in a temporary
    sibling folder which is renamed at the end, so ``target`` appears only when complete.
    """
    target = Path(target)
    if target.exists():
        raise InvalidInputError(f"{target} already exists; remove it to extract {archive} again")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
    try:
        safe_extract_zip(archive, staging)
        entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        os.replace(source, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
