"""Guarded outputs: the one way lorakit decides where it may write a directory (a run, a merged model, an export).

Every output is checked before anything heavy loads: the path must be writable, and it must neither be, contain
nor lie inside any input (symlinks resolved), so no output can swallow the base model, the adapter, the data or a
run. Every directory lorakit creates carries a MARKER file; ``--overwrite`` replaces only a directory holding
one, and moves it aside (DIR.replaced-TIMESTAMP) rather than deleting it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping

from lorakit.atomic import fsync_dir, publish_file
from lorakit.errors import SafetyError, UsageError

MARKER = ".lorakit-output"  # JSON {kind, version, created} in every output directory lorakit creates


def write_marker(folder: Path, kind: str) -> None:
    from lorakit import __version__

    record = {"kind": kind, "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / MARKER).write_text(json.dumps(record) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker's record, or None when ``folder`` is not an output lorakit wrote."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "kind" in record else None


def _writable_path(option: str, value: str | Path, what: str) -> Path:
    """``value`` with symlinks resolved; exit 2 for an empty path, a dangling symlink (writing would create its
    target elsewhere) and a path under a file. ``what``: "directory" or "file", for the messages."""
    text = str(value)
    if not text.strip():
        raise UsageError(f"{option}: the path is empty; name a {what}")
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option} {text}: a dangling symbolic link (to {os.readlink(path)}); remove the link or "
                         f"choose another {what}")
    out = Path(os.path.realpath(path))
    existing = next(p for p in (out, *out.parents) if p.exists())
    if existing != out and not existing.is_dir():
        raise UsageError(f"{option} {text}: {existing} is a file, so nothing can be created under it; choose "
                         f"another {what}")
    return out


def resolve_output(option: str, value: str | Path) -> Path:
    """An output directory's path, symlinks resolved; exit 2 where none can ever be written (_writable_path), or
    for the current directory or one above it (it holds the user's files)."""
    out = _writable_path(option, value, "directory")
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise UsageError(f"{option} {value}: that is the current directory (or one above it), which holds your "
                         f"files; choose a new subdirectory, e.g. {option} runs/NAME")
    return out


def check_file_output(option: str, value: str | Path, example: str) -> Path:
    """An output file's path (init, plot, schema, eval, export); exit 2 unless a file can be written there: see
    _writable_path, and not a directory, in a writable directory. ``example``: a file name the message suggests."""
    out = _writable_path(option, value, "file")
    if out.is_dir():
        raise UsageError(f"{option} {value}: a directory; name a file, e.g. {out / example}")
    check_writable(option, out.parent)
    return out


def check_inputs_apart(option: str, out: Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse (exit 5) an output that is, contains or lies inside an input: writing or replacing it could destroy
    that input. ``inputs``: {what it is: path}; paths that do not exist locally (hub ids) are skipped."""
    for what, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        source = Path(os.path.realpath(value))
        if source == out:
            relation = "is"
        elif out in source.parents:
            relation = "contains"
        elif source in out.parents:
            relation = "lies inside"
        else:
            continue
        raise SafetyError(f"{option} {out} {relation} the {what} {source}; writing there could destroy it, so "
                          "choose an output directory apart from every input")


def check_writable(option: str, out: Path) -> None:
    """Exit 2 unless a directory can be created at (or written into) ``out``: tried with a probe file, as
    permission bits do not tell (root, read-only mounts, ACLs)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return  # the output itself is a file: the caller's overwrite rule decides
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorakit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {out}: cannot write in {existing} ({e.strerror or e}); choose a writable "
                         "directory") from None


def check_output(option: str, value: str | Path, inputs: Mapping[str, str | Path | None]) -> Path:
    """Everything decidable before work starts: the resolved output path, apart from every input, writable."""
    out = resolve_output(option, value)
    check_inputs_apart(option, out, inputs)
    check_writable(option, out)
    return out


def check_replaceable(option: str, out: Path, overwrite: bool, what: str, also: str = "",
                      elsewhere: str = "choose another directory") -> None:
    """A non-empty ``out`` is replaced only with ``overwrite`` and only when lorakit wrote it (its MARKER).
    Call under the output's lock (lorakit.runlock), so two processes cannot both find it free. ``also``: other
    ways out the message offers for a lorakit output (train: "continue it with --resume, ")."""
    if out.exists() and not out.is_dir():
        raise SafetyError(f"{option} {out} is a file; {elsewhere}")
    # A marker alone is a run that stopped before writing anything (a tracker that could not start): nothing to keep.
    if not (out.is_dir() and any(p.name != MARKER for p in out.iterdir())):
        return
    record = read_marker(out)
    if record is None:
        refused = " --overwrite only replaces what lorakit wrote;" if overwrite else ""
        raise SafetyError(f"{option} {out} holds files lorakit did not write (no {MARKER} marker: not a lorakit "
                          f"{what});{refused} {elsewhere}")
    if not overwrite:
        raise SafetyError(f"{option} {out} is not empty (it holds a lorakit {record['kind']} from "
                          f"{record.get('created', 'earlier')}); {also}replace it with --overwrite (the old one is "
                          f"moved aside, not deleted), or {elsewhere}")


def set_aside(out: Path) -> Path:
    """Move ``out`` to OUT.replaced-YYYYmmdd-HHMMSS next to it (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.replaced-{stamp}"), 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.replaced-{stamp}-{n}"), n + 1
    out.rename(aside)
    return aside


def publish_output(tmp: Path, out: Path, kind: str) -> Path | None:
    """Mark the finished ``tmp`` as lorakit's and rename it to ``out``, the old ``out`` (checked replaceable)
    set aside first; returns where the old one went, if anywhere. A crash in between leaves both complete."""
    write_marker(tmp, kind)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory holds nothing to keep
    aside = set_aside(out) if out.exists() else None
    tmp.rename(out)
    fsync_dir(out.parent)
    return aside


def publish_file_output(tmp: Path, out: Path) -> Path | None:
    """Rename the finished file ``tmp`` onto ``out`` atomically; an existing ``out`` (the caller checked that
    --overwrite was given) is set aside first, never replaced in place. Returns where the old one went."""
    aside = set_aside(out) if out.exists() else None
    publish_file(tmp, out)
    return aside
