"""One command-line pattern for every stage: flags from the stage's pydantic parameter model,
everything checked before anything starts.

    python -m flows.ingest --help                     # < 2 s: nothing heavy is imported for it
    python -m flows.ingest --url-list urls.csv --output data/crawl --url-col link
    error: URL list 'urls.csv' has no column 'link' (--url-col); its columns are: url, caption

Each stage's parameters are a pydantic model in a light module (tasks/params/<stage>.py: no
Prefect, no torch, no MLflow). `main(stage)`:

1. builds the argparse flags from the model's fields: `--<field-name-with-dashes>`, help text
   from the field's description, the default shown, choices from a `Literal` type, a bool as a
   switch; `tasks.params.cli(...)` in a field's `json_schema_extra` renames a flag, gives it a
   short alias or makes it repeatable;
2. validates the values with the model, then runs its `check()` (files, dataset manifests, URL
   list columns, config files), so bad input of any kind is ONE line `error: ...` on stderr and
   exit status 2 within a second or two, before Prefect's server, torch or MLflow is started;
3. only then imports `flows.<stage>` and calls its `run(params)`, which returns the exit status.

A flow module hands `python -m flows.<stage>` to this module at its very top, before its own
heavy imports (`if __name__ == "__main__": raise SystemExit(main("<stage>"))`); console scripts
(`clip-<stage>`, pyproject.toml) call the same `main`.

A new stage: its parameter model in tasks/params/<stage>.py (every field with a description; a
`check()` for what must exist), an entry in STAGES, the guard at the top of flows/<stage>.py and
a `run(params) -> int` there, a `<stage>_command` below and its console script in pyproject.toml.
A new flag: a field of the model (and the same keyword on the flow: tests/test_cli.py checks).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from configs.overrides import explain

__all__ = ["STAGES", "BadInput", "build_parser", "main", "parse", "parse_fields"]

# stage -> "module:Model" of its parameters (a light module: imported for --help)
STAGES = {
    "ingest": "tasks.params.ingest:IngestParams",
    "curate": "tasks.params.curate:CurateParams",
    "train": "tasks.params.train:TrainParams",
    "evaluate": "tasks.params.evaluate:EvaluateParams",
    "index": "tasks.params.index:IndexParams",
    "search": "tasks.params.search:SearchParams",
    "sample": "tasks.params.sample:SampleParams",
    "pipeline": "tasks.params.pipeline:PipelineParams",
    "sweep": "tasks.params.sweep:SweepParams",
}

# What a parameter model's check() raises for bad input (ConfigError, DatasetError and pydantic's
# ValidationError are ValueErrors; a missing file an OSError); anything else is a bug: traceback.
BadInput = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `error: ...` line (no usage block) and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}{self._close_flags(message)} (see {self.prog} --help)\n")

    def _close_flags(self, message: str) -> str:
        """For an unknown flag, the known ones it was probably meant to be."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = [
            f"{word} -> {' or '.join(close)}"
            for word in message.split(":", 1)[1].split()
            if word.startswith("--")
            and (close := difflib.get_close_matches(word.split("=")[0], flags, n=2, cutoff=0.6))
        ]
        return f"; did you mean: {', '.join(hints)}?" if hints else ""


def _options(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return dict(extra.get("cli") or {})


def flag_of(name: str, field: FieldInfo) -> str:
    return _options(field).get("flag") or "--" + name.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007
    return annotation, False


def _describe_default(field: FieldInfo) -> str:
    if field.is_required():
        return ""
    default = field.get_default(call_default_factory=True)
    if default is None or default is False or default == [] or default == {}:
        return ""
    if isinstance(default, list):
        default = " ".join(map(str, default))
    return f" (default: {default})"


def _add_field(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    options = _options(field)
    flags = [flag_of(name, field)] + ([options["short"]] if options.get("short") else [])
    kind, _ = _unwrap(field.annotation)
    help_text = (field.description or "").replace("%", "%%") + _describe_default(field)
    kwargs: dict[str, Any] = {"dest": name, "help": help_text.strip() or None}
    if options.get("metavar"):
        kwargs["metavar"] = options["metavar"]
    origin = typing.get_origin(kind)
    if kind is bool:
        default = field.get_default(call_default_factory=True)
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
        kwargs["type"] = type(kwargs["choices"][0])
    elif origin is list:
        (item,) = typing.get_args(kind) or (str,)
        item_type = item if item in (str, int, float) else str
        if options.get("comma"):
            kwargs["type"] = lambda s: [item_type(t.strip()) for t in s.split(",") if t.strip()]
        elif options.get("repeat"):
            kwargs["action"] = "append"
            kwargs["type"] = item_type
        else:
            kwargs["nargs"] = "*"
            kwargs["type"] = item_type
    elif kind in (int, float, str):
        kwargs["type"] = kind
    elif isinstance(kind, type) and issubclass(kind, Path):
        kwargs["type"] = str
    elif origin is dict or (isinstance(kind, type) and issubclass(kind, BaseModel | dict)):
        return  # a nested section: set through a config file or --set, not a flag of its own
    else:
        kwargs["type"] = str  # unions such as `int | Literal["auto"]`: the model converts
    if field.is_required():
        kwargs["required"] = True
    parser.add_argument(*flags, **kwargs)


def _docstring(stage: str) -> str:
    """The flow module's docstring, read without importing the module (which imports Prefect)."""
    spec = importlib.util.find_spec(f"flows.{stage}")
    if spec is None or spec.origin is None:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text("utf-8"))) or ""


def model_of(stage: str) -> type[BaseModel]:
    if stage not in STAGES:
        raise KeyError(f"no stage {stage!r}; stages: {', '.join(STAGES)}")
    module, _, name = STAGES[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(stage: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a stage, every flag from its parameter model."""
    model = model_of(stage)
    doc = _docstring(stage)
    summary, _, details = doc.partition("\n")
    parser = _Parser(
        prog=prog or f"python -m flows.{stage}",
        description=summary,
        epilog=details.strip("\n") or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # an absent flag leaves the model's default
    )
    fields = model.model_fields
    # required flags first, then the rest in the model's order
    for name in sorted(fields, key=lambda n: not fields[n].is_required()):
        _add_field(parser, name, fields[name])
    return parser


def parse_fields(
    stage: str, argv: Sequence[str] | None = None, prog: str | None = None
) -> BaseModel:
    """The stage's parameters from a command line, validated field by field but not yet checked
    against the world (files, datasets). Bad input: one `error: ...` line, SystemExit(2)."""
    model = model_of(stage)
    parser = build_parser(stage, prog)
    values = vars(parser.parse_args(argv))
    flags = {name: flag_of(name, f) for name, f in model.model_fields.items()}

    def where(loc: tuple, message: str) -> str:
        if not loc:
            return ""
        rest = ".".join(str(p) for p in loc[1:])
        flag = flags.get(str(loc[0]), str(loc[0]))
        return f"{flag} {rest}" if rest else flag

    try:
        return model.model_validate(values)
    except ValidationError as e:
        _refuse(explain(e, model, where))


def parse(stage: str, argv: Sequence[str] | None = None, prog: str | None = None) -> BaseModel:
    """The stage's parameters from a command line, validated and checked (the model's
    `check()`). Bad input raises SystemExit(2) after printing one `error: ...` line; --help
    prints and raises SystemExit(0)."""
    params = parse_fields(stage, argv, prog)
    try:
        check = getattr(params, "check", None)
        if check is not None:
            check()
    except BadInput as e:
        _refuse(str(e))
    return params


def one_line(message: str) -> str:
    """A message of several lines (a list of problems) as one line."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _refuse(message: str) -> typing.NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def main(stage: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse and check a stage's command line, then run the stage; the exit status."""
    try:
        params = parse(stage, argv, prog)
    except SystemExit as e:  # --help (0) or refused input (2)
        return e.code if isinstance(e.code, int) else 2
    flow_module = importlib.import_module(f"flows.{stage}")
    try:
        return int(flow_module.run(params) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# console scripts (pyproject.toml [project.scripts]): clip-<stage>
def ingest_command() -> int:
    return main("ingest", prog="clip-ingest")


def curate_command() -> int:
    return main("curate", prog="clip-curate")


def train_command() -> int:
    return main("train", prog="clip-train")


def evaluate_command() -> int:
    return main("evaluate", prog="clip-evaluate")


def index_command() -> int:
    return main("index", prog="clip-index")


def search_command() -> int:
    return main("search", prog="clip-search")


def sample_command() -> int:
    return main("sample", prog="clip-sample")


def pipeline_command() -> int:
    return main("pipeline", prog="clip-pipeline")


def sweep_command() -> int:
    return main("sweep", prog="clip-sweep")
