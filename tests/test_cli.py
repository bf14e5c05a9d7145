"""Every command line refuses bad input before it starts anything: one line `error: ...` naming
the flag, file, column or field at fault and what is accepted, exit status 2, without importing
Prefect, torch or MLflow (which is what makes it fast: bench/cli.py prints the times).

The refusals run the real commands in subprocesses, as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import configs
from configs import ConfigError
from configs.overrides import Override, apply_overrides, parse_overrides, validate
from flows.cli import STAGES, build_parser, model_of

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("prefect", "torch", "mlflow", "img2dataset", "lightning", "faiss")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def refused(p: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed (asserting there is exactly one, and exit 2)."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and "prefect" not in p.stderr.lower()
    return lines[0]


@pytest.fixture
def url_list(tmp_path) -> str:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), path)
    return str(path)


# ---- the refusals, as typed ----------------------------------------------------------------------


def test_pipeline_refuses_an_unknown_profile_field_naming_the_set_item(tmp_path):
    line = refused(run_cli("flows.pipeline", "--set", "bogus=1", cwd=tmp_path))
    assert line.startswith("error: --set bogus=1: bogus: Extra inputs are not permitted")
    assert "accepted: name, description, data_root" in line


def test_pipeline_blames_a_training_setting_on_the_set_item_not_the_config_file(tmp_path):
    line = refused(run_cli("flows.pipeline", "--set", "train.settings.max_stepz=5", cwd=tmp_path))
    assert line.startswith("error: --set train.settings.max_stepz=5: max_stepz:")
    assert "did you mean max_steps?" in line and "tiny.yaml" not in line


def test_pipeline_refuses_a_malformed_set_item(tmp_path):
    line = refused(run_cli("flows.pipeline", "--set", "max_steps", cwd=tmp_path))
    assert "--set max_steps: expected KEY=VALUE" in line


def test_ingest_refuses_a_missing_column_listing_the_columns(url_list, tmp_path):
    p = run_cli("flows.ingest", "--url-list", url_list, "--output", str(tmp_path / "o"),
                "--url-col", "link")  # fmt: skip
    line = refused(p)
    assert "has no column 'link' (--url-col); its columns are: url, caption" in line
    assert not (tmp_path / "o").exists()  # nothing started


def test_ingest_refuses_a_bad_choice_listing_the_choices(url_list, tmp_path):
    p = run_cli("flows.ingest", "--url-list", url_list, "--output", str(tmp_path / "o"),
                "--resize-mode", "squash")  # fmt: skip
    line = refused(p)
    assert "--resize-mode: invalid choice: 'squash'" in line and "'center_crop'" in line


def test_ingest_refuses_an_out_of_range_value_naming_the_flag(url_list, tmp_path):
    p = run_cli("flows.ingest", "--url-list", url_list, "--output", str(tmp_path / "o"),
                "--image-size", "0")  # fmt: skip
    assert refused(p) == "error: --image-size: Input should be greater than 0 (got 0)"


def test_ingest_refuses_a_missing_url_list(tmp_path):
    p = run_cli("flows.ingest", "--url-list", str(tmp_path / "nope.csv"), "--output", "o")
    assert "nope.csv': no such file" in refused(p)


def test_search_refuses_a_folder_that_is_not_an_index(tmp_path):
    line = refused(run_cli("flows.search", "--index", str(tmp_path), "--text", "a"))
    assert "not an index (no index.json)" in line


def test_search_needs_a_query(tmp_path):
    line = refused(run_cli("flows.search", "--index", str(tmp_path)))
    assert line == "error: give --text and/or --image, or --serve"


def test_train_refuses_a_missing_dataset_naming_the_flag(tmp_path):
    p = run_cli("flows.train", "--data", str(tmp_path / "nope"), "--max-steps", "5")
    assert refused(p).endswith("--data " + str(tmp_path / "nope") + ": no such dataset folder")


def test_train_blames_options_and_set_items_not_the_config_file(tmp_path):
    data = str(tmp_path / "nope")
    line = refused(run_cli("flows.train", "--data", data, "--config", "tiny", "--set", "lrr=1"))
    assert line.startswith(
        "error: --set lrr=1: lrr: Extra inputs are not permitted (did you mean lr?)"
    )
    line = refused(run_cli("flows.train", "--data", data, "--max-epochs", "2", "--config", "tiny"))
    assert "tiny with --max-epochs 2: set exactly one of max_steps and max_epochs" in line
    line = refused(run_cli("flows.train", "--data", data, "--max-steps", "5", "--model", "ViT-Q"))
    assert "unknown model 'ViT-Q'" in line and "ViT-B-32" in line


def test_curate_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    p = run_cli("flows.curate", "--input", str(tmp_path), "--output", str(tmp_path / "c"),
                "--filters", "sample")  # fmt: skip
    assert "--input " + str(tmp_path) + ": not a dataset (no manifest.json" in refused(p)


def test_curate_refuses_an_unknown_filter_spec_listing_the_presets(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    p = run_cli("flows.curate", "--input", str(tmp_path), "--output", str(tmp_path / "c"),
                "--filters", "strict")  # fmt: skip
    assert (
        "filter spec 'strict': no such file; expected a preset (datacomp_basic, sample)"
        in refused(p)
    )


def test_evaluate_refuses_a_missing_checkpoint_then_an_unknown_task(tmp_path):
    line = refused(
        run_cli("flows.evaluate", "--checkpoint", str(tmp_path / "w.pt"), "--suite", "sample")
    )
    assert line == f"error: --checkpoint {tmp_path / 'w.pt'}: no such file"
    (tmp_path / "w.pt").write_bytes(b"")
    p = run_cli("flows.evaluate", "--checkpoint", str(tmp_path / "w.pt"), "--suite", "sample",
                "--root", str(tmp_path), "--tasks", "digits,birds")  # fmt: skip
    assert "suite sample has no task ['birds']; it has ['digits'" in refused(p)


def test_index_and_sample_refuse_bad_choices_and_ranges(tmp_path):
    p = run_cli(
        "flows.index", "--checkpoint", "w.pt", "--data", "d", "--output", "o", "--kind", "lsh"
    )
    assert "--kind: invalid choice: 'lsh' (choose from 'auto', 'flat', 'ivf', 'hnsw')" in refused(p)
    p = run_cli("flows.sample", "--out", str(tmp_path / "s"), "--port", "99999")
    assert refused(p) == "error: --port: Input should be less than or equal to 65535 (got 99999)"


def test_a_missing_required_flag_is_one_line(tmp_path):
    line = refused(run_cli("flows.ingest", "--output", "o"))
    assert "the following arguments are required: --url-list" in line


def test_help_lists_every_flag_with_its_default(tmp_path):
    p = run_cli("flows.ingest", "--help", cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == ""
    assert "--resize-mode {no,border,keep_ratio,keep_ratio_largest,center_crop}" in p.stdout
    assert "(default: border)" in p.stdout and "samples per output shard" in p.stdout


# ---- nothing heavy before the input is known good --------------------------------------------------


HEAVY_PROBE = """
import json, sys
from flows.cli import parse
try:
    parse({stage!r}, {argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_and_refusals_import_nothing_heavy(stage, tmp_path):
    for argv in (["--help"], ["--no-such-flag"]):
        code = HEAVY_PROBE.format(stage=stage, argv=argv, heavy=HEAVY)
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.splitlines()[-1]) == [], f"{stage} {argv}"


def test_checking_a_whole_pipeline_profile_imports_nothing_heavy(tmp_path):
    code = HEAVY_PROBE.format(stage="pipeline", argv=["--profile", "tiny"], heavy=HEAVY)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == []


# ---- help text from the models ---------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_flag_has_help_text_from_its_field(stage):
    parser = build_parser(stage)
    model = model_of(stage)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{stage} {action.option_strings}: no help text"
        assert action.help.startswith(
            model.model_fields[action.dest].description.replace("%", "%%")
        )


# ---- the configs package and the one override parser ---------------------------------------------


def test_locate_finds_presets_and_project_relative_paths_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configs.locate("tiny", "pipeline") == configs.root() / "pipeline" / "tiny.yaml"
    assert configs.locate("configs/filters/sample.yaml").is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("{}")
    assert configs.locate("mine.yaml", "pipeline") == Path("mine.yaml")
    with pytest.raises(
        FileNotFoundError, match=r"pipeline config 'tny'.*\(cc3m_vitb32, micro, tiny\)"
    ):
        configs.locate("tny", "pipeline")


def test_overrides_parse_yaml_values_and_dotted_keys():
    items = parse_overrides(["a.b=50", "c=[x, y]", "d=", "e-f=null"], flag="--set")
    assert [(o.key, o.value) for o in items] == [("a.b", 50), ("c", ["x", "y"]), ("d", None),
                                                 ("e_f", None)]  # fmt: skip
    assert items[0].origin == "--set a.b=50"
    assert apply_overrides({"a": {"z": 1}}, items[:1]) == {"a": {"z": 1, "b": 50}}
    with pytest.raises(ConfigError, match=r"--set c=\[: the value is not valid YAML"):
        parse_overrides(["c=["], flag="--set")
    with pytest.raises(ConfigError, match="'a' is a value, not a section"):
        apply_overrides({"a": 1}, parse_overrides(["a.b=2"]))


def test_a_validation_error_blames_the_override_else_the_file():
    from clip_model.train import TrainConfig

    items = parse_overrides(["max_stepz=5"], flag="--set")
    with pytest.raises(ConfigError) as e:
        validate(TrainConfig, {"data": "d", "max_steps": 0, "max_stepz": 5}, source="t.yaml",
                 overrides=items)  # fmt: skip
    message = str(e.value)
    assert "\n" not in message
    assert "t.yaml: max_steps: Input should be greater than 0 (got 0)" in message
    assert (
        "--set max_stepz=5: max_stepz: Extra inputs are not permitted (did you mean max_steps?)"
        in message
    )


def test_nested_override_keeps_its_origin_under_a_section():
    o = Override("train.settings.lr", 0.1, "--set train.settings.lr=0.1")
    assert o.under("train.settings") == Override("lr", 0.1, "--set train.settings.lr=0.1")
    assert o.under("evaluate") is None


def test_langid_codes_are_the_bundled_models():
    from langid.langid import LanguageIdentifier, model

    from tasks.curation.spec import LANGID_CODES

    assert LANGID_CODES == frozenset(LanguageIdentifier.from_modelstring(model).nb_classes)


def test_the_index_manifest_name_is_storages():
    from storage.embeddings import INDEX_MANIFEST
    from tasks.params.search import INDEX_MANIFEST as LIGHT

    assert LIGHT == INDEX_MANIFEST


@pytest.mark.parametrize("stage", ["curate", "train", "evaluate", "index", "sweep"])
def test_each_flow_takes_exactly_its_models_parameters(stage):
    """The command line passes the model's fields to the flow as keywords: a parameter added to
    one and not the other fails here, not at a user's first run."""
    import importlib
    import inspect

    flow = getattr(importlib.import_module(f"flows.{stage}"), stage)
    signature = inspect.signature(flow.fn)
    for name, field in model_of(stage).model_fields.items():
        assert name in signature.parameters, f"flows.{stage}.{stage} has no parameter {name}"
        default = signature.parameters[name].default
        if not field.is_required():
            assert default == field.get_default(call_default_factory=True), name
    for name, parameter in signature.parameters.items():
        assert (
            name in model_of(stage).model_fields or parameter.default is not inspect.Parameter.empty
        )
