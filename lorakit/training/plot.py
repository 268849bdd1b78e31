"""`lorakit plot`: train/eval loss (and eval score, preference accuracy) and learning rate against step, from DIR/metrics.jsonl.

matplotlib is an optional extra (`pip install 'lorakit[plot]'`); a Figure with the Agg canvas is used
directly, so no GUI backend and no pyplot global state are involved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from lorakit.atomic import publish_file
from lorakit.errors import SafetyError, UsageError
from lorakit.paths import run_around
from lorakit.publish import check_file_output
from lorakit.training.metrics import read_metrics, series

DPI = 100
# metrics.jsonl keys drawn as fractions (0..1): (key, label, colour, marker)
FRACTIONS = (
    ("eval_score", "eval score", "tab:red", "s"),
    ("rewards/accuracy", "preference accuracy", "tab:purple", None),
    ("eval_rewards/accuracy", "eval preference accuracy", "tab:brown", "^"),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, width: int = 1000, height: int = 700) -> Path:
    """Write a PNG of width×height pixels (default DIR/loss.png) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory; give a run directory (the output.dir of a run)")
    if not (run_dir / "metrics.jsonl").is_file():
        if (run := run_around(run_dir, "metrics.jsonl")) is not None:
            raise UsageError(f"{run_dir / 'metrics.jsonl'}: no metrics file; {run_dir} is a folder of the run {run}: "
                             f"lorakit plot {run}")
    out = Path(out) if out is not None else run_dir / "loss.png"
    target = check_file_output("plot -o", out, "loss.png")  # symlinks resolved: a link to an earlier plot stays a link
    if target.exists() and not _is_plot(target):  # an earlier plot is replaced, nothing else
        raise SafetyError(f"plot -o {out}: the file exists and is not a plot lorakit drew; choose another file")
    if out.suffix.lower() not in ("", ".png"):  # the file holds PNG bytes whatever its name says
        raise UsageError(f"plot -o {out}: lorakit plot draws a PNG; name the file .png, e.g. {out.with_suffix('.png')}")
    records = read_metrics(run_dir / "metrics.jsonl")
    train_steps, train_loss = series(records, "loss")
    eval_steps, eval_loss = series(records, "eval_loss")
    lr_steps, lr = series(records, "lr")
    if not train_steps and not eval_steps:
        raise UsageError(f"{run_dir / 'metrics.jsonl'}: no loss has been logged yet")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("lorakit plot needs matplotlib: pip install 'lorakit[plot]'") from None

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train_steps:
        loss_ax.plot(train_steps, train_loss, label="train loss", color="tab:blue")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, label="eval loss", color="tab:orange", marker="o")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(run_dir.resolve().name)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper left")
    # Fractions on their own 0..1 axis: train.eval_generate's answer score, a preference run's accuracy.
    fractions = [(series(records, key), label, color, marker) for key, label, color, marker in FRACTIONS]
    fractions = [f for f in fractions if f[0][0]]
    if fractions:
        score_ax = loss_ax.twinx()
        for (steps, values), label, color, marker in fractions:
            score_ax.plot(steps, values, label=label, color=color, marker=marker)
        score_ax.set_ylim(0, 1.05)
        score_ax.set_ylabel(" / ".join(label for _, label, _, _ in fractions))
        score_ax.legend(loc="upper right")
    if lr_steps:
        lr_ax.plot(lr_steps, lr, color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.lorakit-tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        publish_file(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _is_plot(path: Path) -> bool:
    """A PNG that matplotlib wrote (its Software text chunk comes right after the image header)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


def maybe_plot(run_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """DIR/loss.png at the end of `lorakit train` when matplotlib is installed; a plot never fails a run."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    try:
        return plot_run(run_dir)
    except Exception as e:  # the adapter is already saved; a missing picture is not worth an error exit
        warn(f"loss plot not written: {e}")
        return None
