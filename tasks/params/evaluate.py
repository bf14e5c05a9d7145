"""Parameters of the `evaluate` stage: a checkpoint scored on an eval suite (configs/eval/)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.params import MODEL_HELP, check_file, check_precision, cli, precision_help

__all__ = ["EvaluateParams", "check_task_data"]


class EvaluateParams(BaseModel):
    """The `evaluate` command line; the flow's parameters, one for one."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(
        description="model weights (ours, OpenAI, OpenCLIP) or a registered version "
        "(models:/clip-tiny@champion, models:/clip-tiny/3)"
    )
    suite: str = Field(
        description="eval suite: a YAML path or a preset of configs/eval/ (sample, clip_benchmark)"
    )
    root: str | None = Field(
        None, description='replaces "{root}" in the suite\'s paths (e.g. the sample dir)'
    )
    output: str | None = Field(None, description="results folder (default: data/eval/<suite name>)")
    tasks: list[str] | None = Field(
        None,
        description="comma-separated task names (default: every task of the suite)",
        json_schema_extra=cli(comma=True, metavar="TASK,..."),
    )
    model: str | None = Field(None, description=MODEL_HELP)
    precision: str = Field("fp32", description=precision_help())
    tokenizer: str | None = Field(
        None, description="tokenizer file (default: the checkpoint's, or OpenAI's)"
    )
    force: bool = Field(
        False, description="recompute even if evaluated; replace an OUTPUT holding no evaluations"
    )
    batch_size: int = Field(128, gt=0, description="images per batch")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda:0, ...")
    num_workers: int = Field(
        0, ge=0, description="image loading processes", json_schema_extra=cli("--workers")
    )
    allow_torchscript: bool = Field(
        False,
        description="load a TorchScript checkpoint (OpenAI's .pt releases): it runs the file's code",
    )

    _precision = field_validator("precision")(check_precision)

    def check(self) -> None:
        """The checkpoint and tokenizer files exist; the suite validates, has the tasks asked
        for, and every task's dataset listing reads (not its images)."""
        from clip_model.eval_suite import load_suite, quick_suite

        check_file(self.checkpoint, "--checkpoint")
        check_file(self.tokenizer, "--tokenizer")
        suite = quick_suite(load_suite(self.suite, root=self.root), tasks=self.tasks)
        for task in suite.tasks:
            check_task_data(task)


def check_task_data(task) -> int:
    """Read a task's dataset listing (not its images): an EvalDataError naming the file at
    fault now rather than after the tasks before it were computed. Returns the image count."""
    from clip_model.eval_data import (
        read_classification,
        read_classnames,
        read_retrieval,
        read_templates,
    )

    if task.type == "retrieval":
        return len(read_retrieval(task.dataset, format=task.format, split=task.split).images)
    classnames = task.classnames
    if task.classnames_file is not None:
        classnames = read_classnames(Path(task.classnames_file))
    templates = task.templates
    if task.templates_file is not None:
        templates = read_templates(Path(task.templates_file))
    splits = [task.split] + ([task.train_split] if task.train_split else [])
    return sum(
        len(
            read_classification(
                task.dataset,
                format=task.format,
                split=split,
                classnames=classnames,
                templates=templates,
            ).images
        )
        for split in splits
    )
