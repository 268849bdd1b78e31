"""Reading a recipe: YAML in, --set overrides applied, validated into the schema, problems reported together."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from lorakit import text
from lorakit.config import safe_yaml
from lorakit.config.inits import init_problems
from lorakit.config.methods import _REQUIRED, _RESERVED, METHODS, peft_config_class
from lorakit.config.schema import AdapterSection, Recipe
from lorakit.config.schema_base import _did_you_mean
from lorakit.config.start import inapplicable, start_problems
from lorakit.config.tokens import token_problems
from lorakit.errors import RecipeError, UsageError


_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,str]", "function-after", "none", "literal"}


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation is or holds (a data.train item: str | TrainSource)."""
    found, pending = [], [annotation]
    while pending:
        node = pending.pop()
        if isinstance(node, type) and issubclass(node, BaseModel):
            found.append(node)
        else:
            pending.extend(get_args(node))
    return found


def _annotations_at(path: tuple) -> list:
    """The schema's annotations at pydantic's error location ``path`` (several where a union's members differ)."""
    annotations: list = [Recipe]
    for part in path:
        if isinstance(part, int) or part in _TYPE_TAGS or "[" in part:
            continue  # a list index, or the union member pydantic tried
        models = [m for a in annotations for m in _models_in(a)]
        tagged = [m for m in models if m.__name__ == part]
        annotations = tagged or [m.model_fields[part].annotation for m in models if part in m.model_fields]
    return annotations


def _section_fields(path: tuple) -> list[str]:
    """Field names of the pydantic model at ``path`` (for suggestions)."""
    return [name for a in _annotations_at(path) for m in _models_in(a) for name in m.model_fields]


def _key(loc: tuple) -> str:
    """A recipe key as messages spell it, data.train[1].weight, from pydantic's error location (its union member
    tags, str or TrainSource, left out)."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif not (part in _TYPE_TAGS or "[" in part or part[:1].isupper()):
            key += f".{part}" if key else part
    return key


def _format_error(err: dict) -> str:
    loc = err["loc"]
    key = _key(loc)
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(str(loc[-1]), _section_fields(loc[:-1]))}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind in ("model_type", "dict_type"):  # pydantic's "... or instance of TrainSection" names a class of ours
        return _not_a_mapping(key, value)
    if kind == "value_error":  # our own validators: the message already names the keys
        return msg.removeprefix("Value error, ")
    if kind == "literal_error":
        choices = _literal_values(loc)
        expected = ", ".join(map(str, choices)) if choices else str(err.get("ctx", {}).get("expected", "")).replace("'", "")
        return f"{key}: must be {expected}; got {value!r}{_did_you_mean(value, choices)}"
    if kind in _BOUNDS:
        symbol, name = _BOUNDS[kind]
        bound = err["ctx"][name]
        return f"{key}: must be {symbol} {format(bound, 'g') if isinstance(bound, float) else bound}, got {value!r}"
    said = msg[0].lower() + msg[1:]  # "..., got a number with a fractional part" says what it got already
    return f"{key}: {said} ({value!r})" if ", got " in said else f"{key}: {said}, got {value!r}"


def _union_errors_left_out(errors: list[dict]) -> list[str]:
    """pydantic's errors, with the type mismatches of the union members that did not apply left out: one per key,
    none where a member matched further in (data.train: 'should be a valid string' beside data.train[1].weight) or
    another said what is wrong with the value itself (output.report_to: 'foo' is no tracker, not 'no list')."""
    found = [(_key(err["loc"]), _mismatch(err), _format_error(err)) for err in errors]
    out, told = [], set()
    for key, mismatch, message in found:
        if mismatch and (key in told or any(k.startswith((f"{key}.", f"{key}[")) or (k == key and not m)
                                            for k, m, _ in found)):
            continue
        told.add(key)
        out.append(message)
    return out


def _mismatch(err: dict) -> bool:
    """A union member that does not take this kind of value: a wrong type, or a list or mapping for a choice."""
    return err["type"].endswith("_type") or (err["type"] == "literal_error" and isinstance(err.get("input"), (list, dict)))


# pydantic's bound errors carry the bound in err["ctx"] under these names (its messages are only read by people).
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _literal_values(loc: tuple) -> list:
    """The choices of the Literal-typed schema field at ``loc`` (read from the annotation, not the message)."""
    found, pending = [], _annotations_at(loc)
    while pending:
        node = pending.pop()
        if get_origin(node) is Literal:
            found.extend(a for a in get_args(node) if a not in found)
        elif not (isinstance(node, type) and issubclass(node, BaseModel)):
            pending.extend(get_args(node))
    return found


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"recipe file {str(path)!r} is a directory; name the recipe's YAML file in it")
    if not path.is_file():
        raise UsageError(f"recipe file {str(path)!r} not found")
    try:
        data = safe_yaml.load_file_bytes(path.read_bytes(), "the recipe")
    except (safe_yaml.YamlProblem, text.NotText) as e:
        raise RecipeError([str(e)], source=f"{path}:{e.line}" if e.line else str(path)) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError([f"invalid YAML: {e.problem or e}"], source=where) from None
    except yaml.YAMLError as e:  # a reader error (a control character, ...): its text spans lines
        raise RecipeError([f"invalid YAML: {' '.join(str(e).split())}"], source=str(path)) from None
    except OSError as e:
        raise UsageError(f"recipe file {str(path)!r} cannot be read ({e.strerror or e})") from None
    if data is None:
        raise RecipeError(["the recipe is empty; see `lorakit init` for a starter"], source=str(path))
    if not isinstance(data, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(data).__name__}"], source=str(path))
    return data


def _annotation_at(path: list[str]):
    model: Any = Recipe
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = field.annotation
    return model


def _keeps_raw_string(tp, value) -> bool:
    """A scalar given for a string field stays the string the user typed (``name_or_path=123``)."""
    args = get_args(tp) if get_origin(tp) is Union else (tp,)
    return str in args and not isinstance(value, (str, list, dict)) and not any(a in (int, float, bool) for a in args)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set section.key=value`` overrides; values are YAML scalars typed by the schema. ``~section.key``
    removes a key the recipe sets (its default applies), e.g. model.double_quant after --set model.quantization=none,
    where the key would be refused as without effect."""
    for item in overrides:
        if item.startswith("~"):
            _remove_key(data, item)
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(part.strip() for part in parts):  # '=1', '.lr=1', 'train..lr=1'
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        try:
            value: Any = safe_yaml.load(raw) if raw.strip() else None
        except (yaml.YAMLError, safe_yaml.YamlProblem) as e:
            why = e.problem if isinstance(e, yaml.MarkedYAMLError) and e.problem else " ".join(str(e).split())
            raise UsageError(f"--set {key}: cannot parse value {raw!r} as YAML ({why})") from None
        if _keeps_raw_string(_annotation_at(parts), value):
            value = raw
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _remove_key(data: dict, item: str) -> None:
    """--set ~KEY: remove KEY from the recipe; refused where the recipe does not set it (it would change nothing)."""
    parts = item[1:].strip().split(".")
    if "=" in item or len(parts) < 2 or not all(part.strip() for part in parts):
        raise UsageError(f"--set {item!r}: ~KEY removes a key the recipe sets, e.g. --set '~model.double_quant'")
    node = data
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        raise UsageError(f"--set {item}: the recipe does not set {'.'.join(parts)}, so there is nothing to remove")
    del node[parts[-1]]


def parse_recipe(data: dict, source: str | None = None, recorded: bool = False) -> Recipe:
    """The recipe ``data`` validated, every problem in one RecipeError. ``recorded``: the recipe.yaml a run or a
    checkpoint recorded (read by `lorakit eval` and resume), which need not meet the rules for starting work
    (lorakit.config.start: keys with no effect in context, an older lorakit may have written them)."""
    problems = []
    for name in data:
        if name not in Recipe.model_fields:
            problems.append(f"{name}: unknown section{_did_you_mean(name, Recipe.model_fields)}")
    # A section whose keys are all commented out (`output:` alone) is YAML null: an empty section, as section() has it.
    sections = {k: {} if v is None else v for k, v in data.items() if k in Recipe.model_fields}
    try:
        recipe = Recipe.model_validate(sections)
    except ValidationError as e:
        problems.extend(_union_errors_left_out(e.errors()))
        raise RecipeError(problems, source=source) from None
    tokenizer_path = recipe.model.tokenizer or recipe.model.name_or_path
    problems.extend(validate_adapter_extras(recipe.adapter, tokenizer_path))
    if not problems:
        problems.extend(init_problems(recipe) + token_problems(recipe) + ([] if recorded else start_problems(recipe)))
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None,
                resuming: bool = False) -> Recipe:
    """The recipe file ``path`` with --set ``overrides`` and --output-dir applied, validated. ``resuming``
    (train --resume): the file may be the run's own DIR/recipe.yaml, a record of what ran (parse_recipe's
    recorded), which an older lorakit may have written with keys now refused where they have no effect."""
    data = read_yaml(path)
    apply_overrides(data, list(overrides or []))
    if output_dir is not None:
        check_flag_over_set(data, list(overrides or []), "output.dir", output_dir, f"--output-dir {output_dir}")
        section(data, "output", str(path))["dir"] = output_dir
    recipe = parse_recipe(data, source=str(path), recorded=resuming)
    if resuming and Path(path).resolve() != (Path(recipe.output.dir) / "recipe.yaml").resolve():
        if problems := start_problems(recipe):
            raise RecipeError(problems, source=str(path))
    return recipe


def section(data: dict, name: str, source: str) -> dict:
    """The recipe's section ``name`` (created empty when missing), for a command to fill in a key from its flags
    before validation; a section that is no mapping (``adapter: 5``) is a RecipeError, as validation would say."""
    value = data.setdefault(name, {})
    if value is None:
        value = data[name] = {}
    if not isinstance(value, dict):
        raise RecipeError([_not_a_mapping(name, value)], source=source)
    return value


def _not_a_mapping(key: str, value) -> str:
    return f"{key}: must be a mapping of keys, got {type(value).__name__} {value!r}"


def as_flag(problem: str, flags: dict[str, str]) -> str:
    """A problem with a recipe key that the command set from one of its flags, told with the flag the user typed:
    'adapter.r: not used by ...; remove it' becomes '--r: not used by ...; drop --r'. ``flags``: {key: flag} of
    the flags given."""
    key, sep, rest = problem.partition(": ")
    flag = flags.get(key)
    return f"{flag}: {rest.replace('remove it', f'drop {flag}')}" if sep and flag else problem


def check_flag_over_set(data: dict, overrides: list[str], key: str, value: Any, flag: str) -> None:
    """Exit 2 where a flag is about to change a recipe key that --set gave another value (or removed): of the two
    answers one would be dropped without a word. ``value``: what the flag writes; None: the flag removes the key."""
    given = [item for item in overrides if item.lstrip("~").partition("=")[0].strip() == key]
    section_name, _, name = key.partition(".")
    node = data.get(section_name)
    if given and (node.get(name) if isinstance(node, dict) else None) != value:
        shown = str(value).lower() if isinstance(value, bool) else ",".join(value) if isinstance(value, list) else value
        does = f"removes {key}" if value is None else f"sets {key} to {shown}"
        raise UsageError(f"--set {given[-1]}: {flag} {does}; drop one of the two")


@contextmanager
def flags_named(flags: dict[str, str]):
    """Recipe and usage errors raised inside name the flags (as_flag) that set the keys they are about."""
    try:
        yield
    except RecipeError as e:
        raise RecipeError([as_flag(p, flags) for p in e.problems], source=e.source) from None
    except UsageError as e:
        if type(e) is not UsageError:
            raise
        raise UsageError(as_flag(str(e), flags)) from None


def resolved(recipe: Recipe) -> dict:
    """Every key of ``recipe`` with its value, defaults included, except the keys that have no effect in it
    (lorakit.config.start: written back into a recipe they would be refused, and their value changes nothing)."""
    data = recipe.model_dump(mode="json")
    for unused in inapplicable(recipe):
        section_name, leaf = unused.key.split(".")
        del data[section_name][leaf]
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (DIR/recipe.yaml), which trains again as it is."""
    return yaml.safe_dump(resolved(recipe), sort_keys=False, allow_unicode=True)


def validate_adapter_extras(adapter: AdapterSection, tokenizer_path: str | None = None) -> list[str]:
    """Problems with the adapter's pass-through keys: names checked against the method's config class, then
    the values judged by constructing that class (PEFT's own checks; no model is loaded)."""
    extras = dict(adapter.model_extra or {})
    problems = [
        f"adapter.{key}: required for method {adapter.method} (e.g. {key}: 20)"
        for key in _REQUIRED.get(adapter.method, ())
        if key not in extras
    ]
    count = extras.get("num_virtual_tokens")
    if "num_virtual_tokens" in _REQUIRED.get(adapter.method, ()) and count is not None and (
            type(count) is not int or count < 1):  # 0 trains nothing: an adapter without a parameter
        problems.append(f"adapter.num_virtual_tokens: must be a positive integer (the virtual tokens method "
                        f"{adapter.method} learns), got {count!r}")
    if not extras:
        return problems  # keeps `lorakit validate` free of the peft (and torch) import for plain recipes
    import dataclasses

    cls = peft_config_class(adapter.method)
    fields = {f.name for f in dataclasses.fields(cls)}
    allowed = fields - _RESERVED
    for key in extras:
        if key in _RESERVED and key in fields:
            problems.append(f"adapter.{key}: set by lorakit from the recipe and the model; remove it")
        elif key not in allowed:
            hint = _did_you_mean(key, allowed | set(AdapterSection.model_fields))
            elsewhere = [m for m in METHODS if m != adapter.method and key in _field_names(m)]
            also = f"; it is an option of method {'/'.join(elsewhere)}" if elsewhere and not hint else ""
            problems.append(f"adapter.{key}: unknown key for method {adapter.method} ({cls.__name__}){hint}{also}")
    if problems:
        return problems
    from lorakit.config.methods import build_peft_config

    try:
        build_peft_config(adapter, tokenizer_path=tokenizer_path)
    except UsageError as e:
        problems.append(str(e))
    return problems


def _field_names(method: str) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(peft_config_class(method))} - _RESERVED


def parse_targets(text: str):
    """--targets: 'all-linear', a comma-separated list of module names (a stray comma is dropped), or else a
    regex."""
    if text == "all-linear":
        return text
    if not text.strip(" ,"):
        raise UsageError(f"--targets {text!r}: empty; give all-linear, module names (q_proj,v_proj) or a regex")
    if re.fullmatch(r"[\w\-]+(\s*,[\s,]*[\w\-]+)*", text.strip(" ,")):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text
