"""MLflow 3 on a real training run through the `train` flow (one CPU process, a micro ViT): the
experiment's kind, system metrics on the training run, the registered version's @candidate, and
@champion moved by a configured metric, then by --promote on a rerun that reuses the training."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from storage.tracking import EXPERIMENT_KIND_TAG
from tests.test_train import micro_config, write_shapes

pytestmark = pytest.mark.slow  # a Prefect flow and a training subprocess, twice


def test_train_flow_tracks_system_metrics_and_moves_the_champion(
    tmp_path, prefect_harness, mlflow_tmp
):
    from flows.train import train as train_flow

    data = write_shapes(tmp_path / "shapes", [24, 24])
    config = micro_config(tmp_path, data, mlflow={"enabled": True, "system_metrics_interval": 3600})
    first = train_flow(
        data=data,
        config=str(config),
        max_steps=2,
        registered_model="clip-flow",
        settings=["mlflow.champion_metric=train/loss"],
    )
    client = MlflowClient(mlflow_tmp)
    run = client.get_run(first.mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    version = str(first.registered_version)
    assert str(client.get_model_version_by_alias("clip-flow", "candidate").version) == version
    # no champion yet: the configured metric makes this version the champion
    champion = client.get_model_version_by_alias("clip-flow", "champion")
    assert str(champion.version) == version
    assert float(champion.tags["champion_metric.train/loss"]) == first.metrics["train/loss"]

    # a second model, then --promote on the first's rerun: reused, not retrained, and promoted
    other = train_flow(
        data=data,
        config=str(config),
        max_steps=2,
        out_dir=str(tmp_path / "other"),
        registered_model="clip-flow",
        settings=["seed=7"],
    )
    assert str(other.registered_version) != version
    assert str(client.get_model_version_by_alias("clip-flow", "candidate").version) != version
    client.set_registered_model_alias("clip-flow", "champion", str(other.registered_version))
    again = train_flow(
        data=data,
        config=str(config),
        max_steps=2,
        registered_model="clip-flow",
        promote=True,
        settings=["mlflow.champion_metric=train/loss"],
    )
    assert again.skipped and str(again.registered_version) == version
    assert str(client.get_model_version_by_alias("clip-flow", "champion").version) == version
