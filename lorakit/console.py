"""Terminal output: one place decides what is printed (rank 0 only), in which mode, and draws progress.

Modes (the CLI's global options): normal (rich text and progress bars), ``--quiet`` (only errors and the
paths of what was written) and ``--json-logs`` (one JSON object per stdout line: messages, stages, metrics,
warnings, saved paths, errors). Warnings go to stderr: lorakit's own through ``warner``, those of
transformers/peft/bitsandbytes/accelerate/datasets through the logging handler below, each distinct one once.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

_console = None
_err_console = None
_mode = {"quiet": False, "json": False, "debug": False}

# Loggers whose records lorakit shows itself (de-duplicated); "py.warnings" carries the warnings module.
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "huggingface_hub", "kernels",
                   "py.warnings")
# Library warnings that tell a lorakit user nothing they can act on: shown only with --debug.
KNOWN_NOISE = (
    # bitsandbytes 0.50 on CPU: an optional faster kernel package is not installed (its own kernels run).
    re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # ... and the kernels package, offline (HF_HUB_OFFLINE=1), says it skipped checking that package's publisher.
    re.compile(r"Skipping publisher trust check for 'kernels-community/"),
    # PEFT before 0.22 (pyproject allows 0.17 on) reads model.is_gradient_checkpointing in get_peft_model, which
    # transformers 5 deprecated in favour of is_activation_checkpointing (PEFT 0.22 reads that first).
    re.compile(r"`is_gradient_checkpointing` is deprecated"),
    # torch 2.13 under FSDP1 saves (lorakit.distributed.fsdp): deprecation notes about the APIs it gathers with.
    re.compile(r"FSDP\.state_dict_type\(\) and FSDP\.set_state_dict_type\(\) are being deprecated"),
    re.compile(r"`_get_pg_default_device` will be deprecated|Multiple backends are registered with this ProcessGroup"),
)


def get_console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=False, highlight=False, soft_wrap=True)
    return _console


def get_err_console():
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err_console


def configure(*, quiet: bool = False, json_logs: bool = False, debug: bool = False) -> None:
    """Set this process's output mode and take over the libraries' warnings (cheap: imports no library)."""
    _mode.update(quiet=quiet, json=json_logs, debug=debug)
    _shown.clear()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _library_handler not in logger.handlers:
            logger.addHandler(_library_handler)
    # Library warnings repeat per call site or per step; "once" shows each distinct text one time.
    for category in (UserWarning, FutureWarning, RuntimeWarning):
        warnings.filterwarnings("once", category=category)
    logging.captureWarnings(True)


def debugging() -> bool:
    """Whether --debug is on (tracebacks for errors, every library warning)."""
    return _mode["debug"]


def adopt_transformers_output() -> None:
    """Once transformers is imported: library warnings go through lorakit only, their progress bars stay off.

    transformers, huggingface_hub and datasets each attach their own stderr handler on import; with lorakit's
    handler also attached every warning would print twice. Loading is shown as a lorakit stage, so the
    "Loading weights" tqdm bar would only interleave with it. Public logging switches only, no patching.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(_library_handler)
    _adopt_logger("huggingface_hub")
    if "datasets" in sys.modules:  # otherwise adopt_datasets_output runs where it is imported (0.6 s saved)
        adopt_datasets_output()


def adopt_datasets_output() -> None:
    """adopt_transformers_output for datasets, called once it is imported (only some data sources need it)."""
    import datasets

    _adopt_logger("datasets")
    if _mode["quiet"] or _mode["json"]:
        datasets.disable_progress_bars()


@contextmanager
def datasets_held_back():
    """datasets' progress bars and log lines off for the block: around a local file's load, whose failure lorakit
    reports in one line of its own (datasets would first draw its "Generating train split" bar and log the same
    error). The settings before the block come back after it."""
    import datasets
    from datasets.utils import are_progress_bars_disabled
    from datasets.utils import logging as datasets_logging

    bars, verbosity = not are_progress_bars_disabled(), datasets_logging.get_verbosity()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps them on, saying so in a warning
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    datasets_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _adopt_logger(name: str) -> None:
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:  # the library's default
        logger.removeHandler(handler)
    if _library_handler not in logger.handlers:
        logger.addHandler(_library_handler)


def is_quiet() -> bool:
    return _mode["quiet"]


def is_json() -> bool:
    return _mode["json"]


def emit(event: str, **fields) -> None:
    """One JSON object on one stdout line (--json-logs)."""
    record = {"event": event, "time": round(time.time(), 3), **fields}
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def console(enabled: bool, stderr: bool = False) -> Callable[[str], None]:
    """A print function that is silent off the main process and with --quiet. ``stderr``: text goes there, for a
    command whose stdout is its product (generate's completions)."""

    def say(message: str) -> None:
        if not enabled or _mode["quiet"]:
            return
        if _mode["json"]:
            emit("log", message=message)
        else:
            (get_err_console() if stderr else get_console()).print(message, markup=False)

    return say


def saved(enabled: bool) -> Callable[[str, object], None]:
    """Reports a written artifact ("adapter", DIR/adapter): shown in every mode, --quiet included."""

    def report(what: str, path) -> None:
        if not enabled:
            return
        if _mode["json"]:
            emit("saved", what=what, path=str(path))
        else:
            get_console().print(f"{what} saved to {path}", markup=False)

    return report


def warner(enabled: bool) -> Callable[[str], None]:
    """lorakit's own warnings: "warning: MESSAGE" on stderr, beside the libraries' "warning (PACKAGE): ..."
    (stdout stays the run's lines, or a command's product); a "warning" event from source "lorakit" with
    --json-logs. Silent off the main process and with --quiet; each distinct message once per command."""

    def warn(message: str) -> None:
        if enabled:
            _show_once(logging.WARNING, "lorakit", message)

    return warn


def show_metrics(record: dict, text: bool = True) -> None:
    """One metrics.jsonl record on the terminal (a line of text, or a JSON "metrics" event). ``text`` False: the
    JSON event only (a record a line of its own describes for people, as the efficiency line does)."""
    if _mode["quiet"]:
        return
    if _mode["json"]:
        emit("metrics", **record)
        return
    if text:
        get_console().print("  ".join(f"{k} {_number(v)}" for k, v in record.items()), markup=False)


def _number(value) -> str:
    """A metric as people read it: 4 significant digits, thousands separated rather than in e-notation."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_error(code: int, message: str) -> None:
    """The one error line on stderr; with --json-logs also an "error" event on stdout for scripts."""
    get_err_console().print(f"[bold red]error:[/] {message}", markup=True)
    if _mode["json"]:
        from rich.text import Text

        emit("error", exit_code=code, message=Text.from_markup(message).plain)


@contextmanager
def stage(enabled: bool, description: str):
    """A named setup stage (loading the model, tokenizing, merging): a spinner, then its duration."""
    start = time.perf_counter()
    if not enabled or _mode["quiet"]:
        yield
        return
    if _mode["json"]:
        emit("stage", name=description, status="start")
        yield
        emit("stage", name=description, status="done", seconds=round(time.perf_counter() - start, 3))
        return
    if get_console().is_terminal:
        with get_console().status(f"{description}..."):
            yield
    else:
        yield
    get_console().print(f"{description}: {time.perf_counter() - start:.1f}s", markup=False)


class _OnceHandler(logging.Handler):
    """The libraries' warnings and errors (logging records, and the warnings module's through "py.warnings"),
    each distinct one shown once by _show_once."""

    _WARNING_TEXT = re.compile(r"^(.*?):\d+: (\w+): (.*)$")
    _PACKAGE = re.compile(r"[/\\](?:site|dist)-packages[/\\]([^/\\]+)")

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            source, text = self.describe(record)
        except Exception:  # a malformed record must not break a run
            return
        _show_once(record.levelno, source, text)

    def describe(self, record: logging.LogRecord) -> tuple[str, str]:
        """(package, one-line text); a warnings-module record "path:line: Category: message" is shortened."""
        text = record.getMessage().strip()
        if record.name != "py.warnings":
            return record.name.split(".")[0], text
        match = self._WARNING_TEXT.match(text.splitlines()[0] if text else "")
        if not match:
            return "python", text
        path, category, message = match.groups()
        package = self._PACKAGE.search(path)
        return (package.group(1) if package else Path(path).stem), f"{category}: {message}"


_library_handler = _OnceHandler()
_shown: set[tuple[str, str]] = set()  # (source, text) of the warnings this command has shown


def _show_once(level: int, source: str, text: str) -> None:
    """A warning (or a library's error) in the current mode, once per distinct text; errors even with --quiet.
    lorakit's own read "warning: ...", a library's "warning (PACKAGE): ...": whose message it is."""
    if (source, text) in _shown or (_mode["quiet"] and level < logging.ERROR):
        return
    if level < logging.ERROR and not _mode["debug"] and any(n.search(text) for n in KNOWN_NOISE):
        return
    _shown.add((source, text))
    kind = "error" if level >= logging.ERROR else "warning"
    if _mode["json"]:
        emit(kind, source=source, message=text)
    else:
        get_err_console().print(f"{kind}: {text}" if source == "lorakit" else f"{kind} ({source}): {text}",
                                markup=False)


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task, self.start = progress, task, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, completed: int, *, loss: float, lr: float, tps: float) -> None:
        if self.progress is not None:
            info = f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
            self.progress.update(self.task, completed=completed, info=info)


@contextmanager
def progress_bar(enabled: bool, total: int):
    """Rich progress for the training steps: step, loss, lr, tokens/s, ETA (terminal, normal mode only)."""
    if not enabled or _mode["quiet"] or _mode["json"] or not get_console().is_terminal:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
        TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=get_console(), transient=False) as progress:
        yield _Bar(progress, progress.add_task("train", total=total, info=""))


@contextmanager
def work_progress(enabled: bool, total: int, description: str):
    """Rich progress over ``total`` bytes of work (export): yields advance(n); nothing off a terminal."""
    if not enabled or _mode["quiet"] or _mode["json"] or not get_console().is_terminal:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), DownloadColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=get_console(), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
