"""Resumable outputs for ``score-dataset``: append-only JSONL journals, merged into JSONL or Parquet.

How a run survives ``kill -9``:

* every finished batch is appended to a JSONL *journal* as whole lines and flushed to the OS at once;
* a journal's last line may be torn by a kill: readers ignore it, and the process that owns the journal
  truncates it before appending again, so no row is ever half-written *and* counted;
* a row is "done" when its ``id`` is in the output or in any journal; a rerun scores only the others;
* the final file is written to ``OUT.tmp`` and moved over ``OUT`` with ``os.replace`` (atomic), and the
  journals are deleted only afterwards; a kill in between leaves rows that the next merge de-duplicates.

For a single-process JSONL output the journal *is* ``OUT``. Otherwise (Parquet, or several processes
under ``accelerate launch``) each process writes ``OUT.parts/rank-R-of-W.jsonl`` and the main process
merges them, sorted by input index, when every process has finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidInputError

__all__ = ["ROW_FIELDS", "Journal", "encode_row", "read_journal", "output_format", "check_output_path", "parts_dir",
           "journal_path", "done_ids", "read_output", "merge_outputs", "remove_outputs", "settings_path",
           "check_run_settings", "write_run_settings"]

logger = logging.getLogger(__name__)

ROW_FIELDS = ("index", "id", "prompt", "image", "score", "error", "model")
_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


def output_format(output: str | os.PathLike) -> str:
    """``"jsonl"`` or ``"parquet"`` from the output's suffix.

    >>> output_format("scores.parquet")
    'parquet'
    """
    suffix = Path(output).suffix.lower()
    if suffix not in _FORMATS:
        raise InvalidInputError(f"output {os.fspath(output)!r}: name it .jsonl or .parquet")
    return _FORMATS[suffix]


def check_output_path(output: str | os.PathLike, name: str = "output") -> Path:
    """``output`` as a path a file can be written to: not a folder, no file among its parents. Raises
    :class:`InvalidInputError` naming ``name`` before anything is scored."""
    path = Path(output)
    if path.is_dir():
        raise InvalidInputError(f"{name} {os.fspath(output)!r} is a folder; name a file such as "
                                f"{os.fspath(path / 'scores.jsonl')!r}")
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"{name} {os.fspath(output)!r} is not a regular file (a pipe, socket or device)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"{name} {os.fspath(output)!r}: {str(parent)!r} is a file, not a folder")
            break
    return path


def parts_dir(output: str | os.PathLike) -> Path:
    """Where per-process journals live: ``OUT.parts/``."""
    return Path(f"{os.fspath(output)}.parts")


def journal_path(output: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """The journal process ``rank`` of ``world_size`` appends to."""
    if output_format(output) == "jsonl" and world_size == 1:
        return Path(output)
    return parts_dir(output) / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def read_journal(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Rows of a JSONL journal. A torn last line (a kill mid-write) is skipped, and with ``repair=True``
    cut off the file. A bad line anywhere else is corruption and raises :class:`InvalidInputError`."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    offset = 0
    good_end = 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        last = newline == -1
        end = len(data) if last else newline + 1
        line = data[offset:end].strip()
        if line:
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a row object")
            except ValueError as err:
                if last:  # torn by a kill: this row was never completed
                    logger.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                    break
                line_no = data.count(b"\n", 0, offset) + 1
                raise InvalidInputError(f"{path}: line {line_no} is corrupt ({err}); fix or delete that line") from err
            rows.append(row)
        offset = end
        good_end = end
    if repair and good_end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    elif repair and data and not data.endswith(b"\n"):  # a complete row that lost only its newline
        with path.open("ab") as handle:
            handle.write(b"\n")
    return rows


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSONL line in UTF-8. Text that UTF-8 cannot hold (a file name that was not valid UTF-8 on disk, read
    by Python as lone surrogates) is written as a JSON ``\\udcXX`` escape, which reads back as the same string:
    writing a row never fails on encoding."""
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


class Journal:
    """Append-only JSONL writer; each :meth:`append` writes whole lines and flushes them.

    >>> with Journal("scores.jsonl") as journal:             # doctest: +SKIP
    ...     journal.append([{"index": 0, "id": "0", "score": 0.3}])
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        read_journal(self.path, repair=True)  # cut a torn tail before appending after it
        self._handle = self.path.open("ab")
        self.fsync = fsync

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        payload = b"".join(encode_row(row) for row in rows)
        if payload:
            self._handle.write(payload)
            self._handle.flush()
            if self.fsync:
                os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_output(output: str | os.PathLike) -> list[dict]:
    """Rows of a finished (or partly written JSONL) output file; ``[]`` if it does not exist."""
    output = Path(output)
    if not output.exists():
        return []
    if output_format(output) == "jsonl":
        return read_journal(output)
    import pyarrow.parquet as pq

    return pq.read_table(output).to_pylist()


def _all_rows(output: str | os.PathLike) -> list[dict]:
    rows = read_output(output)
    folder = parts_dir(output)
    if folder.is_dir():
        for journal in sorted(folder.glob("*.jsonl")):
            rows.extend(read_journal(journal))
    return rows


def done_ids(output: str | os.PathLike, *, model: str | None = None) -> set[str]:
    """Ids already scored in ``output`` or its journals; rows that ended in an error are not done (a rerun
    retries them, and the merge keeps the newer row). With ``model``, rows written by another model raise
    :class:`InvalidInputError` (resuming would mix two models' scores in one file)."""
    ids: set[str] = set()
    for row in _all_rows(output):
        if model is not None and row.get("model") not in (None, model):
            raise InvalidInputError(f"{os.fspath(output)!r} holds scores from model {row.get('model')!r}, not "
                                    f"{model!r}: choose another output or pass --overwrite")
        if row.get("error") is None:
            ids.add(str(row["id"]))
    return ids


def _latest_rows(rows: list[dict]) -> list[dict]:
    """One row per id: the first scored row; an error row only until a later row (a retry) replaces it."""
    chosen: dict[str, dict] = {}
    for row in rows:
        previous = chosen.get(str(row["id"]))
        if previous is None or previous.get("error") is not None:
            chosen[str(row["id"])] = row
    return list(chosen.values())


def merge_outputs(output: str | os.PathLike) -> int:
    """Merge ``output`` and its journals into ``output`` (sorted by index, one row per id); returns the
    number of rows. Atomic: a kill leaves either the old or the new file, plus journals to merge again."""
    output = Path(output)
    fmt = output_format(output)
    folder = parts_dir(output)
    if fmt == "jsonl" and not folder.is_dir():
        journal = read_journal(output, repair=True)
        if len({str(row["id"]) for row in journal}) == len(journal):
            return len(journal)  # a single-process journal with one row per id: already the output
    rows = [{field: row.get(field) for field in ROW_FIELDS} for row in _latest_rows(_all_rows(output))]
    rows.sort(key=lambda row: (row["index"] if row["index"] is not None else -1, row["id"]))
    tmp = output.with_name(output.name + ".tmp")
    if fmt == "jsonl":
        with tmp.open("wb") as handle:
            for row in rows:
                handle.write(encode_row(row))
            handle.flush()
            os.fsync(handle.fileno())
    else:
        _write_parquet(rows, tmp)
    os.replace(tmp, output)
    if folder.is_dir():
        shutil.rmtree(folder)
    logger.info("merged %d rows into %s", len(rows), output)
    return len(rows)


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
                        ("image", pa.string()), ("score", pa.float32()), ("error", pa.string()),
                        ("model", pa.string())])
    def text(value: Any) -> Any:  # Parquet strings are UTF-8: a lone surrogate becomes its \\udcXX escape
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value

    table = pa.Table.from_pydict({field: [text(row.get(field)) for row in rows] for field in ROW_FIELDS},
                                 schema=schema)
    pq.write_table(table, path)


def settings_path(output: str | os.PathLike) -> Path:
    """``OUT.run.json``: the scorer and settings that ``output``'s scores were made with."""
    return Path(f"{os.fspath(output)}.run.json")


def check_run_settings(output: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """Compare ``settings`` (``{"scorer": identity, ...}``) with those recorded for ``output``: True when they
    are recorded and equal, False when none are recorded; different ones raise :class:`InvalidInputError`
    naming each setting that changed (resuming would put two scorers' scores in one file)."""
    from ..identity import identity_change

    path = settings_path(output)
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{path}: unreadable ({err}); delete it, or pass --overwrite to start over") from err
    changed = []
    for key in sorted(settings.keys() | recorded.keys()):
        then, now = recorded.get(key), settings.get(key)
        if then == now:
            continue
        if key == "scorer" and isinstance(then, str) and isinstance(now, str):
            changed.append(f"the scorer: {identity_change(then, now)}")
        else:
            changed.append(f"{key}: {then!r} then, {now!r} now")
    if changed:
        raise InvalidInputError(f"{os.fspath(output)!r} holds scores made with other settings, so it cannot be "
                                f"resumed: {'; '.join(changed)}. Choose another output or pass --overwrite to "
                                "start over")
    return True


def write_run_settings(output: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record ``settings`` for ``output`` (atomically)."""
    path = settings_path(output)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, ensure_ascii=False), encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)


def remove_outputs(output: str | os.PathLike) -> None:
    """Delete ``output``, its journals, its recorded settings and any leftover temporary file (``--overwrite``)."""
    output = Path(output)
    for path in (output, output.with_name(output.name + ".tmp"), settings_path(output)):
        if path.exists():
            path.unlink()
    if parts_dir(output).is_dir():
        shutil.rmtree(parts_dir(output))
