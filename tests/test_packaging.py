"""The package installs anywhere: dependencies declared and bounded, pinned by the lock `make`
installs, and a non-editable install that runs its console scripts and finds its presets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = ["ingest", "curate", "train", "evaluate", "index", "search", "sample", "pipeline"]


def declared() -> list[Requirement]:
    """What `make` installs: the dependencies and every extra but `gpu` (dev names the others as
    `clip-pipeline[...]`, a reference to this project, not a dependency)."""
    extras = PROJECT["optional-dependencies"]
    wanted = [r for name, reqs in extras.items() if name != "gpu" for r in reqs]
    return [
        req
        for req in map(Requirement, PROJECT["dependencies"] + wanted)
        if canonicalize_name(req.name) != canonicalize_name(PROJECT["name"])
    ]


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_dependency_is_bounded():
    for req in declared() + [Requirement(r) for r in PROJECT["optional-dependencies"]["gpu"]]:
        operators = {spec.operator for spec in req.specifier}
        assert operators & {"==", "<", "<=", "~="}, f"{req}: no upper bound"
        assert operators & {"==", ">=", ">", "~="}, f"{req}: no lower bound"


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    pins = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {req}: run `make lock`"
        )
    assert "dataclasses" not in pins  # docs/design.md, trap 1


def test_the_modules_the_code_imports_are_declared():
    names = {canonicalize_name(r.name) for r in declared()}
    for module in ("regex", "numpy", "scipy", "opencv-python-headless", "pyyaml", "tqdm"):
        assert module in names, module
    assert Requirement(
        next(r for r in PROJECT["dependencies"] if r.startswith("numpy"))
    ).specifier.contains("2.0")


@pytest.mark.slow
def test_a_non_editable_install_runs_its_console_scripts_and_finds_its_presets(tmp_path):
    """`pip install .` (not editable) into a fresh venv; its dependencies come from this test's
    environment (a .pth line) so nothing is downloaded. Then from an empty folder, with no
    PYTHONPATH: the console scripts answer --help, and the presets are the installed ones."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "data",
            "__pycache__",
            "*.egg-info",
            "build",
            "mlflow.db",
            ".prefect-home",
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for stage in SCRIPTS:
        p = subprocess.run(
            [venv / "bin" / f"clip-{stage}", "--help"], capture_output=True, text=True, env=env,
            cwd=empty, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0 and f"usage: clip-{stage}" in p.stdout, (stage, p.stderr)
    help_text = subprocess.run(
        [venv / "bin" / "clip-pipeline", "--help"], capture_output=True, text=True, env=env,
        cwd=empty,
    ).stdout  # fmt: skip
    assert "(cc3m_vitb32, micro, tiny)" in " ".join(help_text.split())

    where = subprocess.run(
        [python, "-c", "import configs, flows; print(configs.locate('tiny', 'pipeline')); "
         "print(configs.locate('configs/filters/sample.yaml')); print(flows.__file__)"],
        capture_output=True, text=True, env=env, cwd=empty, check=True,
    ).stdout.split()  # fmt: skip
    for path in where:
        assert path.startswith(site) and Path(path).is_file(), path
    # the profile and the filter spec, training config and eval suite it names are all read from
    # the package: only then is the misspelt training setting found (and nothing else)
    p = subprocess.run(
        [venv / "bin" / "clip-pipeline", "--profile", "tiny", "--set", "train.settings.lrr=1"],
        capture_output=True, text=True, env=env, cwd=empty, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr == (
        "error: --set train.settings.lrr=1: lrr: Extra inputs are not permitted (did you mean lr?)\n"
    )
