"""The pipeline's run as the MLflow UI's runs table shows it: its training dataset, its model and
a saved view with the headline metric columns; its evaluation linked to the registered version.
Shares test_pipeline.py's first run (the micro profile, end to end)."""

from __future__ import annotations

import json

import mlflow
import pytest

from storage.tracking import SHARED_VIEW_TAG, tracking_uri
from tests.test_pipeline import first_run, runs_of  # noqa: F401  (the module's shared run)

pytestmark = pytest.mark.slow  # the whole pipeline, once per module


def test_the_pipeline_run_shows_dataset_model_and_headline_columns(first_run):  # noqa: F811
    _, _, result = first_run
    client = mlflow.MlflowClient(tracking_uri())
    runs = runs_of(result.mlflow_run_id)
    parent = runs["pipeline"]
    contexts = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]
        for d in parent.inputs.dataset_inputs
    }
    assert "training" in contexts
    assert parent.outputs.model_outputs, "no model in the pipeline run's Models column"

    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[SHARED_VIEW_TAG + "pipeline"])
    for metric in ("digits/acc1", "curate/kept"):
        assert f"metrics.`{metric}`" in view["selectedColumns"]
    assert result.mlflow_view.endswith("workflowType=machine_learning&viewStateShareKey=pipeline")

    # the evaluation scored the registered version and is linked to it
    evaluation = runs["evaluate"]
    name = evaluation.data.tags["registered_model.name"]
    version = evaluation.data.tags["registered_model.version"]
    tags = client.get_model_version(name, version).tags
    assert tags["evaluation.sample"] == evaluation.info.run_id
    assert evaluation.data.params["checkpoint"] == f"models:/{name}/{version}"
