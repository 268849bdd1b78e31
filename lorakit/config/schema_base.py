"""The recipe schema's base: every section forbids unknown keys, infinities and booleans where a number belongs.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import difflib
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    # inf/nan pass every bound yet no run can use them (train.learning_rate: .inf).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false would pass as 1/0 for a number (adapter.r: true is r = 1): refuse them."""
        if isinstance(value, bool) and _takes_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{cls._key(info.field_name)}: must be a number, got {value!r}")
        return value

    @classmethod
    def _key(cls, field: str) -> str:
        return f"{cls.__name__.removesuffix('Section').lower()}.{field}"


def _takes_number(annotation) -> bool:
    args = get_args(annotation) if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType" \
        else (annotation,)
    return bool({int, float} & set(args)) and bool not in args


def other_kind_of_rows(i: int, path: str, fmt: str, objective: str) -> str:
    """Why data.train[i], whose own format is ``fmt``, cannot feed train.objective ``objective``."""
    need = "one answer per row" if objective == "sft" else "preference (chosen/rejected pairs)"
    return (f"data.train[{i}].format: {path} has format {fmt}, but train.objective {objective} needs {need} from "
            "every source; remove that source, or train it in a stage of its own")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
