"""`make lock`: move lorakit/lock.txt forward on purpose.

Installs the newest versions that pyproject.toml allows into a throwaway venv (scripts/install.sh with
LORAKIT_UNLOCKED=1, so torch's CPU/CUDA choice is the same as `make install`'s), runs the whole suite there
against that candidate lock, and rewrites lorakit/lock.txt only if every test passed; then prints what changed
(package: old -> new). When a test fails the lock is left as it is and the failing tests are named (exit 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "lorakit" / "lock.txt"
HEADER = """lorakit's lock: the exact versions the whole test suite passed with ({python}, {platform}, CPU torch).
`make install` (so `make test`, `make demo` and CI) installs with `pip install -c lorakit/lock.txt`;
`make lock` (scripts/lock.py) rewrites this file after the suite passes with the newest allowed versions.
torch's CUDA runtime packages (nvidia-*, triton) are left to torch on GPU machines."""


def freeze(out: Path) -> None:
    """Run inside the candidate venv: write its dependency closure as a lock."""
    import platform

    from lorakit.versions import installed_closure, render_lock

    header = HEADER.format(python=f"Python {platform.python_version()}", platform=f"{platform.system()} {platform.machine()}")
    out.write_text(render_lock(installed_closure(), header))


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"  {name}: {a or '(new)'} -> {b or '(removed)'}")
    return lines


def failing_tests(junit: Path) -> list[str]:
    if not junit.exists():
        return ["(pytest wrote no report: see its output above)"]
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freeze", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the throwaway venv (its path is printed)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (default: the whole suite)")
    args = parser.parse_args()
    if args.freeze:
        freeze(args.freeze)
        return 0

    sys.path.insert(0, str(ROOT))
    from lorakit.versions import read_lock

    work = Path(tempfile.mkdtemp(prefix="lorakit-lock-"))
    venv, candidate, junit = work / "venv", work / "lock.txt", work / "junit.xml"
    started = time.time()
    try:
        print(f"make lock: newest allowed versions into {venv}", flush=True)
        env = dict(os.environ, LORAKIT_UNLOCKED="1")
        subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), str(venv), sys.executable], check=True, env=env)
        python = str(venv / "bin" / "python")
        subprocess.run([python, __file__, "--freeze", str(candidate)], check=True, cwd=ROOT)
        old, new = read_lock(LOCK), read_lock(candidate)
        changes = diff(old, new)
        print(f"make lock: candidate differs from lorakit/lock.txt in {len(changes)} package(s)", flush=True)
        print("\n".join(changes), flush=True)
        test = subprocess.run([python, "-m", "pytest", "-q", f"--junitxml={junit}", *args.pytest_args], cwd=ROOT,
                              env=dict(os.environ, LORAKIT_LOCK=str(candidate)))
        minutes = (time.time() - started) / 60
        if test.returncode != 0:
            failed = failing_tests(junit)
            print(f"make lock: the suite failed with the newest versions ({minutes:.1f} min); lorakit/lock.txt is "
                  f"unchanged. Failing tests ({len(failed)}):")
            print("\n".join(f"  {t}" for t in failed))
            return 1
        if not changes:
            print(f"make lock: the suite passed ({minutes:.1f} min); lorakit/lock.txt is already the newest")
            return 0
        shutil.copyfile(candidate, LOCK)
        print(f"make lock: the suite passed ({minutes:.1f} min); lorakit/lock.txt rewritten:")
        print("\n".join(changes))
        print("then `make install` brings .venv to the new lock")
        return 0
    finally:
        if args.keep:
            print(f"make lock: throwaway venv kept at {venv}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
