"""The one parser of `key=value` config overrides, and validation errors that blame the right item.

    items = parse_overrides(["train.settings.max_steps=50", "data_root=/tmp/d"], flag="--set")
    data = apply_overrides(yaml_data, items)             # dotted keys reach nested sections
    cfg = validate(PipelineConfig, data, source="configs/pipeline/tiny.yaml", overrides=items)

Values are YAML (`50` an int, `[a, b]` a list, `null` None). A field that fails validation is
blamed on the override that set it (`--set train.settings.max_stepz=5: max_stepz: ...`), else on
the file, in ONE line naming the field, what was given and what is accepted: command lines print
it as `error: ...` and exit 2. Used by every command line and by `python -m clip_model.train`.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from configs import ConfigError, locate

__all__ = [
    "Override",
    "apply_overrides",
    "explain",
    "load",
    "parse_overrides",
    "validate",
]

M = TypeVar("M", bound=BaseModel)
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")


@dataclass(frozen=True)
class Override:
    """One `key=value` item: `key` dotted, `value` parsed, `origin` what to blame in messages."""

    key: str
    value: Any
    origin: str

    def under(self, prefix: str) -> Override | None:
        """This override relative to a section (`train.settings.lr` under `train.settings` is
        `lr`), keeping its origin; None when it is not inside that section."""
        if not self.key.startswith(prefix + "."):
            return None
        return replace(self, key=self.key[len(prefix) + 1 :])


def parse_overrides(items: Iterable[str | Override], flag: str = "") -> list[Override]:
    """`key=value` strings (YAML values; dashes in keys read as underscores) as Overrides.
    `flag` prefixes the origin (`--set`), so a message quotes the item as it was typed."""
    parsed = []
    for item in items:
        if isinstance(item, Override):
            parsed.append(item)
            continue
        origin = f"{flag} {item}" if flag else item
        key, sep, text = item.removeprefix("--").partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not _KEY.match(key):
            raise ConfigError(f"{origin}: expected KEY=VALUE with a dotted KEY (e.g. max_steps=50)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{origin}: the value is not valid YAML ({problem})") from None
        parsed.append(Override(key, value, origin))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """A copy of `data` with each override set at its dotted key, sections made as needed."""
    data = copy.deepcopy(data)
    for o in overrides:
        *parents, leaf = o.key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{o.origin}: {part!r} is a value, not a section")
        node[leaf] = o.value
    return data


def validate(model: type[M], data: Any, *, source: str, overrides: Sequence[Override] = ()) -> M:
    """`model.model_validate(data)`, a failure raised as a one-line ConfigError blaming the
    override that set the field, else `source` (the file the rest came from)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of {model.__name__} fields")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(explain(error, model, blame(source, overrides))) from None


def load(
    model: type[M],
    ref: str | os.PathLike | None,
    *,
    kind: str,
    overrides: Sequence[Override] = (),
) -> M:
    """A config of `kind` (a preset name or YAML path, see `configs.locate`; None: only the
    overrides), overrides applied, validated; every failure is one ConfigError line."""
    data: Any = {}
    source = "options"
    if ref is not None:
        try:
            path = locate(ref, kind)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        source = str(ref)
        try:
            data = yaml.safe_load(path.read_text("utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of {model.__name__} fields")
    return validate(model, apply_overrides(data, overrides), source=source, overrides=overrides)


def blame(source: str, overrides: Sequence[Override]) -> Callable[[tuple, str], str]:
    """What a message about the field at `loc` starts with: the most specific override touching
    the field, else `source`, then the field. A problem of the whole config (no field: "set
    exactly one of max_steps and max_epochs") names the source and the overrides it mentions."""

    def where(loc: tuple, message: str) -> str:
        dotted = ".".join(str(p) for p in loc)
        if not dotted:
            named = [
                o.origin for o in overrides if re.search(rf"\b{o.key.split('.')[-1]}\b", message)
            ]
            return f"{source} with {', '.join(named)}" if named else source
        touching = [
            o
            for o in overrides
            if o.key == dotted or dotted.startswith(o.key + ".") or o.key.startswith(dotted + ".")
        ]
        origin = max(touching, key=lambda o: len(o.key)).origin if touching else source
        return f"{origin}: {dotted}"

    return where


def explain(
    error: ValidationError, model: type[BaseModel] | None, where: Callable[[tuple, str], str]
) -> str:
    """One line for all of a ValidationError's problems: `<where(loc, what)>: <what>; ...`."""
    problems = []
    for e in error.errors():
        loc = tuple(e["loc"])
        message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            message += _suggest(str(loc[-1]), _fields_at(model, loc[:-1]))
        elif e["type"] != "missing" and _short(e.get("input")):
            message += f" (got {e['input']!r})"
        prefix = where(loc, message)
        problems.append(f"{prefix}: {message}" if prefix else message)
    return "; ".join(problems)


def _short(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80


def _suggest(name: str, fields: list[str]) -> str:
    if not fields:
        return ""
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]}?)"
    if len(fields) <= 15:
        return f" (accepted: {', '.join(fields)})"
    return ""


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the (nested) model at `loc`, or [] where that is not a model."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
