"""The `lorakit` command line: a thin Typer layer over the modules that do the work.

One module per command group registers its commands on ``lorakit.cli.app.app``; importing them here, in this
order, is also the order of `lorakit --help`.
"""

from __future__ import annotations

import sys

from lorakit.cli import recipes, runs, outputs, machine  # noqa: F401, I001  (registers the commands, in --help order)
from lorakit.cli.app import app

__all__ = ["app", "run"]


def run() -> None:
    """Console-script entry point."""
    from lorakit.training.threads import passive_openmp_waits

    passive_openmp_waits()  # before anything imports torch: OpenMP reads its wait policy once, at load
    app()


if __name__ == "__main__":
    sys.exit(run())
