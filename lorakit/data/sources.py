"""Reading rows from data sources: local JSON Lines / JSON / CSV / Parquet files, `save_to_disk`
directories and hub dataset ids (the last three through `datasets`).

Every row carries where it came from (``file:line``), so a bad row is reported by its place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorakit import text
from lorakit.errors import DataError, first_line
from lorakit.paths import DATA_SUFFIXES, data_suffix, is_local

SKIP_HINT = "fix the row or set data.skip_bad_rows: true to skip such rows"


class BadRowError(DataError):
    """One malformed row (exit 3); ``data.skip_bad_rows`` turns it into a counted skip."""

    def __init__(self, reason: str):
        self.reason = reason  # "file:line: what is wrong", without the remedy
        super().__init__(f"{reason}; {SKIP_HINT}")

    def __reduce__(self):  # back from a tokenizing process with its reason, not its message
        return type(self), (self.reason,)


@dataclass(slots=True)  # no __dict__ per row: rows are held by the million while they are tokenized
class Row:
    where: str  # "file:line" (or "file[row i]" where lines do not exist)
    data: dict


@dataclass
class SourceRows:
    rows: list[Row]
    bad: list[str]  # why each row skipped while reading was skipped


def check_exists(source: str) -> Path:
    """The source's path; exit 3 when it names a data file that is not there, or a file or directory this process
    may not read (or reach: a folder above it closed to this user)."""
    path = Path(source).expanduser()
    try:  # opened here, so a permission problem is this line and not a failure in the middle of reading
        if any(c in source for c in "*?") and not path.exists():
            raise DataError(_a_pattern(source))
        if data_suffix(path) in DATA_SUFFIXES and not path.is_file():
            why = "" if path.is_absolute() else "; relative paths are read from the current directory, not the recipe's"
            raise DataError(f"data: file {source!r} not found at {path.absolute()}{why}")
        if path.is_file():
            path.open("rb").close()
        elif path.is_dir():
            with os.scandir(path) as entries:
                next(entries, None)
    except OSError as e:
        raise DataError(f"data: cannot read {source!r} ({e.strerror}); give this user read permission "
                        f"(chmod {'-R a+rX' if os.path.isdir(path) else 'a+r'} {path}, and a+x on the folders above it) or "
                        "copy the data somewhere it can read") from None
    return path


def _a_pattern(source: str) -> str:
    """The message for a glob pattern given as a source: lorakit reads named files, so that no file joins a run
    unseen (and the cache key and resume checks name each one)."""
    import glob

    found = sorted(glob.glob(str(Path(source).expanduser())))
    listed = (f"; it matches {', '.join(found[:3])}{f', ... ({len(found)} files)' if len(found) > 3 else ''}"
              if found else "; it matches no file")
    return f"data: {source!r} is a pattern; lorakit reads the files it is given, not patterns: list them in data.train " \
        f"(it takes a list){listed}"


def read_rows(source: str, skip_bad_rows: bool = False, split: str = "train", subset: str | None = None) -> SourceRows:
    """The rows of one data source. Malformed rows raise BadRowError unless skip_bad_rows. ``split`` and ``subset``
    (data.split, data.subset) choose what a hub dataset id gives."""
    path = check_exists(source)
    if data_suffix(path) == ".jsonl":
        return _read_jsonl(path, skip_bad_rows)
    if data_suffix(path) == ".json":
        return _read_json(path, skip_bad_rows)
    if data_suffix(path) in (".csv", ".parquet") or path.is_dir():
        return _read_with_datasets(source, path, skip_bad_rows)
    if is_local(source):
        raise DataError(
            f"data: {source!r} is neither a .jsonl/.json/.csv/.parquet file, a save_to_disk directory, "
            "nor a hub dataset id (owner/name, or a canonical name such as imdb)"
        )
    return _read_hub(source, split, subset)


def _read_hub(source: str, split: str, subset: str | None) -> SourceRows:
    """A hub dataset id through datasets.load_dataset (its own download cache; HF_DATASETS_OFFLINE=1 reads only
    that cache)."""
    import datasets

    from lorakit.console import adopt_datasets_output

    adopt_datasets_output()  # its stderr handler and progress bars, as lorakit shows them

    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except Exception as e:  # datasets raises many types for unreachable ids, unknown splits and subsets
        offline = getattr(datasets.config, "HF_DATASETS_OFFLINE", False) or getattr(datasets.config, "HF_HUB_OFFLINE", False)
        offline = " (offline: only datasets already downloaded can be read)" if offline else ""
        raise DataError(f"data: cannot load hub dataset {source!r} (split {split!r}"
                        f"{f', subset {subset!r}' if subset else ''}){offline}: {type(e).__name__}: {first_line(e)}; "
                        "check the id, data.split and data.subset, or give a local file") from None
    return SourceRows([Row(f"{source}[row {i}]", row) for i, row in enumerate(ds)], [])


JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array"}  # a row's kinds in JSON's words: the file says null, not NoneType


def as_json(value, limit: int = 40) -> str:
    """``value`` as the data file writes it (null, 5, [...]), cut to ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_object(value, where: str, bad: list[str], skip: bool) -> bool:
    if isinstance(value, dict):
        return True
    kind = JSON_KINDS.get(type(value), type(value).__name__)
    shown = "" if value is None else f" ({as_json(value, 30)})"
    message = f"{where}: expected a JSON object, got {kind}{shown}"
    if not skip:
        raise BadRowError(message)
    bad.append(message)
    return False


def iter_rows(source: str, skip_bad_rows: bool = False, split: str = "train", subset: str | None = None,
              lazy: bool = False):
    """The rows of one source as they are read (a Row, or the message of a skipped bad row): a .jsonl file is
    read line by line, so its rows need not all be in memory at once; other sources are read whole. ``lazy``: a
    .jsonl file's rows as JsonLine, parsed when their data is first read (by the process tokenizing them)."""
    path = Path(source).expanduser()
    if data_suffix(path) == ".jsonl" and path.is_file():
        yield from jsonl_rows(path, skip_bad_rows, lazy)
        return
    got = read_rows(source, skip_bad_rows, split, subset)
    yield from got.bad
    yield from got.rows


def _read_jsonl(path: Path, skip: bool) -> SourceRows:
    rows, bad = [], []
    for item in jsonl_rows(path, skip):
        (rows if isinstance(item, Row) else bad).append(item)
    return SourceRows(rows, bad)


def jsonl_rows(path: Path, skip: bool = False, lazy: bool = False):
    """The rows of a JSON Lines file as they are read (whatever its name): a bad line raises BadRowError, or with
    ``skip`` is yielded as its reason; ``lazy``: rows as JsonLine, parsed where they are tokenized. `lorakit
    generate` reads its prompt files here too, so a bad line gets the same message there as in training data."""
    with path.open("rb") as f:
        try:
            text.sniff(f.read(8), str(path))  # compressed or UTF-16: no line of it is a row
        except text.NotText as e:
            raise DataError(str(e)) from None
        f.seek(0)
        if f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":  # each line a fragment of one array
            raise DataError(f"{path}: holds a JSON array, not one JSON object per line; name it .json, or write one "
                            "object per line")
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if lazy and raw.lstrip()[:1] == b"{":  # an object's first byte: neither blank nor a byte-order mark
                yield JsonLine(where, raw, lineno)
                continue
            try:
                value = _line_data(raw, where, lineno)
            except BadRowError as e:
                if not skip:
                    raise
                yield e.reason
                continue
            if value is not None:
                yield Row(where, value)


def _line_data(raw: bytes, where: str, lineno: int) -> dict | None:
    """One JSON Lines row as its object (None for a blank line); BadRowError saying why it is not one."""
    try:
        line = text.decode(raw, where, lineno)
    except text.NotText as e:
        raise BadRowError(str(e)) from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRowError(f"{where}: invalid JSON ({_json_problem(e)})") from None
    except RecursionError:
        raise BadRowError(f"{where}: nested too deeply to be a data row") from None
    _check_object(value, where, [], skip=False)  # not an object: raises
    return value


class JsonLine:
    """A .jsonl row kept as its bytes until its fields are read: a tokenizing worker parses it, not the process
    reading a large file for many workers. ``data`` parses it once; a malformed line raises the BadRowError that
    reading it eagerly would have (data.skip_bad_rows counts it as the tokenizer's bad rows are counted)."""

    __slots__ = ("where", "raw", "lineno", "_data")

    def __init__(self, where: str, raw: bytes, lineno: int):
        self.where, self.raw, self.lineno, self._data = where, raw, lineno, None

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = _line_data(self.raw, self.where, self.lineno)  # not None: the line starts with {
        return self._data


def _read_json(path: Path, skip: bool) -> SourceRows:
    """A JSON array of objects (or {"name": [...]}); each item is located by the line it starts on."""
    try:
        content = text.decode(path.read_bytes(), str(path))
    except text.NotText as e:
        raise DataError(str(e)) from None
    if not content.strip():  # as an empty .jsonl file: the empty-source checks name it
        return SourceRows([], [])
    try:
        items = _array_items(content) if content.lstrip().startswith("[") else None
        if items is None:
            data = json.loads(content)
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} style
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of objects (or use .jsonl, one object per line)")
            items = [(None, i, item) for i, item in enumerate(data)]
    except json.JSONDecodeError as e:
        hint = "; if it holds one object per line, name it .jsonl" if e.msg == "Extra data" else ""
        if e.msg == "Expecting value" and e.doc[e.pos:].lstrip()[:1] in ("]", "}"):
            hint = "; JSON allows no comma after the last item: remove it"
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({_json_problem(e)}){hint}") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be data rows") from None
    rows, bad = [], []
    for line, index, item in items:
        where = f"{path}:{line}" if line is not None else f"{path}[item {index}]"
        if _check_object(item, where, bad, skip):
            rows.append(Row(where, item))
    return SourceRows(rows, bad)


def _json_problem(e: json.JSONDecodeError) -> str:
    """json's message and column: some messages end in "at" ("Unterminated string starting at"), made to read
    "... starting at column 9", not "... at at column 9"."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _array_items(source: str) -> list[tuple[int, int, object]]:
    """(line, index, value) of each item of a top-level JSON array, so errors can name the line."""
    decoder, ws = json.JSONDecoder(), " \t\r\n"
    pos, items = source.index("[") + 1, []
    while True:
        while pos < len(source) and source[pos] in ws:
            pos += 1
        if pos < len(source) and source[pos] == "]" and not items:
            break
        value, end = decoder.raw_decode(source, pos)
        items.append((source.count("\n", 0, pos) + 1, len(items), value))
        pos = end
        while pos < len(source) and source[pos] in ws:
            pos += 1
        if pos < len(source) and source[pos] == ",":
            pos += 1
        elif pos < len(source) and source[pos] == "]":
            break
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", source, pos)
    if source[pos + 1 :].strip():
        raise json.JSONDecodeError("Extra data", source, pos + 1)
    return items


def _check_parquet(path: Path) -> None:
    """A Parquet file starts and ends with PAR1: checked here, as datasets would log its own error line first."""
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"{path}: not a Parquet file (no PAR1 marker at its start and end): damaged, or another "
                        "format under a .parquet name")


def _not_a_saved_dataset(source: str, path: Path) -> str:
    files = sorted(str(Path(source) / p.name) for p in path.iterdir()
                   if data_suffix(p) in DATA_SUFFIXES and p.is_file())
    if not files:
        return (f"data: {source!r} is a directory but not a datasets.save_to_disk folder, and holds no "
                f"{'/'.join(DATA_SUFFIXES)} file; name the data file itself")
    more = f", ... ({len(files)} files)" if len(files) > 3 else ""
    return (f"data: {source!r} is a directory but not a datasets.save_to_disk folder; name its data files "
            f"instead: {', '.join(files[:3])}{more} (data.train takes a list)")


def _csv_records(path: Path) -> tuple[list[str], list[int]]:
    """A CSV file's header and the line each record below it starts on (blank lines skipped, as pandas does); exit 3
    naming the line of a record with more or fewer cells than the header, which pandas would shift into the wrong
    columns (one cell more: the first taken as the row's index)."""
    import csv

    with path.open(encoding="utf-8-sig", newline="") as f:
        reader, starts, end = csv.reader(f, strict=True), [], 0  # end: the last line read
        try:
            header, end = next(reader, None) or [], reader.line_num
            for record in reader:
                _check_record(path, header, record, end + 1, starts)
                end = reader.line_num
        except csv.Error as e:  # strict: an unterminated quote, text after a closing quote
            raise DataError(f"{path}:{end + 1}: not valid CSV ({e}); a quoted cell ends with a quote and then a comma or "
                            'the line\'s end, and a quote inside it is written twice ("say ""hi""")') from None
    return header, starts


def _check_record(path: Path, header: list[str], record: list[str], start: int, starts: list[int]) -> None:
    if not record or (len(record) == 1 and not record[0].strip()):
        return  # a blank line
    if len(record) != len(header):
        fix = ("quote a cell holding a comma (\"a, b\")" if len(record) > len(header) else
               "give every column a cell (an empty one as ,,)")
        raise DataError(f"{path}:{start}: {len(record)} cells where the header has {len(header)} "
                        f"({', '.join(header)}); {fix}")
    starts.append(start)


def _read_with_datasets(source: str, path: Path, skip: bool) -> SourceRows:
    import datasets

    from lorakit.console import adopt_datasets_output, datasets_held_back

    adopt_datasets_output()  # its stderr handler and progress bars, as lorakit shows them

    if data_suffix(path) == ".parquet":
        _check_parquet(path)
    options = {}
    if data_suffix(path) == ".csv":  # UTF-16, gzip, Latin-1: named here with the line, before datasets logs its own error
        with path.open("rb") as f:
            try:
                for lineno, raw in enumerate(f, 1):
                    text.decode(raw, str(path), lineno)
            except text.NotText as e:
                raise DataError(str(e)) from None
        columns, starts = _csv_records(path)
        if not starts:  # nothing, or a header alone: the empty-source checks name it
            return SourceRows([], [])
        # Every cell as the text it is: pandas would read an answer "3" as a number and "NA", "None" or "null" as a
        # missing value, so a numeric answer was refused and such a word silently became an empty field.
        options = {"features": datasets.Features({c: datasets.Value("string") for c in columns}), "na_filter": False}

    try:
        with datasets_held_back():  # a parse error is lorakit's one line below, not datasets' bar and log first
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(data_suffix(path)[1:], data_files=str(path), split="train", **options)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"data: {source!r} holds splits {', '.join(ds)} but no 'train' split")
            ds = ds["train"]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreachable ids and unreadable files
        if path.is_dir() and isinstance(e, FileNotFoundError):  # load_from_disk found none of its own files
            raise DataError(_not_a_saved_dataset(source, path)) from None
        # DatasetGenerationError says only "An error occurred while generating the dataset"; its cause says what
        why = e.__cause__ if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None else e
        raise DataError(f"data: cannot load {source!r}: {type(why).__name__}: {first_line(why)}") from None
    if data_suffix(path) == ".csv" and len(ds) == len(starts):  # each row at the line it starts on
        return SourceRows([Row(f"{source}:{line}", row) for line, row in zip(starts, ds)], [])
    return SourceRows([Row(f"{source}[row {i}]", row) for i, row in enumerate(ds)], [])


def content_hash(source: str) -> str | None:
    """sha256 of a local file's or directory's bytes; None for a hub id (its content is not known here).

    For a file it is the plain sha256 of its bytes (what `sha256sum` prints; run.json records it).
    """
    import hashlib

    path = Path(source).expanduser()
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:  # a directory: each file's relative path is part of the content
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
