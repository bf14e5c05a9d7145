"""The `sweep` flow: config checks, pruning from inside a training process, and a micro sweep with
real training, a real SQLite MLflow and Prefect: parent and child runs, a pruned trial, a sweep
killed mid-trial and resumed, the best model registered as @candidate.

configs/sweep/micro.yaml prunes deterministically (see its header): the trials whose
val_every_n_steps is 4 report during training and are pruned at step 4, the others complete.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from storage import DatasetWriter

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "configs" / "sweep" / "micro.yaml"
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")


def shapes_dataset(path: Path, n: int = 160, seed: int = 0) -> str:
    """Coloured shapes captioned "a red circle", in two shards written by storage's own writer."""
    rng = random.Random(seed)
    with DatasetWriter(str(path), stage="test", samples_per_shard=n // 2) as writer:
        for i in range(n):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            image = Image.new("RGB", (40, 40), (240, 240, 240))
            r, x, y = rng.randint(8, 14), rng.randint(14, 26), rng.randint(14, 26)
            box = (x - r, y - r, x + r, y + r)
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
            out = io.BytesIO()
            image.save(out, "JPEG", quality=90)
            writer.write(f"s{i:05d}", out.getvalue(), f"a {color} {shape}")
    return str(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    return shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds")


def sweep_yaml(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(MICRO.read_text())
    data["train"] = str(ROOT / data["train"])
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- config: everything checked before anything starts -----------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"lrr": [0.1]}}, "space.lrr"),
        ({"trails": 3}, "trails"),
        ({"space": {"out_dir": ["x"]}}, "space.out_dir: set by the sweep"),
        ({"settings": {"mlflow": {"enabled": False}}}, "settings.mlflow.enabled: set by the sweep"),
        ({"space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, "grid needs a list"),
        ({"space": {"lr": [0.0]}}, "space.lr=0.0: lr: Input should be greater than 0"),
        (
            {"space": {"model_overrides.vision_patch_size": [7]}},
            "space.model_overrides.vision_patch_size=7",
        ),
        ({"objective": {"metric": "digits/acc1"}}, "direction: say minimize or maximize"),
        (
            {"objective": {"metric": "digits/acc1", "direction": "maximize"}},
            "set settings.eval",
        ),
        ({"pruner": {"name": "medain"}}, "pruner 'medain': expected one of"),
        ({"pruner": {"name": "median", "args": {"n_startup": 1}}}, "MedianPruner"),
        ({"sampler": "tpe", "trials": None}, "trials: how many trials"),
        ({"sampler": "tpe", "sampler_args": {"n_startup": 2}}, "sampler_args"),
        (
            {"settings": {"eval": {"suite": "sample", "root": "web", "tasks": ["digitz"]}}},
            "has no task ['digitz']",
        ),
    ],
)
def test_bad_sweep_configs_are_refused_naming_the_key(tmp_path, shapes, change, expected):
    from tasks.sweep_config import SweepConfigError, load_sweep, validate_sweep

    path = sweep_yaml(tmp_path, data=shapes, **change)
    with pytest.raises(SweepConfigError) as error:
        validate_sweep(load_sweep(str(path)))
    assert expected in str(error.value)
    assert str(path) in str(error.value) or "space." in str(error.value)


def refused(*args: str, cwd: Path) -> str:
    """The one `error: ...` line `python -m flows.sweep ARGS` prints, exit status 2."""
    p = subprocess.run(
        [sys.executable, "-m", "flows.sweep", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_the_cli_refuses_a_bad_config_before_starting_anything(tmp_path, shapes):
    path = str(sweep_yaml(tmp_path, data=shapes))
    line = refused("--config", path, "--set", "space.warmup_steps=[-1]", cwd=tmp_path)
    assert line.startswith("error: --set space.warmup_steps=[-1]: -1: warmup_steps: ")
    assert "greater than or equal to 0" in line
    # a space key below a section, as --set spells it
    line = refused(
        "--config", path, "--set", "space.model_overrides.vision_patch_size=[7]", cwd=tmp_path
    )
    assert "space.model_overrides.vision_patch_size=[7]" in line
    assert "image_size=32 is not divisible by vision_patch_size=7" in line
    line = refused("--config", path, "--data", str(tmp_path / "none"), cwd=tmp_path)
    assert line.startswith("error: --data ") and "none" in line
    assert not (tmp_path / "data").exists()  # no sweep folder, no study


def test_committed_sweep_configs_validate(shapes):
    from tasks.sweep_config import load_sweep, validate_sweep

    for name in ("micro", "tiny"):
        spec = load_sweep(name, [f"data={shapes}"])
        validate_sweep(spec)
    tiny = load_sweep("tiny", [f"data={shapes}"])
    assert tiny.sampler == "tpe" and tiny.trials == 20 and tiny.pruner.name != "none"


def test_one_sweep_at_a_time_in_a_folder(tmp_path):
    from tasks.sweep import sweep_lock

    with sweep_lock(str(tmp_path)):
        with pytest.raises(RuntimeError, match="a sweep is already running there"):
            with sweep_lock(str(tmp_path)):
                pass
    with sweep_lock(str(tmp_path)):  # released with its holder
        pass


# ---- the training side: report, prune, stop ------------------------------------------------------


@pytest.mark.slow
def test_a_training_process_reports_to_its_trial_and_stops_when_pruned(tmp_path, shapes):
    import optuna

    from clip_model.study import open_storage
    from clip_model.train import load_config, train
    from tasks.sweep_config import dotted, load_sweep

    spec = load_sweep(str(MICRO))
    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(journal))
    numbers = [study.ask().number, study.ask().number]

    def config(number: int, pruner: str, args: dict):
        items = {
            "data": shapes,
            **dotted(spec.settings),
            "val_every_n_steps": 4,
            "out_dir": str(tmp_path / f"t{number}"),
            "mlflow.enabled": False,
            "optuna": {
                "storage": journal,
                "study": "s",
                "trial": number,
                "metric": "val/loss",
                "pruner": pruner,
                "pruner_args": args,
            },
        }
        return load_config(spec.train, [f"{k}={json.dumps(v)}" for k, v in items.items()])

    with pytest.raises(optuna.TrialPruned):
        train(config(numbers[0], "threshold", {"upper": 0.0}))
    marker = json.loads((tmp_path / f"t{numbers[0]}" / "pruned.json").read_text())
    assert marker["step"] == 4 and marker["value"] > 0
    assert not (tmp_path / f"t{numbers[0]}" / "final_metrics.json").exists()  # it stopped there

    result = train(config(numbers[1], "none", {}))  # never pruned: reports at 4 and 8, completes
    assert result["global_step"] == 8

    reported = {t.number: t.intermediate_values for t in study.get_trials()}
    assert list(reported[numbers[0]]) == [4] and reported[numbers[0]][4] == marker["value"]
    assert list(reported[numbers[1]]) == [4, 8]


def test_a_trial_refuses_to_report_to_a_missing_trial(tmp_path, shapes):
    import optuna

    from clip_model.pruning import OptunaPruning
    from clip_model.study import open_storage

    journal = str(tmp_path / "study.journal")
    optuna.create_study(study_name="s", storage=open_storage(journal))
    callback = OptunaPruning(
        storage=journal, study="s", trial=5, metric="val/loss", marker=str(tmp_path / "p.json")
    )
    with pytest.raises(ValueError, match="no trial 5 of study 's'"):
        callback._open_trial()


# ---- the flow: a micro sweep killed mid-trial, resumed, compared, registered ---------------------


def study_trials(journal: Path) -> list:
    import optuna

    from clip_model.study import open_storage

    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name="micro", storage=open_storage(str(journal))).trials
    except KeyError:  # not created yet
        return []


def start_sweep_process(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m flows.sweep` in its own process group, on the test's Prefect API and MLflow."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),  # the session's test harness server
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "flows.sweep", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its trainers too: the kill below takes the whole group
    )


@pytest.mark.slow
def test_micro_sweep_prunes_survives_a_kill_resumes_and_registers_the_best(
    prefect_harness, mlflow_tmp, tmp_path, shapes
):
    import mlflow
    from optuna.trial import TrialState

    from flows.sweep import sweep

    out = tmp_path / "sweep"
    journal = out / "study.journal"
    args = ["--config", str(MICRO), "--data", shapes, "--out", str(out)]

    # 1. a sweep killed (SIGKILL, the whole process group) while its second trial trains
    log = tmp_path / "first.log"
    proc = start_sweep_process(args, log)
    deadline = time.monotonic() + 600
    try:
        while True:
            trials = study_trials(journal)
            finished = [t for t in trials if t.state.is_finished()]
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            # kill it mid-training: the running trial has taken steps
            if (
                finished
                and running
                and (out / "trials" / f"{running[0]:04d}" / "metrics.jsonl").exists()
            ):
                break
            assert proc.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: t for t in study_trials(journal)}
    done_before = {n: t for n, t in before.items() if t.state.is_finished()}
    killed = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert len(done_before) == 1 and len(killed) == 1

    # 2. the same sweep again: it continues the study
    result = sweep(config=str(MICRO), data=shapes, out_dir=str(out))
    after = {t.number: t for t in study_trials(journal)}
    for number, trial in done_before.items():  # finished trials are kept, not rerun
        assert after[number].state == trial.state
        assert after[number].datetime_complete == trial.datetime_complete
    assert after[killed[0]].state == TrialState.FAIL  # the interrupted one, queued again
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].params == before[killed[0]].params
    finished = [t for t in after.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    # pruned exactly when it validated during training (see configs/sweep/micro.yaml)
    for t in finished:
        early = t.params["val_every_n_steps"] == 4
        assert t.state == (TrialState.PRUNED if early else TrialState.COMPLETE), t
        assert list(t.intermediate_values) == ([4] if early else [])
    assert result.trials == {
        "COMPLETE": sum(t.state == TrialState.COMPLETE for t in finished),
        "PRUNED": sum(t.state == TrialState.PRUNED for t in finished),
        "FAIL": 1,
    }
    assert {"COMPLETE", "PRUNED"} <= set(result.trials)

    # MLflow: one parent (reopened, not duplicated), a child per trial with params and objective
    client = mlflow.MlflowClient(mlflow_tmp)
    parents = client.search_runs(
        [client.get_experiment_by_name("clip-pipeline").experiment_id],
        filter_string="tags.stage = 'sweep'",
    )
    assert [p.info.run_id for p in parents] == [result.mlflow_parent_run_id]
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    by_trial = {}
    for child in children:
        by_trial.setdefault(int(child.data.tags["sweep.trial"]), []).append(child)
    assert sorted(by_trial) == sorted(after)  # every trial, the killed one included, once
    assert all(len(runs) == 1 for runs in by_trial.values())
    for number, (child,) in by_trial.items():
        trial = after[number]
        state = "INTERRUPTED" if number == killed[0] else trial.state.name
        assert child.data.tags["sweep.state"] == state
        assert child.info.status == ("FINISHED" if state == "COMPLETE" else "KILLED")
        for key, value in trial.params.items():  # parallel coordinates: params and objective
            assert json.loads(child.data.params[key]) == value
        if state in ("COMPLETE", "PRUNED"):
            assert child.data.metrics["sweep/objective"] == pytest.approx(
                trial.value if state == "COMPLETE" else trial.intermediate_values[4]
            )
    # the parent carries the comparison
    best = min((t for t in finished if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert parent.data.metrics["best/objective"] == pytest.approx(best.value)
    assert parent.data.tags["sweep.best_trial"] == str(best.number)
    board = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id,
                artifact_path="leaderboard.json",
                dst_path=str(tmp_path / "dl"),
            )
        ).read_text()
    )
    assert [r["trial"] for r in board["rows"]][0] == best.number
    assert [r["trial"] for r in board["rows"]] == [r["trial"] for r in result.leaderboard]
    history = client.get_metric_history(parent.info.run_id, "trial/objective")
    assert sorted(m.step for m in history) == sorted(t.number for t in finished)

    # the best trial's model registered, alias candidate
    version = client.get_model_version_by_alias("clip-micro", "candidate")
    assert version.tags["sweep.trial"] == str(best.number)
    assert version.tags["sweep.run_id"] == by_trial[best.number][0].info.run_id
    assert result.registered == {
        "name": "clip-micro",
        "version": int(version.version),
        "alias": "candidate",
    }

    # 3. once more: nothing left to run; nothing new registered
    again = sweep(config=str(MICRO), data=shapes, out_dir=str(out))
    assert len(study_trials(journal)) == len(after)
    assert again.registered == result.registered
