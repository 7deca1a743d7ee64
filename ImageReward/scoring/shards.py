"""WebDataset tar shards and img2dataset output folders -> :class:`~.datasets.Record` (for both engines).

A WebDataset shard is a plain tar whose members are grouped into *samples* by key: ``dir/0001.jpg`` and
``dir/0001.txt`` are the ``jpg`` and ``txt`` of sample ``dir/0001`` (the key is the member name up to the
first dot of its file name, WebDataset's rule). A sample's image is its ``jpg``/``jpeg``/``png``/``webp``
member; its prompt the ``txt`` member, else the ``prompt``/``caption``/``text`` of its ``json`` member.

img2dataset's ``output_format="webdataset"`` folder holds ``00000.tar`` beside ``00000.parquet`` (every sample
it tried, with a ``status``) and ``00000_stats.json``. Samples it failed to download are not rows; a sample the
Parquet file lists as a success but the tar lacks (a shard cut short) is an error row.

Row ``id`` = ``SHARD/KEY`` (``SHARD``: the tar's path relative to the input folder, or to the folder the shards
share). Listing a shard reads its tar headers and its small text members; the images are read later, by
:func:`~.datasets.load_record_image`, from their byte range (:class:`~.datasets.TarMember`). A bad sample (no
image, no prompt, a member cut off) becomes an error row; a shard that is cut short keeps every whole sample.

>>> shards = list_shards("data/shard-{00000..00009}.tar")        # doctest: +SKIP
>>> read_shard(shards[0], need_prompt=True)[0].id                # doctest: +SKIP
'shard-00000.tar/000000000'
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..image_io import IMAGE_EXTENSIONS
from .datasets import PROMPT_COLUMNS, Record, TarMember, _prompt_value

__all__ = ["Shard", "SHARD_IMAGE_EXTENSIONS", "is_shard_input", "list_shards", "read_shard", "read_shard_records"]

logger = logging.getLogger(__name__)

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in this order when a sample has several
_PATTERN_CHARS = re.compile(r"[*?\[{]")


@dataclass(frozen=True)
class Shard:
    """One tar shard: ``name`` (relative, used in row ids and output names), its ``path``, and img2dataset's
    per-shard ``metadata`` Parquet file and ``stats`` JSON when they sit beside it."""

    name: str
    path: str
    metadata: str | None = None
    stats: str | None = None


def is_shard_input(source: str | os.PathLike) -> bool:
    """Whether ``source`` names tar shards: a ``.tar`` file, a glob or brace pattern, or a folder with
    ``.tar`` files and no images at its top level (WebDataset, img2dataset)."""
    text = os.fspath(source)
    if text.startswith(("hf://", "hf:")):
        return False
    path = Path(text)
    if path.is_dir():  # .tar files and no image at the top level (a folder of images keeps being one)
        children = [child for child in path.iterdir() if child.is_file()]
        return (any(child.suffix == ".tar" for child in children)
                and not any(child.suffix.lower() in IMAGE_EXTENSIONS for child in children))
    if path.suffix == ".tar":
        return True
    return bool(_PATTERN_CHARS.search(text)) and not path.exists() and ".tar" in text


def _expand(pattern: str) -> list[str]:
    """Brace ranges and lists (``{00000..00099}``, ``{a,b}``, by the ``braceexpand`` package, as WebDataset
    does), then globs; files that do not exist are an error naming them."""
    if "{" in pattern:
        try:
            from braceexpand import braceexpand
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise InvalidInputError(f"{pattern!r}: brace patterns need braceexpand: pip install "
                                    "'image-reward[scoring]'") from err
        names = list(braceexpand(pattern))
    else:
        names = [pattern]
    paths: list[str] = []
    missing = []
    for name in names:
        if glob.has_magic(name):
            found = sorted(glob.glob(name, recursive=True))
            if not found:
                missing.append(name)
            paths.extend(found)
        elif os.path.isfile(name):
            paths.append(name)
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InvalidInputError(f"shards {pattern!r}: no such file {shown}")
    return list(dict.fromkeys(paths))


def list_shards(source: str | os.PathLike) -> list[Shard]:
    """The shards named by ``source`` (see :func:`is_shard_input`), sorted, with img2dataset's ``.parquet``
    and ``_stats.json`` beside each tar when present. Raises :class:`InvalidInputError` when none exists."""
    text = os.fspath(source)
    if Path(text).is_dir():
        root = Path(text)
        paths = sorted(str(p) for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
    else:
        paths = _expand(text)
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])) if paths else Path(".")
    if not paths:
        raise InvalidInputError(f"shards {text!r}: no .tar file")
    shards = []
    for path in paths:
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
        stem = path[: -len(".tar")] if path.endswith(".tar") else path
        metadata = f"{stem}.parquet" if os.path.isfile(f"{stem}.parquet") else None
        stats = f"{stem}_stats.json" if os.path.isfile(f"{stem}_stats.json") else None
        shards.append(Shard(name, path, metadata, stats))
    return shards


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset's key rule: ``dir/0001.seg.png`` -> ``("dir/0001", "seg.png")``."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _sample_prompt(key: str, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile,
                   caption: str | None) -> tuple[str | None, str | None]:
    """The prompt of one sample: ``txt``, else the json's prompt key, else img2dataset's Parquet caption."""
    try:
        if "txt" in members:
            return _prompt_value(_text(tar.extractfile(members["txt"]).read()).strip(), 0)
        if "json" in members:
            data = json.loads(_text(tar.extractfile(members["json"]).read()))
            if isinstance(data, dict):
                for name in PROMPT_COLUMNS:
                    if name in data:
                        return _prompt_value(data[name], 0)
    except (UnicodeDecodeError, ValueError, OSError, tarfile.TarError) as err:
        return None, f"no prompt: sample {key!r}: unreadable text member ({type(err).__name__}: {err})"
    if caption is not None:
        return _prompt_value(caption, 0)
    return None, (f"no prompt: sample {key!r} has no txt member and no {'/'.join(PROMPT_COLUMNS[:3])} "
                  "in its json; pass --prompt to score against one prompt")


def _img2dataset_metadata(shard: Shard) -> tuple[dict[str, str | None], list[str]] | None:
    """``({key: caption}, keys in order)`` of img2dataset's successful samples, or ``None`` without metadata."""
    if shard.metadata is None:
        return None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(shard.metadata)
    except Exception as err:  # noqa: BLE001 - a broken metadata file: read the tar alone, say so
        logger.warning("%s: cannot read %s (%s); using the tar alone", shard.name, shard.metadata, err)
        return None
    columns = table.column_names
    if "key" not in columns:
        return None
    rows = table.to_pylist()
    good = [row for row in rows if row.get("status", "success") == "success" and row.get("key") is not None]
    captions = {str(row["key"]): row.get("caption") for row in good}
    return captions, list(captions)


def read_shard(shard: Shard, *, need_prompt: bool = True, start: int = 0) -> list[Record]:
    """The rows of one shard, in tar order (``index`` counts from ``start``); see the module docstring.

    Never raises for a bad sample or a shard cut short (those become error rows); a file that is not a tar
    at all raises :class:`InvalidInputError` naming the shard.
    """
    size = os.path.getsize(shard.path)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    cut_short: str | None = None
    try:
        tar = tarfile.open(shard.path, mode="r:")
    except (tarfile.TarError, OSError) as err:
        raise InvalidInputError(f"shard {shard.name!r} is not a readable tar file ({err})") from err
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError) as err:  # "unexpected end of data": the shard is cut short
                cut_short = f"{type(err).__name__}: {err}"
                break
            if member is None:
                break
            if not member.isfile():
                continue
            key, extension = _split_key(member.name)
            if member.offset_data + member.size > size:
                cut_short = f"member {member.name!r} ends past the end of the file"
            samples.setdefault(key, {}).setdefault(extension, member)
        metadata = _img2dataset_metadata(shard)
        captions, expected = metadata if metadata is not None else ({}, [])
        records: list[Record] = []
        last_key = next(reversed(samples), None)
        for key, members in samples.items():
            prompt, error = _sample_prompt(key, members, tar, captions.get(key)) if need_prompt else (None, None)
            image_member = next((members[e] for e in SHARD_IMAGE_EXTENSIONS if e in members), None)
            shown = f"{shard.name}/{image_member.name}" if image_member is not None else f"{shard.name}/{key}"
            source = None
            if image_member is None:
                error = f"no image: sample {key!r} has no {'/'.join(SHARD_IMAGE_EXTENSIONS)} member"
            else:
                source = TarMember(shard.path, image_member.offset_data, image_member.size)
                if cut_short and key == last_key:
                    error = f"shard {shard.name!r} is cut short within sample {key!r} ({cut_short})"
            records.append(Record(start + len(records), f"{shard.name}/{key}", prompt, shown, source, error,
                                  shard.name))
    for key in expected:
        if key not in samples:  # img2dataset wrote it as a success, the tar does not hold it
            records.append(Record(start + len(records), f"{shard.name}/{key}", captions.get(key), "", None,
                                  f"no image: sample {key!r} is missing from shard {shard.name!r} (cut short?)",
                                  shard.name))
    if cut_short:
        logger.warning("shard %s is cut short (%s): %d whole samples kept", shard.name, cut_short, len(samples))
    if shard.stats is not None and metadata is None:
        _check_stats(shard, len(samples))
    return records


def _check_stats(shard: Shard, found: int) -> None:
    """Warn when img2dataset's ``_stats.json`` counts more successes than the tar holds (no Parquet to say which)."""
    try:
        stats = json.loads(Path(shard.stats).read_text(encoding="utf-8"))
        successes = int(stats.get("successes", found))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if successes > found:
        logger.warning("shard %s holds %d samples but img2dataset's stats count %d successes", shard.name, found,
                       successes)


def read_shard_records(source: str | os.PathLike, *, need_prompt: bool = True) -> list[Record]:
    """The rows of every shard of ``source``, shard after shard (``index`` runs across shards)."""
    records: list[Record] = []
    for shard in list_shards(source):
        records.extend(read_shard(shard, need_prompt=need_prompt, start=len(records)))
    return records
