"""Parameters of the `sweep` stage: a sweep config (tasks/sweep_config.py), then these options,
then `--set` items over its fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

import configs
from configs.overrides import Override, parse_overrides
from tasks.params import check_dataset, cli
from tasks.sweep_config import SweepConfig, load_sweep, validate_sweep

__all__ = ["SweepParams"]

FLAGS = {"out_dir": "--out"}


class SweepParams(BaseModel):
    """The `sweep` command line; the flow's parameters, one for one."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(
        "tiny",
        description=f"a sweep of configs/sweep/ ({', '.join(configs.names('sweep'))}) or a YAML "
        "path",
    )
    data: str | None = Field(None, description="the dataset to train on (over the config's)")
    out_dir: str | None = Field(
        None,
        description="the sweep's folder: its study and trials (default: data/sweep/<name>)",
        json_schema_extra=cli("--out"),
    )
    trials: int | None = Field(None, gt=0, description="how many trials the study should have")
    concurrency: int | None = Field(None, gt=0, description="trials at a time")
    settings: list[str] | None = Field(
        None,
        description="any other sweep config field, dotted (e.g. settings.max_steps=300, "
        "pruner.name=none; a YAML value; repeatable)",
        json_schema_extra=cli("--set", repeat=True, metavar="KEY=VALUE"),
    )
    _spec: SweepConfig | None = PrivateAttr(None)

    def overrides(self) -> list[Override]:
        options = self.model_dump(exclude={"config", "settings"})
        items = [
            Override(name, value, f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {value}")
            for name, value in options.items()
            if value is not None
        ]
        return items + parse_overrides(self.settings or [], flag="--set")

    def spec(self) -> SweepConfig:
        """The sweep config with the options applied, validated (SweepConfigError names the
        field and the file or flag it came from)."""
        if self._spec is None:
            self._spec = load_sweep(self.config, self.overrides())
        return self._spec

    def check(self) -> None:
        """Every value the space can take validates as a training config, and the data opens."""
        base = validate_sweep(self.spec())
        check_dataset(base.data, "--data" if self.data else f"{self.config}: data")
