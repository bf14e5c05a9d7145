"""MLflow 3 in full (storage/tracking.py, clip_model/pyfunc.py), against a real SQLite MLflow:
experiments of the model-training kind, a pyfunc with signature and input example, the registry
aliases @candidate and @champion, `models:/` URIs fetched to a weights file, system metrics.

The model is a micro CLIP (32 px, width 64) built from its config: logging it costs a second.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from clip_model.checkpoint import load_clip, model_digest
from clip_model.config import ModelConfig
from clip_model.model import CLIP
from clip_model.pyfunc import input_example, log_pyfunc_model
from storage.tracking import (
    CANDIDATE,
    CHAMPION,
    EXPERIMENT_KIND_TAG,
    ensure_experiment,
    fetch_registered_model,
    promote,
    stage_run,
    system_metrics,
)

ROOT = Path(__file__).resolve().parent.parent
MICRO = {
    "name": "micro",
    "image_size": 32,
    "vision_width": 64,
    "vision_layers": 1,
    "vision_patch_size": 8,
    "vision_head_width": 32,
    "text_width": 64,
    "text_heads": 2,
    "text_layers": 1,
    "embed_dim": 32,
    "context_length": 16,
    "tokenizer": "openai",
}


def micro_clip(seed: int = 0) -> CLIP:
    import torch

    torch.manual_seed(seed)
    config = ModelConfig(**MICRO)
    return CLIP(config).eval()


def register(name: str, seed: int = 0) -> str:
    """Log and register a micro CLIP in a run of its own; returns the new version."""
    with stage_run("train", run_name=f"register-{seed}"):
        info = log_pyfunc_model(micro_clip(seed), registered_model_name=name)
    return str(info.registered_model_version)


def test_a_new_experiment_opens_in_the_model_training_view(mlflow_tmp):
    client = MlflowClient(mlflow_tmp)
    with stage_run("ingest", experiment="fresh"):
        pass
    fresh = client.get_experiment_by_name("fresh")
    assert fresh.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    # an experiment made before (no kind) gets it; a kind chosen in the UI is kept
    old = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment("older") == old and ensure_experiment("chosen") == chosen
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_registered_pyfunc_has_a_signature_an_input_example_and_the_candidate_alias(
    mlflow_tmp,
):
    version = register("clip-micro")
    client = MlflowClient(mlflow_tmp)
    assert str(client.get_model_version_by_alias("clip-micro", CANDIDATE).version) == version

    model = mlflow.pyfunc.load_model("models:/clip-micro@candidate")
    signature = model.metadata.get_input_schema().to_dict()
    assert [(c["name"], c["type"], c["required"]) for c in signature] == [
        ("image", "binary", False),
        ("text", "string", False),
    ]
    outputs = [c["name"] for c in model.metadata.get_output_schema().to_dict()]
    assert outputs == ["image_embedding", "text_embedding"]
    assert model.metadata.saved_input_example_info["type"] == "dataframe"

    # the signature lets a request with only one of the columns through
    out = model.predict(pd.DataFrame({"text": ["a red circle", "a blue square"]}))
    assert list(out.columns) == ["text_embedding"] and len(out["text_embedding"][0]) == 32
    both = model.predict(input_example())
    assert len(both["image_embedding"][0]) == 32

    # a second version takes the candidate alias; the first keeps its number
    second = register("clip-micro", seed=1)
    assert int(second) == int(version) + 1
    assert str(client.get_model_version_by_alias("clip-micro", CANDIDATE).version) == second


def test_champion_moves_on_the_explicit_flag_or_when_the_metric_improves(mlflow_tmp):
    client = MlflowClient(mlflow_tmp)
    v1, v2, v3 = (register("clip-champ", seed) for seed in range(3))

    def champion() -> str:
        return str(client.get_model_version_by_alias("clip-champ", CHAMPION).version)

    # no metric configured and no flag: nothing moves, there is no champion
    assert not promote("clip-champ", v1)
    with pytest.raises(mlflow.exceptions.MlflowException):
        champion()
    # the first version with a metric becomes champion
    assert promote("clip-champ", v1, metric="val/loss", value=2.0)
    assert champion() == v1
    # a worse loss leaves it; a better one moves it
    assert not promote("clip-champ", v2, metric="val/loss", value=2.5)
    assert champion() == v1
    assert promote("clip-champ", v3, metric="val/loss", value=1.5)
    assert champion() == v3
    # maximize: a higher accuracy wins
    assert promote("clip-champ", v2, metric="digits/acc1", value=0.4, goal="maximize")
    assert not promote("clip-champ", v1, metric="digits/acc1", value=0.3, goal="maximize")
    assert champion() == v2
    # the explicit flag promotes whatever the metric says
    assert promote("clip-champ", v1, metric="val/loss", value=9.0, force=True)
    assert champion() == v1
    with pytest.raises(ValueError, match="minimize"):
        promote("clip-champ", v1, metric="val/loss", value=1.0, goal="lower")


def test_a_models_uri_is_fetched_once_and_loads_the_same_weights(mlflow_tmp, tmp_path):
    version = register("clip-fetch", seed=4)
    promote("clip-fetch", version, force=True)
    fetched = fetch_registered_model("models:/clip-fetch@champion", cache=tmp_path / "cache")
    assert (fetched.name, fetched.version) == ("clip-fetch", version)
    assert fetched.run_id and fetched.model_id
    clip = load_clip(fetched.weights)
    assert clip.model_id == model_digest(micro_clip(seed=4))
    # the same version again: the cached copy, not a second download
    again = fetch_registered_model(f"models:/clip-fetch/{version}", cache=tmp_path / "cache")
    assert again.weights == fetched.weights

    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        fetch_registered_model("models:/clip-fetch", cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="not in the registry"):
        fetch_registered_model("models:/clip-fetch@nobody", cache=tmp_path / "cache")


def test_system_metrics_are_logged_even_for_a_run_shorter_than_one_interval(mlflow_tmp):
    with stage_run("train") as run:
        with system_metrics(run.info.run_id, interval=3600):
            pass
    metrics = MlflowClient(mlflow_tmp).get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


@pytest.mark.slow  # two flows, a sample web (~1 min on 2 busy cores)
def test_evaluate_and_index_take_a_registry_uri_and_the_evaluation_is_linked_to_the_version(
    prefect_harness, mlflow_tmp, tmp_path, monkeypatch
):
    from flows.evaluate import evaluate
    from flows.index import index
    from tasks.sample_web import generate_sample_web
    from tests.test_train import write_shapes

    monkeypatch.setenv("CLIP_PIPELINE_CACHE", str(tmp_path / "cache"))
    version = register("clip-eval", seed=5)
    promote("clip-eval", version, force=True)
    web = tmp_path / "web"
    generate_sample_web(web, n_scenes=50, n_digits=50, n_eval_per_class=2, n_retrieval=5)

    result = evaluate(
        checkpoint="models:/clip-eval@champion",
        suite=str(ROOT / "configs/eval/sample.yaml"),
        root=str(web),
        tasks=["digits"],
        output=str(tmp_path / "eval"),
    )
    client = MlflowClient(mlflow_tmp)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["registered_model.name"] == "clip-eval"
    assert run.data.tags["registered_model.version"] == version
    assert run.data.params["checkpoint"] == "models:/clip-eval@champion"
    fetched = fetch_registered_model("models:/clip-eval@champion")
    assert [m.model_id for m in run.inputs.model_inputs] == [fetched.model_id]
    mv = client.get_model_version("clip-eval", version)
    assert mv.tags["evaluation.sample"] == run.info.run_id
    logged = client.get_logged_model(fetched.model_id)
    scores = {m.key: m.value for m in logged.metrics}
    assert scores["digits/acc1"] == result.metrics["digits"]["acc1"]

    shapes = write_shapes(tmp_path / "shapes", [12, 12])
    built = index(
        checkpoint="models:/clip-eval@champion", data=shapes, output=str(tmp_path / "index")
    )
    assert built.vectors == 24 and built.model_id == load_clip(fetched.weights).model_id


def test_every_parameter_name_a_config_can_hold_is_logged(mlflow_tmp):
    """A profile's goals name metrics such as `retrieval/image_retrieval_recall@5`: MLflow refuses
    '@' in a parameter name, and `make sample` died logging its own profile."""
    params = {"goals": {"metrics": {"retrieval/image_retrieval_recall@5": 0.9, "a b+c": 1}}}
    with stage_run("pipeline", params=params) as run:
        pass
    logged = MlflowClient(mlflow_tmp).get_run(run.info.run_id).data.params
    assert logged == {
        "goals.metrics.retrieval/image_retrieval_recall_5": "0.9",
        "goals.metrics.a b_c": "1",
    }
