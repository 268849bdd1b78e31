"""Commands about recipes and their data: init, validate, schema, preview-data. None loads a model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorakit.cli.app import output_file_option, RecipeArg, SetOpt, command

@command(help="Write a commented starter recipe from a template (lorakit init --list names them).")
def init(
    template: Optional[str] = typer.Argument(None, help="Template name (see --list; default lora).", show_default=False),
    output: Path = output_file_option(Path("recipe.yaml"), "Where to write it ('-' for stdout)."),
    force: bool = typer.Option(
        False, "--force", help="Move an existing file aside (FILE.replaced-TIME) and write a new one."),
    list_: bool = typer.Option(False, "--list", help="List the templates and exit."),
) -> None:
    from lorakit.console import console, saved
    from lorakit.config.init import TEMPLATES, render, write_template
    from lorakit.errors import UsageError

    given = [name for name, on in ((f"the template {template}", template is not None),
                                   ("-o", output != Path("recipe.yaml")), ("--force", force)) if on]
    if list_ and given:
        raise UsageError(f"init --list only lists the templates and writes nothing; drop {', '.join(given)}")
    if str(output) == "-" and force:
        raise UsageError("init -o - writes to stdout, where nothing is replaced; drop --force")
    template = template or "lora"
    if list_:
        say = console(True)
        for name, tpl in TEMPLATES.items():
            say(f"{name:<10} {tpl.summary}")
        return
    if str(output) == "-":
        sys.stdout.write(render(template))
        return
    saved(True)("recipe", write_template(template, output, force=force))


@command(help="Check a recipe and report every problem at once. Loads no model or data.")
def validate(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt) -> None:
    from lorakit.config.load import load_recipe

    checked = load_recipe(recipe, set_)
    from lorakit.config.start import start_warnings
    from lorakit.console import console, warner

    for warning in start_warnings(checked):
        warner(True)(warning)
    console(True)(f"{recipe}: ok")


@command(help="Print the recipe JSON Schema (for editors: lorakit schema > recipe.schema.json).")
def schema(
    output: Optional[Path] = output_file_option(
        None, "Write it to this file instead of stdout (replaces only an earlier schema)."),
) -> None:
    import json

    from lorakit.config.docs import recipe_json_schema

    from lorakit.console import emit, is_json

    text = json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None and is_json():  # --json-logs: stdout holds only JSON lines, the schema one event
        emit("schema", schema=recipe_json_schema())
        return
    if output is None:
        sys.stdout.write(text)
        return
    from lorakit.console import saved
    from lorakit.errors import SafetyError
    from lorakit.publish import check_file_output

    from lorakit.atomic import write_file

    target = check_file_output("schema -o", output, "recipe.schema.json")  # symlinks resolved
    if target.exists() and _json_title(target) != "lorakit recipe":  # an earlier schema is replaced, nothing else
        raise SafetyError(f"schema -o {output}: the file exists and is not a lorakit recipe schema; choose another "
                          "file")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file(target, text)
    saved(True)("schema", output)


def _json_title(path: Path) -> str | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("title") if isinstance(data, dict) else None


@command(name="preview-data", help="Show the first rows as the model sees them (supervised tokens highlighted, "
         "masked ones dimmed) and the data summary. Loads the tokenizer and data only; trains nothing.")
def preview_data(
    recipe: Path = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    rows: int = typer.Option(3, "-n", "--rows", min=1, help="How many rows to show."),
    stats: bool = typer.Option(
        True, "--stats/--no-stats", help="Also tokenize the whole dataset (cached) and print kept/truncated/dropped "
        "counts and the token-length distribution."),
) -> None:
    from lorakit.config.load import load_recipe

    loaded = load_recipe(recipe, set_)
    from lorakit.console import adopt_transformers_output
    from lorakit.tools.preview import preview_data as show_preview  # heavy: transformers

    adopt_transformers_output()
    show_preview(loaded, rows, stats)
