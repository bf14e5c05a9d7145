"""The evaluate flow and the zero-shot callback, end to end on a tiny CLIP.

The data: a small sample web's held-out set (digits, colours, shapes, retrieval). The model: a
small random CLIP in this project's export format (`{"state_dict", "model_config"}`, its trained
BPE `tokenizer.json` beside it), also saved the way a training run saves it (`step-N.ckpt`) and,
for the foreign format, OpenCLIP's tiny ResNet fixture. Random weights keep the test quick and
change nothing checked here: metric names and values as recorded, files, skips and errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from clip_model import CheckpointError, ModelConfig, create_model, to_state_dict, train_tokenizer
from clip_model.embedder import Embedder
from clip_model.eval_callback import ZeroShotEvalCallback, loggable_metrics, quick_suite
from clip_model.eval_data import EvalDataError
from clip_model.eval_suite import EvalSuiteError, load_suite
from clip_model.evaluate import flat_metrics, run_suite
from flows.evaluate import evaluate
from storage import OutputError
from tasks.evaluate import INDEX_NAME, format_results_table, mlflow_metrics

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(
    embed_dim=32, vision_layers=2, vision_width=64, text_width=64, text_layers=2, text_heads=2
)
CLASSIFICATION = ("digits", "colors", "shapes")
PNG = b"\x89PNG\r\n\x1a\n"


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Path:
    """A small sample web; its held-out set is web/eval."""
    from tasks.sample_web import generate_sample_web

    out = tmp_path_factory.mktemp("eval-web")
    generate_sample_web(out, n_scenes=60, n_digits=60, n_eval_per_class=6, n_retrieval=20)
    return out


@pytest.fixture(scope="module")
def suite(web, tmp_path_factory) -> Path:
    """configs/eval/sample.yaml with a 2-value C grid for the probe (its 13 values cost seconds)."""
    data = yaml.safe_load((ROOT / "configs/eval/sample.yaml").read_text())
    for task in data["tasks"]:
        if task["type"] == "linear_probe":
            task["cs"] = [0.1, 10.0]
    path = tmp_path_factory.mktemp("suite") / "sample.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def eval_captions(web: Path) -> list[str]:
    captions = []
    for line in (web / "eval/retrieval/captions.jsonl").read_text().splitlines():
        captions.extend(json.loads(line)["captions"])
    for task in CLASSIFICATION:
        names = (web / "eval" / task / "classnames.txt").read_text().split("\n")
        templates = (web / "eval" / task / "templates.txt").read_text().split("\n")
        captions.extend(t.replace("{c}", c) for t in templates if t for c in names if c)
    return captions


def small_model(tokenizer_vocab: int, seed: int) -> torch.nn.Module:
    config = ModelConfig.load("tiny").model_copy(update={**SMALL, "vocab_size": tokenizer_vocab})
    torch.manual_seed(seed)
    return create_model(config)


def export(model: torch.nn.Module, path: Path) -> Path:
    """This project's export format, as clip_model.pyfunc writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": to_state_dict(model), "model_config": model.config.model_dump()}, path
    )
    return path


@pytest.fixture(scope="module")
def exported(web, tmp_path_factory) -> Path:
    """model.pt (export format) with the BPE it was built for in tokenizer.json beside it."""
    folder = tmp_path_factory.mktemp("exported")
    tokenizer = train_tokenizer(eval_captions(web), 400, folder / "tokenizer.json", min_frequency=1)
    return export(small_model(tokenizer.vocab_size, seed=0), folder / "model.pt")


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


# ---- the flow ---------------------------------------------------------------------------------


def test_flow_evaluates_a_tiny_model_into_mlflow_files_and_a_prefect_table(
    prefect_harness, mlflow_tmp, web, suite, exported, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out = tmp_path / "out"
    result = evaluate(checkpoint=str(exported), suite=str(suite), root=str(web), output=str(out))

    assert not result.skipped
    assert list(result.metrics) == [*CLASSIFICATION, "retrieval", "digits_probe"]  # suite order
    for task in CLASSIFICATION:
        assert set(result.metrics[task]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(result.metrics["retrieval"]) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
    }
    assert set(result.metrics["digits_probe"]) == {"acc1", "C"}
    assert result.metrics["digits_probe"]["C"] in (0.1, 10.0)
    for values in result.metrics.values():
        assert all(0.0 <= v <= 1.0 for k, v in values.items() if k != "C")

    # the results JSON: each task's full result; acc1 is the confusion matrix's diagonal share
    document = json.loads(Path(result.results_json).read_text())
    assert document["checkpoint_sha256"] and document["key"] == result.key
    digits = document["tasks"]["digits"]
    confusion = torch.tensor(digits["confusion"])
    assert confusion.sum() == digits["num_images"] == 60  # 6 per class, 10 classes
    assert confusion.trace() / confusion.sum() == pytest.approx(result.metrics["digits"]["acc1"])
    assert len(document["tasks"]["retrieval"]["examples"]) == 8

    # plots: a confusion matrix per classification task, a grid of retrieval examples
    names = sorted(Path(p).name for p in result.plots)
    assert names == sorted(
        [f"confusion_{t}.png" for t in CLASSIFICATION] + ["retrieval_retrieval.png"]
    )
    for plot in result.plots:
        assert Path(plot).read_bytes()[:8] == PNG

    # MLflow: the stage run, `<task>/<metric>` metrics ("@" spelt "_at_"), the files as artifacts
    client = MlflowClient(mlflow_tmp)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["stage"] == "evaluate"
    assert run.data.metrics["digits/acc1"] == pytest.approx(result.metrics["digits"]["acc1"])
    assert set(run.data.metrics) == set(mlflow_metrics(result.metrics))
    assert len(run.data.metrics) == 3 * 3 + 6 + 2
    assert {"shapes/mean_per_class_recall", "retrieval/text_retrieval_recall_at_10"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["retrieval/image_retrieval_recall_at_5"] == pytest.approx(
        result.metrics["retrieval"]["image_retrieval_recall@5"]
    )
    assert run.data.params["suite_name"] == "sample"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "results.json" in artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"plots/{n}" for n in names}
    local = Path(client.download_artifacts(run.info.run_id, "plots/confusion_digits.png"))
    assert local.read_bytes()[:8] == PNG

    # the Prefect table artifact: task, metric, value
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluate-sample"]))
        )
    table = found[-1].data
    rows = json.loads(table) if isinstance(table, str) else table
    values = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert values[("digits", "acc1")] == pytest.approx(result.metrics["digits"]["acc1"], abs=1e-6)
    assert len(rows) == sum(len(v) for v in result.metrics.values())

    # the index of runs, keyed by their inputs
    index = json.loads((out / INDEX_NAME).read_text())
    assert list(index["runs"]) == [result.key]


def test_rerun_with_the_same_checkpoint_content_returns_the_recorded_result(
    prefect_harness, mlflow_tmp, web, suite, exported, tmp_path
):
    out = str(tmp_path / "out")
    common = dict(suite=str(suite), root=str(web), output=out, tasks=["digits"])
    first = evaluate(checkpoint=str(exported), **common)
    assert not first.skipped and len(runs(mlflow_tmp)) == 1

    # the same bytes under another name: the key is the content, not the path
    copy = tmp_path / "renamed" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(exported, copy)
    shutil.copy(exported.with_name("tokenizer.json"), copy.with_name("tokenizer.json"))
    again = evaluate(checkpoint=str(copy), **common)
    assert again.skipped
    assert again.metrics == first.metrics
    assert again.mlflow_run_id == first.mlflow_run_id
    assert again.results_json == first.results_json
    assert len(runs(mlflow_tmp)) == 1  # nothing logged, nothing recomputed

    # another task list, another model or --force: computed again
    forced = evaluate(checkpoint=str(exported), force=True, **common)
    assert not forced.skipped and forced.mlflow_run_id != first.mlflow_run_id
    assert forced.metrics == first.metrics  # deterministic
    other = export(small_model(400, seed=1), tmp_path / "other" / "model.pt")
    shutil.copy(exported.with_name("tokenizer.json"), other.with_name("tokenizer.json"))
    changed = evaluate(checkpoint=str(other), **common)
    assert not changed.skipped and changed.key != first.key
    index = json.loads((Path(out) / INDEX_NAME).read_text())
    assert set(index["runs"]) == {first.key, changed.key}
    assert len(runs(mlflow_tmp)) == 3


def test_an_output_from_before_output_records_is_kept_and_force_replaces_a_foreign_one(
    prefect_harness, mlflow_tmp, web, suite, exported, tmp_path
):
    """An OUTPUT evaluate wrote before outputs carried `.output.json` (only its results.json)
    is this stage's: evaluated into without --force, its entries kept. A folder holding anything
    else is refused naming --force, and --force replaces it."""
    common = dict(checkpoint=str(exported), suite=str(suite), root=str(web), tasks=["digits"])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    earlier = {"format": "clip-eval-results/1", "runs": {"0" * 64: {"results_json": "x.json"}}}
    (legacy / INDEX_NAME).write_text(json.dumps(earlier))
    result = evaluate(output=str(legacy), **common)
    assert not result.skipped
    index = json.loads((legacy / INDEX_NAME).read_text())
    assert set(index["runs"]) == {"0" * 64, result.key}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not an evaluation")
    with pytest.raises(OutputError, match="--force"):
        evaluate(output=str(foreign), **common)
    assert (foreign / "notes.txt").is_file()
    forced = evaluate(output=str(foreign), force=True, **common)
    assert not (foreign / "notes.txt").exists()
    assert list(json.loads((foreign / INDEX_NAME).read_text())["runs"]) == [forced.key]


def test_a_training_runs_lightning_checkpoint_is_read_with_the_runs_tokenizer(
    prefect_harness, mlflow_tmp, web, suite, exported, tmp_path
):
    from clip_model.lightning_module import ClipLightningModule

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(exported.with_name("tokenizer.json"), run / "tokenizer.json")
    config = ModelConfig.load("tiny").model_copy(update={**SMALL, "vocab_size": 400})
    module = ClipLightningModule(model=config)
    path = run / "checkpoints" / "step-00000010.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)

    result = evaluate(
        checkpoint=str(path),
        suite=str(suite),
        root=str(web),
        output=str(tmp_path / "out"),
        tasks=["shapes"],
    )
    assert list(result.metrics) == ["shapes"]
    run_params = MlflowClient(mlflow_tmp).get_run(result.mlflow_run_id).data.params
    assert run_params["tokenizer"] == str(run / "tokenizer.json")


def test_an_openclip_state_dict_is_evaluated_with_openais_tokenizer(
    prefect_harness, mlflow_tmp, web, suite, tmp_path
):
    result = evaluate(
        checkpoint=str(FIXTURES / "openclip/rn_tiny/state_dict.pt"),
        model=str(FIXTURES / "openclip/rn_tiny/config.json"),  # a bare state dict: say which
        suite=str(suite),
        root=str(web),
        output=str(tmp_path / "out"),
        tasks=["colors"],
        precision="bf16",
    )
    assert set(result.metrics["colors"]) == {"acc1", "acc5", "mean_per_class_recall"}
    params = MlflowClient(mlflow_tmp).get_run(result.mlflow_run_id).data.params
    assert params["tokenizer"] == "openai" and params["precision"] == "bf16"


# ---- bad input ------------------------------------------------------------------------------


@pytest.fixture
def digits_only(web, tmp_path) -> tuple[Path, Path]:
    """(a copy of the digits set, a one-task suite reading it from {root}/eval/digits)."""
    root = tmp_path / "root"
    shutil.copytree(web / "eval" / "digits", root / "eval" / "digits")
    suite = tmp_path / "digits.yaml"
    suite.write_text(
        "name: digits\ntasks:\n  - name: digits\n    type: classification\n"
        '    dataset: "{root}/eval/digits"\n    format: sample\n'
    )
    return root, suite


def test_a_file_that_is_not_a_clip_checkpoint_is_refused_naming_it(
    prefect_harness, mlflow_tmp, digits_only, tmp_path
):
    root, suite = digits_only
    not_clip = tmp_path / "resnet_classifier.pt"
    torch.save({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, not_clip)
    with pytest.raises(CheckpointError, match=r"resnet_classifier\.pt.*not a CLIP checkpoint"):
        evaluate(checkpoint=str(not_clip), suite=str(suite), root=str(root))
    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("these are my notes, not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt.*not a CLIP checkpoint"):
        evaluate(checkpoint=str(garbage), suite=str(suite), root=str(root))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        evaluate(checkpoint=str(tmp_path / "missing.pt"), suite=str(suite), root=str(root))
    assert runs(mlflow_tmp) == []


def test_templates_without_the_class_placeholder_are_refused_naming_the_file(
    prefect_harness, mlflow_tmp, digits_only, exported, tmp_path
):
    root, suite = digits_only
    templates = root / "eval" / "digits" / "templates.txt"
    templates.write_text("a photo of the digit {c}.\na handwritten digit.\n")
    with pytest.raises(EvalDataError, match=r"templates\.txt.*'a handwritten digit\.'.*\{c\}"):
        evaluate(checkpoint=str(exported), suite=str(suite), root=str(root))

    # the same mistake in a suite's own templates names the suite file
    override = tmp_path / "override.yaml"
    override.write_text(suite.read_text() + '    templates: ["a photo of a digit."]\n')
    with pytest.raises(EvalSuiteError, match=r"(?s)override\.yaml.*\{c\}"):
        evaluate(checkpoint=str(exported), suite=str(override), root=str(root))
    assert runs(mlflow_tmp) == []


def test_a_missing_or_empty_class_folder_is_refused_before_any_work(
    prefect_harness, mlflow_tmp, digits_only, exported
):
    root, suite = digits_only
    digits = root / "eval" / "digits"
    for image in (digits / "seven").iterdir():
        image.unlink()
    with pytest.raises(EvalDataError, match=r"digits/seven: class folder has no images"):
        evaluate(checkpoint=str(exported), suite=str(suite), root=str(root))
    (digits / "seven").rmdir()  # classnames.txt still lists it
    with pytest.raises(EvalDataError, match=r"classnames\.txt.*without a folder: \['seven'\]"):
        evaluate(checkpoint=str(exported), suite=str(suite), root=str(root))
    with pytest.raises(ValueError, match=r"no task \['birds'\]; it has \['digits'\]"):
        evaluate(checkpoint=str(exported), suite=str(suite), root=str(root), tasks=["birds"])
    assert runs(mlflow_tmp) == []


def test_results_table_lists_every_task_metric_and_value():
    table = format_results_table(
        {
            "digits": {"acc1": 0.5, "acc5": 1.0},
            "retrieval": {"image_retrieval_recall@1": 0.25},
            "probe": {"acc1": 0.0, "C": 1e-06},
        }
    )
    assert table.splitlines() == [
        "task       metric                     value",
        "---------  ------------------------  ------",
        "digits     acc1                      0.5000",
        "           acc5                      1.0000",
        "retrieval  image_retrieval_recall@1  0.2500",
        "probe      acc1                      0.0000",
        "           C                          1e-06",
    ]


# ---- during training ------------------------------------------------------------------------


def batches(tokenizer, captions: list[str], n: int, batch_size: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    samples = [
        {"image": torch.randn(3, 64, 64, generator=g), "text": tokenizer([c])[0]}
        for c in (captions * n)[:n]
    ]
    return torch.utils.data.DataLoader(samples, batch_size=batch_size)


def trainer(max_steps: int, callback, logger=False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[callback],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def test_callback_logs_the_suites_metrics_to_the_training_run_every_n_steps(
    mlflow_tmp, web, suite, exported
):
    from lightning.pytorch.loggers import MLFlowLogger

    from clip_model.lightning_module import ClipLightningModule
    from clip_model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(exported.with_name("tokenizer.json"), context_length=32)
    config = ModelConfig.load("tiny").model_copy(update={**SMALL, "vocab_size": 400})
    torch.manual_seed(0)
    module = ClipLightningModule(model=config, warmup_steps=1)
    callback = ZeroShotEvalCallback(
        suite,
        root=web,
        every_n_steps=2,
        tasks=["digits", "retrieval"],
        max_images=12,
        tokenizer=tokenizer,
        batch_size=16,
    )
    logger = MLFlowLogger(experiment_name="train", tracking_uri=mlflow_tmp)
    trainer(3, callback, logger).fit(module, batches(tokenizer, eval_captions(web), 12, 4))

    # step 2 (every 2 steps) and step 3 (the end of training)
    assert [step for step, _ in callback.history] == [2, 3]
    client = MlflowClient(mlflow_tmp)
    history = client.get_metric_history(logger.run_id, "digits/acc1")
    assert [m.step for m in history] == [2, 3]
    recall = client.get_metric_history(logger.run_id, "retrieval/text_retrieval_recall_at_1")
    assert [m.step for m in recall] == [2, 3]
    assert "train/loss" in client.get_run(logger.run_id).data.metrics

    # what it logged at the end is what the evaluation maths give for the trained weights
    quick = quick_suite(load_suite(suite, root=web), tasks=["digits", "retrieval"], max_images=12)
    assert quick.tasks[0].max_images == 12
    embedder = Embedder(module.model, tokenizer, device=None, batch_size=16)
    expected = run_suite(embedder, quick)
    assert callback.history[-1][1] == pytest.approx(loggable_metrics(flat_metrics(expected)))
    assert history[-1].value == pytest.approx(flat_metrics(expected)["digits/acc1"])
    assert module.training is True  # evaluation put the model back into training mode


def test_callback_takes_the_tokenizer_from_the_module_and_refuses_to_start_without_one(
    web, suite, exported
):
    from clip_model.lightning_module import ClipLightningModule
    from clip_model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(exported.with_name("tokenizer.json"), context_length=32)
    config = ModelConfig.load("tiny").model_copy(update={**SMALL, "vocab_size": 400})
    data = batches(tokenizer, eval_captions(web), 4, 4)

    module = ClipLightningModule(model=config, warmup_steps=1)
    callback = ZeroShotEvalCallback(
        suite, root=web, every_n_steps=1, tasks=["shapes"], max_images=4
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer(1, callback).fit(module, data)
    assert callback.history == []  # refused at setup, before the first step

    module.tokenizer = tokenizer
    trainer(1, callback).fit(module, data)
    assert [step for step, _ in callback.history] == [1]
    assert set(callback.history[0][1]) == {
        "shapes/acc1",
        "shapes/acc5",
        "shapes/mean_per_class_recall",
    }


def test_callback_refuses_a_task_the_suite_does_not_have(web, suite):
    with pytest.raises(ValueError, match=r"no task \['birds'\]"):
        ZeroShotEvalCallback(suite, root=web, every_n_steps=10, tasks=["birds"])
    with pytest.raises(EvalSuiteError, match="missing.yaml"):
        ZeroShotEvalCallback(suite.with_name("missing.yaml"), root=web, every_n_steps=10)


def test_a_suite_preset_name_is_evaluated_as_its_shipped_file(
    prefect_harness, mlflow_tmp, web, exported, tmp_path
):
    # --help promises a preset name of configs/eval/; it died on open('sample') after loading it
    common = dict(checkpoint=str(exported), root=str(web), output=str(tmp_path / "out"))
    by_name = evaluate(suite="sample", tasks=["colors"], **common)
    assert not by_name.skipped and set(by_name.metrics) == {"colors"}
    by_path = evaluate(suite="configs/eval/sample.yaml", tasks=["colors"], **common)
    assert by_path.skipped and by_path.key == by_name.key  # one suite, one identity
