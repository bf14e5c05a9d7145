"""`clip_pipeline` end to end in-process: the Prefect test harness, a temporary SQLite MLflow, a
reduced sample web. Lineage, reuse of unchanged stages, bad profiles and a failing stage."""

from __future__ import annotations

import socket

import mlflow
import pytest

from storage import open_dataset
from storage.tracking import tracking_uri
from tasks.pipeline import PipelineConfig, ProfileError, load_profile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()  # one fixed port for the module: the URL list, and so the crawl, stay the same


def micro(tmp_path, **overrides) -> PipelineConfig:
    settings = {"data_root": str(tmp_path / "data"), "sample_web.port": PORT, **overrides}
    return load_profile("micro", settings)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_harness, session_mlflow):
    from flows.pipeline import clip_pipeline

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = micro(tmp)
    return tmp, cfg, clip_pipeline(config=cfg)


def runs_of(parent_id: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri())
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {"pipeline": parent, **{r.data.tags["stage"]: r for r in children}}


def test_parent_run_with_a_child_per_stage_and_headline_metrics(first_run):
    _, _, result = first_run
    runs = runs_of(result.mlflow_run_id)
    assert set(runs) == {"pipeline", "ingest", "curate", "train", "evaluate"}
    parent = runs["pipeline"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    for key in ("ingest/samples", "curate/kept", "digits/acc1", "colors/acc1", "shapes/acc1"):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["curate/kept"] == result.headline["curate/kept"] > 0
    for stage in ("ingest", "curate", "train", "evaluate"):
        assert runs[stage].data.metrics, f"{stage} logged no metrics"


def test_stage_datasets_are_logged_as_lineage(first_run):
    _, _, result = first_run
    runs = runs_of(result.mlflow_run_id)

    def digests(run, context):
        return {
            {t.key: t.value for t in d.tags}["manifest_digest"]
            for d in run.inputs.dataset_inputs
            if {t.key: t.value for t in d.tags}["mlflow.data.context"] == context
        }

    crawl = digests(runs["ingest"], "output")
    assert crawl and digests(runs["curate"], "input") == crawl
    curated = digests(runs["curate"], "output")
    assert curated and digests(runs["train"], "input") == curated


def test_rerun_reuses_every_stage(first_run, prefect_harness, session_mlflow):
    from flows.pipeline import clip_pipeline

    tmp, cfg, result = first_run
    again = clip_pipeline(config=cfg)
    assert again.reused == ["ingest", "curate", "train", "evaluate"]
    assert again.checkpoint == result.checkpoint and again.metrics == result.metrics


def test_changed_training_parameter_reruns_train_and_evaluate_only(
    first_run, prefect_harness, session_mlflow
):
    from flows.pipeline import clip_pipeline

    tmp, cfg, result = first_run
    changed = micro(tmp, **{"train.settings.max_steps": 20})
    again = clip_pipeline(config=changed)
    assert again.reused == ["ingest", "curate"]
    assert "train" not in again.reused and "evaluate" not in again.reused
    assert again.checkpoint != result.checkpoint or again.metrics != result.metrics


def test_unknown_or_mistyped_profile_field_is_named(tmp_path):
    with pytest.raises(ProfileError, match=r"curate\.filterz: Extra inputs are not permitted"):
        micro(tmp_path, **{"curate.filterz": "x"})
    with pytest.raises(
        ProfileError, match=r"ingest\.crawl\.image_size: Input should be a valid integer"
    ):
        micro(tmp_path, **{"ingest.crawl.image_size": "big"})
    with pytest.raises(ProfileError, match="no pipeline profile 'nope'"):
        load_profile("nope")


def test_bad_stage_config_fails_before_any_stage_runs(tmp_path, prefect_harness, mlflow_tmp):
    from flows.pipeline import clip_pipeline

    cfg = micro(tmp_path, **{"train.settings.learning_rate": 0.1})
    with pytest.raises(ValueError, match="learning_rate"):
        clip_pipeline(config=cfg)
    assert not (tmp_path / "data").exists()


def test_failed_stage_marks_the_parent_failed_and_a_rerun_resumes_there(
    tmp_path, prefect_harness, mlflow_tmp
):
    from flows.pipeline import clip_pipeline

    broken = micro(tmp_path, **{"train.settings.resume": str(tmp_path / "no-such.ckpt")})
    with pytest.raises(Exception, match="no-such.ckpt"):
        clip_pipeline(config=broken)
    client = mlflow.MlflowClient(mlflow_tmp)
    experiment = client.get_experiment_by_name("clip-pipeline")
    failed = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'pipeline'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert (tmp_path / "data" / "curate" / "micro" / "manifest.json").exists()  # kept

    fixed = broken.model_copy(deep=True)
    fixed.train.settings.pop("resume")
    result = clip_pipeline(config=fixed)
    assert result.reused == ["ingest", "curate"]


def test_goal_line_compares_each_goal_with_the_run():
    from tasks.pipeline import GoalsSection, goal_line

    goals = GoalsSection(
        metrics={
            "digits/acc1": 0.85,
            "retrieval/image_retrieval_recall@5": 0.9,
            "shapes/acc1": 0.85,
        },
        wall_minutes=10,
    )
    metrics = {
        "digits/acc1": {},
        "digits": {"acc1": 0.9},
        "retrieval": {"image_retrieval_recall@5": 0.5},
    }
    line = goal_line(goals, metrics, wall_seconds=9 * 60 + 5)
    assert line == (
        "Goals: 2 of 4 met: digits/acc1 0.900 >= 0.85 ok; "
        "retrieval/image_retrieval_recall@5 0.500 < 0.9 MISSED; "
        "shapes/acc1 not measured (goal >= 0.85) MISSED; wall 9m05s <= 10 min ok"
    )
    assert goal_line(goals, metrics, wall_seconds=601).endswith("wall 10m01s > 10 min MISSED")


def test_tiny_profile_states_the_goals_and_a_bad_goal_is_named(tmp_path):
    goals = load_profile("tiny").goals
    assert goals is not None and goals.wall_minutes == 10
    assert goals.metrics["digits/acc1"] == 0.85 and goals.metrics["colors/acc1"] == 0.95
    with pytest.raises(ProfileError, match=r"goals\.metrics.*'acc1': expected '<task>/<metric>'"):
        micro(tmp_path, **{"goals.metrics": {"acc1": 0.5}})


def first_step_loss(checkpoint: str) -> float:
    import json
    from pathlib import Path

    run_dir = Path(checkpoint).parent.parent  # <run>/checkpoints/last.ckpt
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    return first["train/loss"]


@pytest.mark.slow
def test_two_fresh_runs_give_the_same_curated_dataset_and_first_step(
    tmp_path, prefect_harness, mlflow_tmp
):
    """The crawl's threads finish samples in any order and stamp them with the clock; the shards
    are committed in key order with fixed headers, so the same inputs give the same datasets."""
    from flows.pipeline import clip_pipeline

    cfg = micro(tmp_path, **{"train.settings.max_steps": 1})  # the first step is what we compare
    seen = []
    for attempt in (1, 2):
        result = clip_pipeline(config=cfg)
        assert result.reused == []
        seen.append(
            (
                open_dataset(result.dataset).digest,
                open_dataset(result.curated).digest,
                first_step_loss(result.checkpoint),
            )
        )
        (tmp_path / "data").rename(tmp_path / f"data-{attempt}")  # the next run starts fresh
    assert seen[0] == seen[1]
