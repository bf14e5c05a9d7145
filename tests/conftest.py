"""Shared fixtures: one Prefect test harness per session, a throwaway SQLite MLflow per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import flows  # noqa: F401  (environment defaults before prefect/mlflow are imported)

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over ~30 s (`-m 'not slow'` leaves it out)")
    # Weights fetched from a models:/ URI are cached per user (storage.tracking); a test run
    # keeps its own cache instead of filling the home folder of whoever runs it.
    if "CLIP_PIPELINE_CACHE" not in os.environ:
        cache = Path(config.rootpath) / ".pytest_cache" / "clip-pipeline"
        os.environ["CLIP_PIPELINE_CACHE"] = str(cache)


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


@pytest.fixture(scope="session")
def sample_web(tmp_path_factory):
    """The full sample web (seed 0), generated once per session."""
    from tasks.sample_web import generate_sample_web

    return generate_sample_web(tmp_path_factory.mktemp("sample_web"))


@pytest.fixture(scope="session")
def sample_url_list(sample_web):
    """The sample web served on a free loopback port; yields its URL list's path."""
    from tasks.sample_web import serve_sample_web, write_url_list

    with serve_sample_web(sample_web.out_dir, port=0) as base_url:
        yield str(
            write_url_list(sample_web.out_dir, base_url, sample_web.out_dir / "urls_test.parquet")
        )


def sample_crawl_params(**overrides):
    """The crawl settings the sample web's expected outcomes were observed with."""
    from tasks.ingest import CrawlParams
    from tasks.sample_web import CRAWL_SETTINGS

    settings = {k: v for k, v in CRAWL_SETTINGS.items() if v is not None}
    return CrawlParams(**{**settings, "save_additional_columns": ["expected"], **overrides})


@pytest.fixture(scope="session")
def crawled_sample(prefect_harness, session_mlflow, sample_url_list, tmp_path_factory):
    """The sample web crawled through the ingest flow: an `IngestResult` (its `.dataset` path)."""
    from flows.ingest import ingest

    out = tmp_path_factory.mktemp("crawl") / "dataset"
    return ingest(
        url_list=sample_url_list,
        output=str(out),
        params=sample_crawl_params(number_sample_per_shard=500),
    )
