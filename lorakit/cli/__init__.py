"""The command line (Typer): parsing arguments and printing results, nothing else.

May import every other lorakit package; nothing imports it. `lorakit.cli:main` is the console script.
"""

from lorakit.cli.main import app, main, run

__all__ = ["app", "main", "run"]
