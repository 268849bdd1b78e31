"""The command line (Typer): parsing arguments and printing results, nothing else.

May import every other lorakit package; nothing imports it. `lorakit.cli:run` is the console script.
"""

from lorakit.cli.main import app, run

__all__ = ["app", "run"]
