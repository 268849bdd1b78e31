"""Bytes a user gave lorakit as text (a recipe, a data file, a prompt file): UTF-8, or a one-line reason why not.

Other encodings and compressed files are named for what they are, with the fix, instead of a UnicodeDecodeError.
"""

from __future__ import annotations

import json
from pathlib import Path


class NotText(ValueError):
    """Why the bytes are not UTF-8 text; ``line`` (1-based) where that is known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def sniff(head: bytes, what: str) -> None:
    """NotText when the first bytes show a compressed file or UTF-16/32 text."""
    if head.startswith(b"\x1f\x8b"):
        raise NotText(f"{what} is gzip-compressed, not text; decompress it (gunzip) first", 1)
    if head.startswith((b"PK\x03\x04", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
        raise NotText(f"{what} is a compressed archive, not text; extract it first", 1)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise NotText(f"{what} is UTF-16 or UTF-32 text; save it as UTF-8", 1)


def decode(data: bytes, what: str, first_line: int = 1) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped); NotText naming the line of the first bad byte."""
    if first_line == 1:
        sniff(data[:8], what)
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        raise NotText(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8 "
                      "(e.g. iconv -f latin1 -t utf-8)", line) from None


class NotJsonObject(ValueError):
    """Why a file is not a JSON object: its text is the one-line reason."""


def read_json_object(path: Path) -> dict:
    """The JSON object ``path`` holds, read once; NotJsonObject with the reason when it holds none."""
    try:
        value = json.loads(decode(path.read_bytes(), str(path)))
    except NotText as e:
        raise NotJsonObject(str(e)) from None
    except (ValueError, RecursionError) as e:
        raise NotJsonObject(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise NotJsonObject(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def json_object_problem(path: Path) -> str | None:
    """Why ``path`` is not a JSON object, or None."""
    try:
        read_json_object(path)
    except NotJsonObject as e:
        return str(e)
    return None
