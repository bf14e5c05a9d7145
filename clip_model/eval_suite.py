"""Eval suites: which datasets to evaluate a CLIP on, and how, as validated YAML.

    name: sample
    root: null                     # optional default for {root}; a run-time root wins
    tasks:
      - name: digits
        type: classification       # classification | retrieval | linear_probe
        dataset: "{root}/eval/digits"
        format: sample             # sample | folder | clip_benchmark
        templates: ["a photo of the number {c}."]   # optional override (or templates_file)

Paths: "{root}" in `dataset` (and the *_file fields) is replaced by the root given at run time
(`load_suite(path, root=...)`, the evaluate flow's --root; relative to the working directory),
else by the suite's `root:`; a path still relative after that is taken relative to the suite
file's folder. Datasets are local folders. So one suite serves
every copy of a dataset, e.g. each `python -m flows.sample --out DIR`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import configs
from clip_model.templates import check_templates

ROOT_PLACEHOLDER = "{root}"


class EvalSuiteError(ValueError):
    """A suite file that is missing, not YAML, or not a valid suite."""


class EvalTask(BaseModel):
    """One evaluation: a dataset, how to read it and which measure to take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="metric prefix, e.g. digits -> digits/acc1")
    type: Literal["classification", "retrieval", "linear_probe"]
    dataset: str = Field(description='folder of the dataset; may start with "{root}"')
    format: Literal["sample", "folder", "clip_benchmark"]
    split: str = Field("test", description="clip_benchmark split to evaluate on")
    classnames: list[str] | None = None
    classnames_file: str | None = None
    templates: list[str] | None = None
    templates_file: str | None = None
    max_images: int | None = Field(
        None, ge=1, description="evaluate on the first N images only (a quick subset)"
    )
    # linear probe
    train_split: str | None = Field(
        None, description="clip_benchmark split to train the probe on; else a split of `split`"
    )
    test_fraction: float = Field(0.5, gt=0, lt=1, description="test share when splitting one set")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation share of the train set")
    cs: list[float] | None = Field(None, description="C grid; default 13 values 1e-6..1e6")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError(f"task name {name!r} must be letters, digits, '_', '.' or '-'")
        return name

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str] | None) -> list[str] | None:
        return None if templates is None else check_templates(templates)

    @model_validator(mode="after")
    def _consistent(self) -> EvalTask:
        if self.classnames is not None and self.classnames_file is not None:
            raise ValueError(f"task {self.name}: give classnames or classnames_file, not both")
        if self.templates is not None and self.templates_file is not None:
            raise ValueError(f"task {self.name}: give templates or templates_file, not both")
        if self.type == "retrieval" and self.format == "folder":
            raise ValueError(
                f"task {self.name}: a retrieval task reads format sample or clip_benchmark, "
                "not folder (folders hold classes, not captions)"
            )
        if self.type == "retrieval" and (self.classnames or self.templates):
            raise ValueError(f"task {self.name}: retrieval takes no classnames or templates")
        if self.train_split is not None and self.format != "clip_benchmark":
            raise ValueError(f"task {self.name}: train_split applies to format clip_benchmark")
        if self.cs is not None and (not self.cs or min(self.cs) <= 0):
            raise ValueError(f"task {self.name}: cs must be positive numbers")
        return self


class EvalSuite(BaseModel):
    """A named list of tasks; `root` is the default for "{root}" in their paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    root: str | None = None
    tasks: list[EvalTask] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        names = [t.name for t in tasks]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"task names must be unique; repeated: {doubled}")
        return tasks

    def resolved(self, *, root: str | Path | None = None, base: str | Path = ".") -> EvalSuite:
        """This suite with "{root}" replaced and relative paths made relative to `base`."""
        root = str(root) if root is not None else self.root

        def fix(path: str | None, task: str) -> str | None:
            if path is None:
                return None
            if ROOT_PLACEHOLDER in path:
                if root is None:
                    raise EvalSuiteError(
                        f"suite {self.name}, task {task}: {path!r} uses {ROOT_PLACEHOLDER} but "
                        "no root was given; pass one (e.g. --root DIR) or set root: in the suite"
                    )
                path = path.replace(ROOT_PLACEHOLDER, root)
            return str(Path(base) / Path(path).expanduser())

        tasks = [
            t.model_copy(
                update={
                    "dataset": fix(t.dataset, t.name),
                    "classnames_file": fix(t.classnames_file, t.name),
                    "templates_file": fix(t.templates_file, t.name),
                }
            )
            for t in self.tasks
        ]
        return self.model_copy(update={"tasks": tasks, "root": root})


def load_suite(path: str | Path, *, root: str | Path | None = None) -> EvalSuite:
    """Read and validate a suite YAML; "{root}" resolved (see the module docstring)."""
    try:
        path = configs.locate(path, "eval")  # a path, or a preset name of configs/eval/
    except FileNotFoundError:
        raise EvalSuiteError(
            f"{path}: eval suite file not found (e.g. configs/eval/sample.yaml, or a preset: "
            f"{', '.join(configs.names('eval'))})"
        ) from None
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as err:
        raise EvalSuiteError(f"{path}: not valid YAML ({err})") from None
    try:
        suite = EvalSuite.model_validate(data)
    except ValidationError as err:
        raise EvalSuiteError(f"{path}: not a valid eval suite:\n{err}") from None
    if root is not None:
        root = Path(root).expanduser().absolute()  # a run-time root is relative to the cwd
    return suite.resolved(root=root, base=path.parent.absolute())


def quick_suite(
    suite: EvalSuite, *, tasks: Sequence[str] | None = None, max_images: int | None = None
) -> EvalSuite:
    """`suite` cut to the named `tasks` (in suite order) with at most `max_images` per task."""
    names = [t.name for t in suite.tasks]
    if tasks is not None:
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"suite {suite.name} has no task {unknown}; it has {names}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images}: must be >= 1 (or None for every image)")
    kept = []
    for task in suite.tasks:
        if tasks is not None and task.name not in tasks:
            continue
        if max_images is not None:
            limit = min(task.max_images or max_images, max_images)
            task = task.model_copy(update={"max_images": limit})
        kept.append(task)
    return suite.model_copy(update={"tasks": kept})
