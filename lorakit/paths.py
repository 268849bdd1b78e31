"""Where lorakit keeps files of its own, and the one rule that tells a local path from a hub id."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lorakit.errors import UsageError


def cache_dir() -> Path:
    path = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"LORAKIT_CACHE={path}: {blocked} is a file, not a directory; point LORAKIT_CACHE at a "
                         "directory (or unset it for ~/.cache/lorakit)")
    return path


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # data files lorakit reads; never a hub dataset id


def data_suffix(name: str | Path) -> str:
    """The suffix a data file's format is read from, in lower case: train.JSONL is a .jsonl file, x.CSV a .csv one."""
    return Path(name).suffix.lower()


def is_gguf(name: str | Path) -> bool:
    """A GGUF model file by its name, in any case: Model.GGUF is one, as model.gguf is."""
    return Path(name).suffix.lower() == ".gguf"


def is_hub_dataset(name: str) -> bool:
    """A data source read from the hub (data.split and data.subset choose what it gives), not a local file or
    save_to_disk folder."""
    return data_suffix(name) not in DATA_SUFFIXES and not is_local(name)


def is_local(name: str) -> bool:
    """The one rule for models, datasets and adapter bases: a name is a local path when it exists, starts with
    '.', '/' or '~', has more than one '/' or ends in .gguf (in any case); anything else is a hub id
    ('owner/name', or a canonical id without an owner such as 'gpt2' or 'imdb')."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or is_gguf(name)
            or Path(name).expanduser().exists())


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (from the environment, so a test's setenv counts too)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable(name: str, revision: str | None = None, filename: str = "config.json",
                    timeout: float = 3.0) -> str | None:
    """Why the hub id ``name`` cannot be fetched here, decided in seconds: None when ``filename`` of it is in the
    Hugging Face cache or the hub's endpoint answers an HTTP request (through the hub's own session and proxies);
    else "HF_HUB_OFFLINE is set" or "HOST is unreachable". Without this check huggingface_hub retries an
    unreachable hub for about a minute."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
            return None
    except ValueError:  # not a valid repo id: the hub's own message says how one is written
        return None
    if hub_offline():
        return "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if endpoint_answers(endpoint, timeout):
        return None
    return f"is not in the Hugging Face cache and the hub ({urlparse(endpoint).hostname}) is unreachable"


@functools.cache
def endpoint_answers(endpoint: str, timeout: float) -> bool:
    """Whether the hub's ``endpoint`` answers an HTTP request within ``timeout`` seconds, asked once per process:
    a run resolves its model, tokenizer and base one after another, and each would wait on the same answer."""
    import threading

    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        # Through huggingface_hub's own HTTP session, so a proxy the hub would use (HTTPS_PROXY, ...) is used here
        # too; any HTTP answer, even an error status, means the host is reachable.
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001  (httpx's connect, timeout and proxy errors alike: unreachable)
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a DNS lookup ignores socket timeouts: bound the wait
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


def require_hub(key: str, name: str, revision: str | None = None, filename: str = "config.json",
                remedy: str | None = None) -> None:
    """Exit 2 at once, naming ``key``, when the hub id ``name`` is neither cached nor reachable (hub_unreachable);
    the message ends in ``remedy``, by default: give a local directory, or download it where the hub answers."""
    reason = hub_unreachable(name, revision, filename)
    if reason is not None:
        owner = Path(name).parent
        if str(owner) != "." and owner.is_dir():  # 'runs/tiny-model' beside a runs/ folder: most likely a path
            raise UsageError(f"{key}: {name!r} is no local path ({owner}/ holds no {Path(name).name}) and, read as "
                             f"a hub id, {reason}; give an existing directory, or download it where the hub answers")
        remedy = remedy or "give a local directory, or download it where the hub answers"
        raise UsageError(f"{key}: {name!r} is a hub id that {reason}; {remedy}")


def run_around(path: str | Path, marker: str) -> Path | None:
    """The run directory ``path`` lies in, when ``path`` is one of its folders (RUN/adapter, RUN/merged,
    RUN/checkpoints/step-N) and that run holds ``marker`` (run.json, metrics.jsonl); else None."""
    path = Path(path)
    for run in (path.parent, path.parent.parent):
        if (run / marker).is_file() and (run / "recipe.yaml").is_file():
            return run
    return None
