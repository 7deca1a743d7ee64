"""Dataset readers for ``score-dataset``: a folder, a JSONL/JSON/CSV/Parquet table, a Hub dataset, or
WebDataset / img2dataset tar shards (:mod:`.shards`).

Every reader returns a list of :class:`Record` (prompt, where the image is, a stable ``id``), cheap to
build even for large datasets: images are *referenced* (path, URL, or a row of a Parquet file), and decoded
later, in DataLoader workers, by :func:`load_record_image`. Problems with one row (no prompt, unreadable
image, failed download) become an error row downstream; problems with the whole input raise a typed error.

>>> records = read_records("generations/", prompt="a red bicycle")   # doctest: +SKIP
>>> records[0].id, records[0].prompt                                   # doctest: +SKIP
('0001.png', 'a red bicycle')
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from ..errors import DownloadError, ImageLoadError, InvalidInputError, UnsupportedInputError
from ..image_io import IMAGE_EXTENSIONS, list_images, load_image
from ..pretrained import hub_unreachable, offline
from ..textio import check_encoding, read_json, read_text
from .embedded import caption_prompt, embedded_prompt

__all__ = ["Record", "ParquetBlob", "TarMember", "read_records", "load_record_image", "IMAGE_EXTENSIONS", "parse_hub_uri"]

logger = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
PROMPT_COLUMNS = ("prompt", "caption", "text", "prompt_text")
IMAGE_COLUMNS = ("image", "image_path", "img_path", "path", "file_name", "filename", "file", "url", "image_url", "img")
ID_COLUMNS = ("id", "image_id", "key", "uid")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # Hugging Face "imagefolder" convention
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ParquetBlob:
    """An image stored inside a Parquet file (bytes, or a Hugging Face ``Image`` struct)."""

    file: str
    row_group: int
    row: int
    column: str


@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar shard: ``size`` bytes at byte ``offset`` of ``file`` (read without tarfile)."""

    file: str
    offset: int
    size: int


@dataclass(frozen=True)
class Record:
    """One (prompt, image) pair to score.

    ``index``: position in the input (sharding and output order); ``id``: stable key used to resume;
    ``image``: what the output row shows (path, URL, or ``file.parquet#row``); ``source``: how to load it
    (a path, an ``http(s)`` URL, a :class:`ParquetBlob`, a :class:`TarMember`, or raw bytes); ``error``: a
    problem found while reading (no prompt, no image), written as the row's error without loading anything;
    ``shard``: the tar shard the row comes from (WebDataset / img2dataset inputs), else ``None``.
    """

    index: int
    id: str
    prompt: str | None
    image: str
    source: Any = None
    error: str | None = None
    shard: str | None = None


# ---------------------------------------------------------------------------------------------- loading
def _decode_bytes(data: bytes, what: str) -> Image.Image:
    """Decode encoded image bytes with the one image loader; the error names the dataset row."""
    try:
        return load_image(bytes(data), exif_transpose=False)  # load_record_image applies the orientation
    except ImageLoadError as err:
        raise ImageLoadError(f"{what}: {err}") from err


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def fetch_url(url: str, *, timeout: float = 10.0, retries: int = 1) -> bytes:
    """GET ``url`` (at most 64 MiB) with a per-attempt ``timeout``; raises :class:`ImageLoadError`.

    Client errors (4xx) are not retried; timeouts, connection errors and 5xx are, ``retries`` times.
    """
    last: Exception | None = None
    for _attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "ImageReward-score-dataset"})
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http/https only)
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
            if len(data) > MAX_DOWNLOAD_BYTES:
                raise ImageLoadError(f"{url!r}: larger than {MAX_DOWNLOAD_BYTES} bytes")
            return data
        except urllib.error.HTTPError as err:
            last = err
            if err.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            last = err
    if isinstance(last, urllib.error.HTTPError):
        reason: object = f"HTTP {last.code} {last.reason}"
    else:
        reason = getattr(last, "reason", None) or last
    raise ImageLoadError(f"{url!r}: download failed ({reason})") from last


@functools.lru_cache(maxsize=2)
def _row_group_column(file: str, row_group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(row_group, columns=[column]).column(0).to_pylist()


def load_record_image(record: Record, *, timeout: float = 10.0, exif_transpose: bool = True) -> Image.Image:
    """Decode the image of ``record`` (in a DataLoader worker); raises :class:`ImageLoadError` naming it.
    ``exif_transpose`` as :func:`ImageReward.image_io.load_image`.

    >>> load_record_image(Record(0, "0", "a cat", "cat.png", "cat.png"))  # doctest: +SKIP
    <PIL.PngImagePlugin.PngImageFile image mode=RGB size=512x512>
    """
    what = f"row {record.index} ({record.image})"
    source = record.source
    if isinstance(source, ParquetBlob):
        source = _row_group_column(source.file, source.row_group, source.column)[source.row]
    elif isinstance(source, TarMember):
        source = _read_tar_member(source, what)
    return load_image(_load_value(source, what, base=None, timeout=timeout, index=record.index),
                      index=record.index, exif_transpose=exif_transpose)


def _read_tar_member(member: TarMember, what: str) -> bytes:
    try:
        with open(member.file, "rb") as handle:
            handle.seek(member.offset)
            data = handle.read(member.size)
    except OSError as err:
        raise ImageLoadError(f"{what}: cannot read the shard ({err})") from err
    if len(data) != member.size:
        raise ImageLoadError(f"{what}: the shard is cut short ({len(data)} of {member.size} bytes)")
    return data


def _load_value(value: Any, what: str, *, base: Path | None, timeout: float, index: int) -> Image.Image:
    if value is None:
        raise ImageLoadError(f"{what}: no image")
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _decode_bytes(value["bytes"], what)
        return _load_value(value.get("path"), what, base=base, timeout=timeout, index=index)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), what)
    if isinstance(value, str) and _is_url(value):
        return _decode_bytes(fetch_url(value, timeout=timeout), what)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        return load_image(path, index=index, exif_transpose=False)  # load_record_image applies the orientation
    raise ImageLoadError(f"{what}: unsupported image value of type {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- readers
def read_records(
    source: str | os.PathLike,
    *,
    prompt: str | None = None,
    prompt_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    encoding: str | None = None,
    prompt_free: bool = False,
) -> list[Record]:
    """Records of a folder, a table (``.jsonl .json .csv .tsv .parquet``), ``hf://datasets/OWNER/NAME``, or
    WebDataset tar shards (a ``.tar``, a glob, a brace range ``shard-{00000..00099}.tar``, or a folder of
    ``.tar`` files such as img2dataset's output; see :func:`ImageReward.scoring.shards.read_shard`).

    ``prompt`` scores every image against that one prompt (overriding sidecars and prompt columns).
    ``prompt_free``: the scorer uses no prompt (``Scorer.uses_prompt`` is false), so none is required: rows
    without one get ``""`` instead of an error, and a table needs no prompt column.
    Folder images take their prompt from ``IMAGE.txt`` (an A1111 infotext file gives its positive prompt only),
    ``IMAGE.json``, or what a generator stored in the image (see :mod:`ImageReward.scoring.embedded`).
    Columns are found by common names (``prompt``/``caption``/``text``; ``image``/``image_path``/
    ``file_name``/``url``...; ``id``) unless named. Relative image paths are relative to the table's folder.
    Text files are read by :func:`ImageReward.textio.read_text` (UTF-8, BOM accepted; ``encoding`` for others).

    Mistakes in the whole input raise :class:`InvalidInputError` before any row is scored: a table without
    a prompt column (unless ``prompt`` is given; the message lists the columns found), a named column that is
    not there, a folder where no image has a prompt sidecar, ids that repeat. A malformed JSONL line becomes
    one error row; a made-up id (the row number) that equals a real id gets a ``#`` suffix, so ids never collide.

    >>> [r.prompt for r in read_records("pairs.jsonl")][:1]   # doctest: +SKIP
    ['a cat']
    """
    if not isinstance(source, (str, os.PathLike)):
        raise UnsupportedInputError(f"source must be a folder, a table file or hf://datasets/OWNER/NAME, "
                                    f"got {type(source).__name__}")
    if prompt is not None and not isinstance(prompt, str):
        raise UnsupportedInputError(f"prompt must be a str, got {type(prompt).__name__}")
    if prompt is not None and not prompt.strip():
        raise InvalidInputError("prompt is empty: pass the text to score every image against")
    for name, value in (("prompt_column", prompt_column), ("image_column", image_column), ("id_column", id_column)):
        if value is not None and not isinstance(value, str):
            raise UnsupportedInputError(f"{name} must be a column name (str), got {type(value).__name__}")
    check_encoding(encoding)
    columns = dict(prompt_column=prompt_column, image_column=image_column, id_column=id_column,
                   need_prompt=prompt is None and not prompt_free, encoding=encoding)
    text = os.fspath(source)
    from .shards import is_shard_input, read_shard_records  # shards.py builds Records: imported here

    if text.startswith(("hf://", "hf:")):
        records = _read_hub(text, split=split, revision=revision, **columns)
    elif is_shard_input(text):
        records = read_shard_records(text, need_prompt=prompt is None and not prompt_free)
    else:
        path = Path(text)
        if path.is_dir():
            records = _read_folder(path, **columns)
        elif path.exists() and not path.is_file():
            raise InvalidInputError(f"input {text!r} is not a regular file or folder (a pipe, socket or device)")
        elif path.is_file():
            if path.suffix.lower() not in TABLE_EXTENSIONS:
                raise UnsupportedInputError(f"input {text!r}: expected a folder, a {'/'.join(TABLE_EXTENSIONS)} "
                                            "file, or hf://datasets/OWNER/NAME")
            records = _read_table(path, base=path.parent, **columns)
        else:
            hint = f"; for a Hub dataset write hf://datasets/{text}" if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else ""
            raise InvalidInputError(f"input {text!r} does not exist{hint}")
    records = with_prompt(records, prompt, prompt_free=prompt_free)
    ids: set[str] = set()
    for record in records:
        if record.id in ids:
            raise InvalidInputError(f"input {text!r}: id {record.id!r} appears more than once (row {record.index}); "
                                    "ids must be unique to resume safely: pass --id-column, or remove the id column")
        ids.add(record.id)
    logger.info("read %d records from %s", len(records), text)
    return records


def with_prompt(records: list[Record], prompt: str | None, *, prompt_free: bool = False) -> list[Record]:
    """``records`` scored against the one ``prompt`` (or, for a prompt-free scorer, whatever prompt they have):
    their "no prompt" errors cleared, other errors kept. Unchanged when neither applies."""
    if prompt is None and not prompt_free:
        return records
    return [_with(r, prompt=prompt if prompt is not None else (r.prompt or ""),
                  error=None if r.error and r.error.startswith("no prompt") else r.error) for r in records]


def _with(record: Record, **changes: Any) -> Record:
    return Record(**{**record.__dict__, **changes})


def _pick(columns: Iterable[str], explicit: str | None, candidates: tuple[str, ...], what: str, where: str,
          *, required: bool = True) -> str | None:
    available = list(columns)
    if explicit is not None:
        if explicit not in available:
            raise InvalidInputError(f"{where}: no {what} column {explicit!r}; columns are {available}")
        return explicit
    lowered = {name.lower(): name for name in available}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        extra = " (or pass --prompt to score every image against one prompt)" if what == "prompt" else ""
        raise InvalidInputError(f"{where}: cannot find the {what} column among {available}; "
                                f"name it with --{what}-column{extra}")
    return None


def _prompt_value(value: Any, index: int) -> tuple[str | None, str | None]:
    if isinstance(value, str) and value.strip():
        return value, None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "no prompt: empty prompt; pass --prompt to score against one prompt"
    return None, f"no prompt: prompt is a {type(value).__name__}, not text"


def _rows_to_records(rows: list[dict], *, base: Path | None, where: str, prompt_column: str | None,
                     image_column: str | None, id_column: str | None, columns: list[str],
                     blob_refs: dict[int, ParquetBlob] | None = None, id_prefix: str = "",
                     start: int = 0, need_prompt: bool = False) -> list[Record]:
    image_key = _pick(columns, image_column, IMAGE_COLUMNS, "image", where)
    prompt_key = _pick(columns, prompt_column, PROMPT_COLUMNS, "prompt", where, required=need_prompt)
    id_key = _pick(columns, id_column, ID_COLUMNS, "id", where, required=False)
    records = []
    automatic: set[int] = set()  # positions whose id was made up here (renamed if it collides with a real one)
    for position, row in enumerate(rows):
        index = start + position
        if "__error__" in row:
            records.append(Record(index, f"{id_prefix}{position}", None, "", None, row["__error__"]))
            automatic.add(position)
            continue
        record_id = f"{id_prefix}{position}" if id_key is None or row.get(id_key) in (None, "") else str(row[id_key])
        if id_key is None or row.get(id_key) in (None, ""):
            automatic.add(position)
        prompt, error = _prompt_value(row.get(prompt_key), index) if prompt_key else (
            None, "no prompt: the input has no prompt column; pass --prompt")
        value = row.get(image_key)
        if blob_refs is not None and position in blob_refs:
            source, shown = blob_refs[position], f"{where}#{position}"
        elif isinstance(value, str) and value.strip():
            value = value.strip()
            source = value if _is_url(value) or base is None or Path(value).is_absolute() else str(base / value)
            shown = value
        elif isinstance(value, dict) and value.get("path") and not value.get("bytes"):
            source = shown = str(value["path"])
        else:
            source, shown = None, ""
            error = error or "no image: empty image field"
        records.append(Record(index, record_id, prompt, shown, source, error))
    return _unique_automatic_ids(records, automatic)


def _unique_automatic_ids(records: list[Record], automatic: set[int]) -> list[Record]:
    """Rename a made-up id that equals a real one (``"3"`` for row 3 when another row has id 3): the
    made-up one gets ``#``-suffixes until unique. Deterministic, so a rerun finds the same ids."""
    if not automatic:
        return records
    taken = {record.id for position, record in enumerate(records) if position not in automatic}
    for position in sorted(automatic):
        record = records[position]
        new_id = record.id
        while new_id in taken:
            new_id += "#"
        if new_id != record.id:
            records[position] = _with(record, id=new_id)
        taken.add(new_id)
    return records


def _read_table(path: Path, *, base: Path | None, prompt_column: str | None = None,
                image_column: str | None = None, id_column: str | None = None,
                id_prefix: str = "", start: int = 0, shown_name: str | None = None, need_prompt: bool = False,
                encoding: str | None = None) -> list[Record]:
    where = shown_name or str(path)
    suffix = path.suffix.lower()
    blob_refs: dict[int, ParquetBlob] | None = None
    if suffix == ".jsonl":
        rows = []
        # split on "\n" only: U+2028 and friends may appear inside JSON strings
        for line_no, line in enumerate(read_text(path, encoding=encoding, what="input").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                row = {"__error__": f"bad input: {where} line {line_no} is not a JSON object ({err})"}
            rows.append(row)
        if rows and all("__error__" in row for row in rows):
            raise InvalidInputError(f"{where}: no line is a JSON object (first: {rows[0]['__error__']})")
        columns = list(dict.fromkeys(key for row in rows for key in row if key != "__error__"))
    elif suffix == ".json":
        data = read_json(path, encoding=encoding, what="input")
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise InvalidInputError(f"{where}: expected a JSON list of objects (or use .jsonl, one object a line)")
        rows = data
        columns = list(dict.fromkeys(key for row in rows for key in row))
    elif suffix in (".csv", ".tsv"):
        text = read_text(path, encoding=encoding, what="input")
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
        except csv.Error as err:
            raise InvalidInputError(f"{where}: not a valid {suffix[1:].upper()} table ({err})") from err
        columns = [name for name in (reader.fieldnames or []) if name is not None]
    elif suffix == ".parquet":
        rows, columns, blob_refs = _read_parquet_rows(path, image_column)
    else:
        raise UnsupportedInputError(f"{where}: unsupported table type {suffix!r}")
    if not rows:
        raise InvalidInputError(f"{where}: the table is empty")
    return _rows_to_records(rows, base=base, where=where, prompt_column=prompt_column, image_column=image_column,
                            id_column=id_column, columns=columns, blob_refs=blob_refs, id_prefix=id_prefix,
                            start=start, need_prompt=need_prompt)


def _read_parquet_rows(path: Path, image_column: str | None) -> tuple[list[dict], list[str], dict[int, ParquetBlob]]:
    """Read every column except embedded image bytes, which become :class:`ParquetBlob` references."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InvalidInputError("reading Parquet needs pyarrow: pip install pyarrow (or, in this project's "
                                "checkout, pip install -e '.[scoring]')") from err
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    columns = list(schema.names)
    image_key = _pick(columns, image_column, IMAGE_COLUMNS, "image", str(path))

    def is_blob(field_type: Any) -> bool:
        if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
            return True
        return pa.types.is_struct(field_type) and any(
            pa.types.is_binary(field_type.field(i).type) or pa.types.is_large_binary(field_type.field(i).type)
            for i in range(field_type.num_fields))

    blob = is_blob(schema.field(image_key).type)
    light = [name for name in columns if not (blob and name == image_key)]
    rows: list[dict] = []
    refs: dict[int, ParquetBlob] = {}
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=light)
        for row_in_group, row in enumerate(table.to_pylist()):
            if blob:
                refs[len(rows)] = ParquetBlob(str(path), group, row_in_group, image_key)
            rows.append(row)
    return rows, columns, refs


def _read_folder(folder: Path, *, need_prompt: bool = False, encoding: str | None = None, **columns: Any
                 ) -> list[Record]:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            logger.info("using %s (imagefolder metadata)", folder / name)
            return _read_table(folder / name, base=folder, need_prompt=need_prompt, encoding=encoding, **columns)
    images = list_images(folder)  # hidden and system entries (.ipynb_checkpoints, __MACOSX, ...) skipped
    if not images:
        raise InvalidInputError(f"folder {str(folder)!r} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    records = []
    for index, image in enumerate(images):
        rel = image.relative_to(folder).as_posix()
        prompt, error = _sidecar_prompt(image, encoding) if need_prompt else (None, None)
        records.append(Record(index, rel, prompt, rel, str(image), error))
    if need_prompt and all(record.prompt is None and "by a generator; pass --prompt" in (record.error or "")
                           for record in records):
        raise InvalidInputError(f"folder {str(folder)!r}: no image has a prompt (no IMAGE.txt / IMAGE.json "
                                "sidecars, no metadata.jsonl/csv/parquet, no prompt stored in the images by "
                                "A1111/Forge/ComfyUI); pass --prompt to score every image against one prompt")
    return records


def _sidecar_prompt(image: Path, encoding: str | None = None) -> tuple[str | None, str | None]:
    text_file, json_file = image.with_suffix(".txt"), image.with_suffix(".json")
    if text_file.is_file():
        try:  # an A1111 "parameters" text file gives its positive prompt only (embedded.caption_prompt)
            return _prompt_value(caption_prompt(read_text(text_file, encoding=encoding, what="prompt sidecar")), 0)
        except InvalidInputError as err:  # one unreadable sidecar is that row's error
            return None, f"no prompt: {err}"
    if json_file.is_file():
        try:
            data = read_json(json_file, encoding=encoding, what="prompt sidecar")
        except InvalidInputError as err:
            return None, f"no prompt: {err}"
        if isinstance(data, dict):
            for key in PROMPT_COLUMNS:
                if key in data:
                    return _prompt_value(data[key], 0)
        return None, f"no prompt: {json_file.name} has none of the keys {list(PROMPT_COLUMNS)}"
    embedded = embedded_prompt(image)  # A1111 / Forge infotext, ComfyUI graph
    if embedded is not None:
        return embedded
    return None, (f"no prompt: no {text_file.name} or {json_file.name} sidecar and no prompt stored in the image "
                  "by a generator; pass --prompt")


# ---------------------------------------------------------------------------------------------- the Hub
def parse_hub_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://datasets/OWNER/NAME[@REVISION][/SUBDIR]`` -> ``(repo_id, revision, subdir)``.

    >>> parse_hub_uri("hf://datasets/THUDM/ImageRewardDB@main/data")
    ('THUDM/ImageRewardDB', 'main', 'data')
    """
    match = re.fullmatch(r"hf:(?://)?(?:datasets/)?([\w.-]+/[\w.-]+)(?:@([^/]+))?(?:/(.*))?", uri)
    if not match:
        raise InvalidInputError(f"{uri!r}: expected hf://datasets/OWNER/NAME[@REVISION][/SUBDIR]")
    return match.group(1), match.group(2), (match.group(3) or "").strip("/")


def _hub_list_files(repo_id: str, revision: str | None) -> list[str]:
    """Files of a dataset repo; offline (``HF_HUB_OFFLINE=1`` or no connection) lists the local cache."""
    from huggingface_hub import HfApi, snapshot_download

    if not offline() and not hub_unreachable():
        try:
            return list(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision))
        except Exception as err:  # noqa: BLE001 - any Hub failure: fall back to the cache
            logger.warning("cannot list %s on the Hub (%s); using the local cache", repo_id, err)
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                        allow_patterns=["*.parquet"], local_files_only=True))
    except Exception as err:  # noqa: BLE001
        raise DownloadError(f"dataset {repo_id!r} is neither reachable on the Hub nor in the local cache ({err})") from err
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")]


def _hub_download(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    # Hub unreachable: the cached copy or an error at once, not after huggingface_hub's ~25 s of retries
    return hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision,
                           local_files_only=hub_unreachable() is not None)


def _split_matches(name: str, split: str | None, subdir: str) -> bool:
    if subdir and not (name == subdir or name.startswith(subdir + "/")):
        return False
    if split is None:
        return True
    parts = name.split("/")
    base = parts[-1]
    return split in parts[:-1] or base.startswith((f"{split}-", f"{split}.", f"{split}_"))


def _read_hub(uri: str, *, split: str | None, revision: str | None, **columns: Any) -> list[Record]:
    repo_id, uri_revision, subdir = parse_hub_uri(uri)
    revision = revision or uri_revision
    candidates = [revision] if revision else [None, "refs/convert/parquet"]
    files: list[str] = []
    used = revision
    for used in candidates:
        files = sorted(f for f in _hub_list_files(repo_id, used)
                       if f.endswith(".parquet") and _split_matches(f, split, subdir))
        if files:
            break
    if not files:
        raise InvalidInputError(f"dataset {repo_id!r}: no Parquet files"
                                f"{f' for split {split!r}' if split else ''}{f' under {subdir!r}' if subdir else ''}")
    records: list[Record] = []
    for name in files:
        local = Path(_hub_download(repo_id, name, used))
        records.extend(_read_table(local, base=None, id_prefix=f"{name}#", start=len(records),
                                   shown_name=name, **columns))
    return records
