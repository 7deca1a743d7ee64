"""The one reader of users' text files (tables, JSON / JSONL, TXT prompt lists, ``test.json``, YAML configs).

``encoding=None`` reads UTF-8 and honours a byte-order mark: UTF-8 with BOM (Excel's "CSV UTF-8"),
UTF-16 and UTF-32 (Excel's "Unicode text"). Any other encoding is named explicitly (``encoding="gbk"``,
``--encoding gbk`` on the command line). A file that does not decode raises :class:`TextDecodeError`
naming the file, the byte offset and the encoding tried, instead of a bare ``UnicodeDecodeError``.

>>> read_text("prompts.csv")                    # doctest: +SKIP
'prompt,image\\n...'
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

__all__ = ["TextDecodeError", "read_text", "read_json", "decode_text", "check_encoding"]

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


class TextDecodeError(InvalidInputError):
    """A text file that is not in the expected encoding (names the file, byte offset and encoding)."""


def check_encoding(encoding: str | None, name: str = "encoding") -> str | None:
    """``None`` or a codec name Python knows; anything else raises :class:`InvalidInputError`."""
    if encoding is None:
        return None
    if not isinstance(encoding, str):
        raise InvalidInputError(f"{name} must be a codec name such as 'utf-8' or 'gbk', got {type(encoding).__name__}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InvalidInputError(f"{name}={encoding!r} is not a known text encoding (e.g. utf-8, gbk, latin-1)") from None
    return encoding


def decode_text(data: bytes, where: str, encoding: str | None = None) -> str:
    """Decode ``data`` read from ``where`` (see the module docstring for ``encoding``)."""
    check_encoding(encoding)
    if encoding is None:
        encoding = next((codec for bom, codec in _BOMS if data.startswith(bom)), "utf-8")
    elif codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # a BOM is never part of the text
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        shown = data[err.start : err.start + 4].hex(" ")
        raise TextDecodeError(
            f"{where}: cannot decode byte(s) {shown} at byte offset {err.start} as {encoding.removesuffix('-sig')} "
            "(save the file as UTF-8, or name its encoding, e.g. --encoding gbk / encoding='gbk')") from err


def read_text(path: str | os.PathLike, *, encoding: str | None = None, what: str = "file") -> str:
    """The text of a regular file. Raises :class:`InvalidInputError` (missing, a folder, a FIFO or device:
    reading one would block) or :class:`TextDecodeError`."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise InvalidInputError(f"{what} {str(path)!r} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidInputError(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from err
    return decode_text(data, f"{what} {str(path)!r}", encoding)


def read_json(path: str | os.PathLike, *, encoding: str | None = None, what: str = "file") -> Any:
    """Parse a JSON file read by :func:`read_text`; malformed JSON raises :class:`InvalidInputError` with the
    line and column."""
    text = read_text(path, encoding=encoding, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{what} {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} "
                                f"column {err.colno}") from err
