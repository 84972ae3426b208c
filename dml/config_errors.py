"""Pydantic validation errors of a config as one readable clause each: the dotted key, what is
wrong, and for a misspelt key or name the closest valid one (`dml.config.validate_config`
joins them into one `ConfigError` line)."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from dml.names import unknown_name


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model reached by ``loc`` (empty when it is not a model)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _literal_choices(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The string values a ``Literal`` field at ``loc`` allows (tuple items included); [] if none."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            current = field.annotation if field is not None else None
        elif typing.get_origin(current) is tuple and isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args[-1] is Ellipsis else args[part]
        else:
            return []
    if typing.get_origin(current) is not Literal:
        return []
    return [str(v) for v in typing.get_args(current) if isinstance(v, str)]


def describe_error(error: ErrorDetails, model: type[BaseModel]) -> str:
    """One clause for one entry of ``ValidationError.errors()`` raised by ``model``."""
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"unknown config key '{dotted}'{hint} (valid here: {', '.join(valid)})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "unknown_name":  # a name not in its registry (`dml.registries.RegisteredName`)
        return f"config key '{dotted}': {message}"
    choices = _literal_choices(model, loc) if error["type"] == "literal_error" else None
    if choices:
        return f"config key '{dotted}': {unknown_name(error.get('input'), choices, 'value')}"
    if not loc or error["type"] == "value_error":  # a cross-field rule: its message says it all
        return f"config{f' {dotted}' if dotted else ''}: {message}"
    return f"config key '{dotted}': {message} (got {error.get('input')!r})"
