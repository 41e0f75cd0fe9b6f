"""The strict JSON Lines reader: every problem is a :class:`~sstoken.errors.DataError` naming ``path:line``."""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sstoken.errors import ConfigError, DataError

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Default limit on one JSONL line, in bytes, newline excluded (16 MiB)."""


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _BadConstant(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


def with_article(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# Compressed JSON Lines are read by the same strict reader, through the standard library's decompressors.
_DECOMPRESSING_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def read_jsonl(path: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES,
               stream: BinaryIO | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-blank line of a JSONL file (line numbers are 1-based).

    The file (or its ``.gz``/``.bz2``/``.xz`` compression) is read in binary, line by line, and never more than ``max_line_bytes + 2`` bytes at a time,
    so a huge line costs no more memory than the limit. Each line is decoded as UTF-8 on its own; a UTF-8
    byte order mark at the start of line 1 is accepted and dropped. Lines holding only JSON whitespace are
    skipped. NaN/Infinity, duplicate keys in one object and top-level values other than objects are
    rejected. Every problem raises :class:`DataError` with a message starting ``"{path}:{line}: "``.

    ``stream``: an open binary file to read, from where it stands, instead of opening ``path`` (which then only
    names it, and its suffix the compression): a pipe, which can be opened and read only once. It is not closed.
    """
    where = os.fspath(path)
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
    opener = _DECOMPRESSING_OPENERS.get(Path(where).suffix.lower(), open)
    try:
        if stream is None:
            handle = opener(path, "rb")  # noqa: SIM115 - closed by the with below
        else:  # the decompressors take a file object, and leave it open when they close
            handle = contextlib.nullcontext(stream) if opener is open else opener(stream, "rb")
    except OSError as exc:
        raise DataError(f"{where}: cannot open the file: {exc.strerror or exc}") from None
    with handle as handle:
        lineno = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 2)
            except (OSError, EOFError, lzma.LZMAError) as exc:  # EOFError, LZMAError: a cut or corrupt archive
                raise DataError(f"{where}:{lineno + 1}: cannot read the file: "
                                f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}") from None
            if not raw:
                return
            lineno += 1
            content = raw
            if content.endswith(b"\n"):
                content = content[:-1]
                if content.endswith(b"\r"):
                    content = content[:-1]
            if len(content) > max_line_bytes:
                raise DataError(
                    f"{where}:{lineno}: line longer than {max_line_bytes} bytes (max_line_bytes); "
                    "one JSONL line must hold one row"
                )
            if lineno == 1 and content.startswith(codecs.BOM_UTF8):
                content = content[len(codecs.BOM_UTF8) :]
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                hint = ""
                if lineno == 1 and content[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
                    hint = " (the file looks UTF-16 encoded; save it as UTF-8)"
                elif lineno == 1 and content.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
                    hint = (" (the data looks compressed: name the file .gz, .bz2 or .xz, or decompress it, "
                            "e.g. <(zcat rows.jsonl.gz))")
                raise DataError(
                    f"{where}:{lineno}: not valid UTF-8: byte 0x{content[exc.start]:02x} at byte offset "
                    f"{exc.start}{hint}"
                ) from None
            if not text.strip(" \t\r\n"):
                continue
            try:
                row = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
            except _DuplicateKey as exc:
                raise DataError(
                    f"{where}:{lineno}: {field_name(exc.key)}: duplicate key in one JSON object "
                    "(which value is meant is ambiguous)"
                ) from None
            except _BadConstant as exc:
                raise DataError(f"{where}:{lineno}: invalid JSON: {exc.name} is not a JSON value") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}:{lineno}: invalid JSON: nested too deeply") from None
            except ValueError as exc:  # e.g. an integer with more digits than Python converts
                reason = "a number has too many digits" if "digits" in str(exc) else str(exc)
                raise DataError(f"{where}:{lineno}: invalid JSON: {reason}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{lineno}: expected one JSON object per line, got {json_type(row)}")
            yield lineno, row


def field_name(key: Any) -> str:
    key = str(key)
    return key if key.isidentifier() else repr(key)
