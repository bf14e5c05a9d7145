"""Shared fixtures: one Prefect test harness per session, a throwaway SQLite MLflow per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import flows  # noqa: F401  (environment defaults before prefect/mlflow are imported)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's ephemeral test server, started once per session (it costs ~10 s; never nest it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_tmp(tmp_path, monkeypatch):
    """A real MLflow tracking store in a temporary SQLite file; yields its URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact locations land beside the database
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def session_mlflow(tmp_path_factory):
    """A session-wide SQLite MLflow for session-scoped fixtures that log runs."""
    path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
