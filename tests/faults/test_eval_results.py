"""Evaluate's output under concurrency (issue 11, class 7): OUTPUT/results.json, the index of
every evaluation in OUTPUT, is read, changed and replaced under OUTPUT's lock, so evaluations
recording at the same moment keep every entry; OUTPUT itself is bound to the stage (never inside
its inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage import OutputError

# what record_result does after building the entry (tasks/evaluate.py imports torch and Prefect,
# a minute per process on a loaded machine; the bookkeeping module imports neither)
WRITER = """
import sys, time
from pathlib import Path
from tasks.eval_results import add_entry
output, name, go, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
for i in range(n):
    key = f"{name}-{i:02d}"
    add_entry(output, key, {"metrics": {"digits": {"acc1": i / n}}, "results_json": key})
"""

WRITERS, ENTRIES = 4, 12


def test_concurrent_evaluations_keep_every_entry_of_results_json(tmp_path):
    output, go = str(tmp_path / "eval"), tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, output, f"w{w}", str(go), str(ENTRIES)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WRITERS)
    ]
    for proc in procs:  # every writer imported and waiting: then all start at once
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = json.loads((Path(output) / "results.json").read_text())["runs"]
    expected = {f"w{w}-{i:02d}" for w in range(WRITERS) for i in range(ENTRIES)}
    assert set(runs) == expected, f"lost: {sorted(expected - set(runs))}"


def test_an_evaluation_output_inside_its_data_root_is_refused(tmp_path):
    from tasks.eval_results import claim

    root = tmp_path / "evaldata"
    root.mkdir()
    (root / "captions.jsonl").write_text("")
    with pytest.raises(OutputError, match="lies inside the input"):
        claim(str(root / "results"), [None, str(tmp_path / "suite.yaml"), str(root)])
    assert sorted(p.name for p in root.iterdir()) == ["captions.jsonl"]


def _legacy_output(output: Path) -> dict:
    """An evaluate OUTPUT as written before outputs carried `.output.json`: the results index
    and one run's folder, nothing else."""
    from tasks.eval_results import INDEX_FORMAT

    (output / "abc123def456").mkdir(parents=True)
    (output / "abc123def456" / "results.json").write_text('{"tasks": {}}')
    index = {
        "format": INDEX_FORMAT,
        "runs": {"abc123def456" * 5: {"results_json": "abc123def456/results.json"}},
    }
    (output / "results.json").write_text(json.dumps(index))
    return index


def test_an_evaluation_output_from_before_output_records_is_kept_as_this_stages(tmp_path):
    from storage.output import read_record
    from tasks.eval_results import add_entry, claim, read_index

    output = tmp_path / "eval"
    legacy = _legacy_output(output)
    claim(str(output), [None, str(tmp_path / "suite.yaml"), None])  # no --force needed
    assert read_record(str(output)).stage == "evaluate"
    add_entry(str(output), "new", {"results_json": "new/results.json"})
    runs = read_index(str(output))["runs"]
    assert set(runs) == {*legacy["runs"], "new"}  # the earlier evaluations kept
    assert (output / "abc123def456" / "results.json").is_file()


def test_a_foreign_evaluation_output_is_refused_naming_force_and_force_replaces_it(tmp_path):
    from tasks.eval_results import claim

    output = tmp_path / "eval"
    output.mkdir()
    (output / "results.json").write_text('{"not": "an evaluation index"}')
    with pytest.raises(OutputError, match="--force"):
        claim(str(output), [None, str(tmp_path / "suite.yaml"), None])
    assert (output / "results.json").is_file()  # refused: untouched
    claim(str(output), [None, str(tmp_path / "suite.yaml"), None], force=True)
    assert sorted(p.name for p in output.iterdir()) == [".output.json"]
