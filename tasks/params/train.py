"""Parameters of the `train` stage: a TrainConfig (file, then these options, then `--set`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from configs.overrides import Override, parse_overrides
from tasks.params import check_dataset, check_precision, cli, precision_help

__all__ = ["TrainParams", "option_overrides"]

# flow parameter -> TrainConfig field, for the options that are TrainConfig fields
OPTION_FIELDS = {
    "data": "data",
    "model": "model",
    "out_dir": "out_dir",
    "max_steps": "max_steps",
    "max_epochs": "max_epochs",
    "batch_size": "batch_size",
    "devices": "devices",
    "accelerator": "accelerator",
    "precision": "precision",
    "registered_model": "mlflow.registered_model",
    "promote": "mlflow.promote",
}
FLAGS = {"out_dir": "--out"}


def option_overrides(options: dict[str, Any]) -> list[Override]:
    """The train flow's options (None: not given) as TrainConfig overrides, each blamed on its
    flag in messages (`--max-steps 0: max_steps: ...`). Several devices mean DDP."""
    items = []
    for name, value in options.items():
        if value is None or (name == "promote" and not value):  # no flag: the config's
            continue
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        items.append(Override(OPTION_FIELDS.get(name, name), value, f"{flag} {value}"))
    devices = options.get("devices")
    if isinstance(devices, int) and devices > 1:
        items.append(Override("strategy", "ddp", f"--devices {devices}"))
    return items


class TrainParams(BaseModel):
    """The `train` command line; the flow's parameters, one for one."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="dataset folder or fsspec URL")
    model: str | None = Field(
        None, description="model preset name or YAML path (default: the config's, else tiny)"
    )
    out_dir: str | None = Field(
        None,
        description="run folder (checkpoints, metrics, tokenizer)",
        json_schema_extra=cli("--out"),
    )
    config: str | None = Field(
        None, description="a TrainConfig YAML, or a preset of configs/train/ (tiny, vitb32_cc3m)"
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (or --max-epochs)")
    max_epochs: int | None = Field(None, gt=0, description="passes over the data (or --max-steps)")
    batch_size: int | None = Field(None, gt=0, description="samples per device per step")
    devices: int | None = Field(
        None, gt=0, description="processes (GPUs, or CPU ranks with gloo); > 1 runs torchrun"
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] | None = Field(
        None, description="where to train"
    )
    precision: str | None = Field(
        None,
        description="training precision (bf16 is ~3x faster than fp32 on AVX512-BF16 CPUs): "
        + precision_help(),
    )
    registered_model: str | None = Field(None, description="MLflow model registry name")
    promote: bool = Field(
        False,
        description="move the registry alias @champion to the new version (else only when "
        "mlflow.champion_metric improves)",
    )
    settings: list[str] | None = Field(
        None,
        description="any other TrainConfig field, dotted for nested (a YAML value; repeatable)",
        json_schema_extra=cli("--set", repeat=True, metavar="KEY=VALUE"),
    )
    force: bool = Field(
        False, description="replace an --out folder holding files no training wrote"
    )

    def overrides(self) -> list[Override]:
        options = self.model_dump(exclude={"config", "settings", "force"})
        return option_overrides(options) + parse_overrides(self.settings or [], flag="--set")

    _precision = field_validator("precision")(check_precision)

    def check(self) -> None:
        """The resolved TrainConfig validates (its errors name the flag, --set item or config
        file at fault), its model preset exists, and the dataset opens."""
        from clip_model.config import ModelConfig
        from clip_model.train_config import load_config

        cfg = load_config(self.config, self.overrides())
        try:
            ModelConfig.load(cfg.model)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        check_dataset(cfg.data, "--data")
