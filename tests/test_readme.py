"""The README is true (issue 14): every command in its code blocks is checked against the code.

- `python -m flows.<stage>` / `clip-<stage>`: every flag (optional ones in [brackets] too) is one
  the stage's parser has; a command without placeholders parses, its values validated by the
  same pydantic model the command line uses (flows.cli.parse_fields), without running anything;
- the refusals shown in `console` blocks are run as typed and print the documented line;
- config files and presets a command names exist; `python -m clip_model.train key=value` keys
  are TrainConfig fields; make targets, Prefect deployments and the MLflow URI exist as written;
- the output locations the README gives are where the code writes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import STAGES, build_parser, parse_fields

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every ```language block, indented ones included."""
    blocks = []
    for m in re.finditer(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", README, re.S | re.M):
        if m.group(1) == language:
            blocks.append((README[: m.start()].count("\n") + 2, m.group(2)))
    return blocks


def commands() -> list[tuple[int, str]]:
    """Every command of the bash blocks: continuations joined, comments cut."""
    found = []
    for start, text in code_blocks("bash"):
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            number, line = start + i, lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append((number, line))
            i += 1
    return found


def stage_of(words: list[str]) -> tuple[str | None, list[str]]:
    """(stage, its arguments) for `python -m flows.X ...` or `clip-X ...`."""
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
        if words[2].startswith("flows.") and words[2][6:] in STAGES:
            return words[2][6:], words[3:]
    if words and words[0].startswith("clip-") and words[0][5:] in STAGES:
        return words[0][5:], words[1:]
    return None, []


STAGE_COMMANDS = [(n, c) for n, c in commands() if stage_of(c.split())[0]]


def test_the_readme_has_a_command_for_every_stage():
    stages = {stage_of(c.split())[0] for _, c in STAGE_COMMANDS}
    assert stages == set(STAGES), f"stages without a README command: {set(STAGES) - stages}"


@pytest.mark.parametrize(
    ("line", "command"), STAGE_COMMANDS, ids=[str(n) for n, _ in STAGE_COMMANDS]
)
def test_every_flag_of_a_readme_command_exists(line, command):
    stage, args = stage_of(command.split())
    known = set(build_parser(stage)._option_string_actions)
    flags = {w.strip("[]").split("=")[0] for w in args if w.strip("[").startswith("-")}
    flags = {f for f in flags if f.startswith("-") and f not in ("-", "--")}
    unknown = sorted(flags - known)
    assert not unknown, f"README line {line}: {stage} has no {unknown}"


PLAIN = [(n, c) for n, c in STAGE_COMMANDS if not re.search(r"[\[\]|]|\.\.\.|\bCKPT\b", c)]


@pytest.mark.parametrize(("line", "command"), PLAIN, ids=[str(n) for n, _ in PLAIN])
def test_a_readme_command_without_placeholders_parses(line, command, capsys):
    stage, argv = stage_of(shlex.split(command))
    try:
        parse_fields(stage, argv)
    except SystemExit:
        pytest.fail(f"README line {line}: {capsys.readouterr().err.strip()}")


def named_files(command: str) -> list[str]:
    """Files a command names by path (configs/..., a --config, --suite or --filters value)."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    return [w for w in words if w.startswith("configs/")]


@pytest.mark.parametrize(("line", "command"), commands(), ids=[str(n) for n, _ in commands()])
def test_the_config_files_a_command_names_exist(line, command):
    for path in named_files(command):
        assert (ROOT / path).is_file(), f"README line {line}: no {path}"


def test_presets_named_by_name_exist():
    from configs import locate

    for _, command in STAGE_COMMANDS:
        words = shlex.split(command.replace("[", " ").replace("]", " "))
        for flag, kind in (("--config", None), ("--profile", "pipeline"), ("--suite", "eval")):
            if flag in words:
                value = words[words.index(flag) + 1]
                if "/" not in value:
                    stage = stage_of(words)[0]
                    folder = kind or {"train": "train", "sweep": "sweep"}[stage]
                    assert locate(value, folder), f"{command}: no preset {value} in {folder}"


def test_the_trainer_commands_keys_are_config_fields():
    from clip_model.train_config import load_config

    for _, command in commands():
        words = shlex.split(command)
        if words[:3] == ["python", "-m", "clip_model.train"]:
            config = words[words.index("--config") + 1]
            items = [w for w in words[3:] if "=" in w and not w.startswith("-")]
            load_config(str(ROOT / config), items)  # ConfigError names an unknown key


def test_make_targets_deployments_and_the_mlflow_uri_exist_as_written():
    from storage.tracking import DEFAULT_TRACKING_URI

    makefile = (ROOT / "Makefile").read_text()
    deployments = {
        d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    }
    for line, command in commands():
        words = shlex.split(command)
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.M), f"README line {line}: {command}"
        if words[:3] == ["prefect", "deployment", "run"]:
            flow, name = words[3].split("/")
            assert name in deployments, f"README line {line}: no deployment {name}"
        if "mlflow" in words[0] and "--backend-store-uri" in words:
            assert words[words.index("--backend-store-uri") + 1] == DEFAULT_TRACKING_URI


def console_examples() -> list[tuple[str, str]]:
    """(command, the line it prints) from the console blocks."""
    pairs = []
    for _, text in code_blocks("console"):
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ ") and i + 1 < len(lines):
                pairs.append((line[2:], lines[i + 1]))
    return pairs


@pytest.mark.parametrize(("command", "shown"), console_examples())
def test_the_documented_refusals_print_what_the_readme_shows(command, shown, tmp_path):
    import pandas as pd

    # the URL list the example names, with the columns the README says it has
    pd.DataFrame({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a"]}).to_parquet(
        tmp_path / "urls.parquet"
    )
    words = shlex.split(command)
    done = subprocess.run(
        [sys.executable, *words[1:]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == shown


def project_relative(path: str) -> Path:
    return Path(path).relative_to(ROOT) if Path(path).is_absolute() else Path(path)


@pytest.mark.slow  # imports the evaluate tasks (Prefect, torch): ~1 min on 2 busy cores
def test_the_output_locations_the_readme_gives_are_where_the_code_writes():
    from tasks.params.pipeline import load_profile

    tiny = load_profile("tiny")
    # the evaluate example's checkpoint: the tiny profile's training folder
    match = re.search(r"--checkpoint (data/\S+)/run-<hash>/checkpoints/step-\d{8}\.ckpt", README)
    assert match, "the README shows no training checkpoint path"
    assert project_relative(tiny.path("train")) == Path(match.group(1))
    assert "<data_root>/train/<profile>/run-<hash>/" in README  # the pipeline's table
    # a standalone evaluation's default output folder
    from clip_model.eval_suite import load_suite
    from tasks.evaluate import default_output

    suite = load_suite(str(ROOT / "configs/eval/sample.yaml"), root="data/sample_web")
    assert default_output(suite) == f"data/eval/{suite.name}"
    assert "default `data/eval/<suite name>/`" in README
    # every stage folder the tiny profile writes is named
    for stage in ("ingest", "curate", "train", "evaluate"):
        assert project_relative(tiny.path(stage)) == Path(tiny.data_root) / stage / "tiny"
        assert f"<data_root>/{stage}/<profile>/" in README, f"{stage}'s output is not described"
