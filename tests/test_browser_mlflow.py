"""What a user sees in `mlflow ui`: a real `mlflow server` on 127.0.0.1 over a SQLite store, read
by headless Chromium (Debian's chromium and chromedriver, driven by selenium).

The pipeline's link (storage.tracking.share_runs_view) opens the experiment in the model-training
view, its runs table showing the pipeline run's training dataset and headline metric columns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from storage import open_dataset
from storage.tracking import EXPERIMENT_KIND_TAG, log_dataset, share_runs_view, stage_run
from tests.test_train import write_shapes

pytestmark = pytest.mark.slow  # an MLflow server and a browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HEADLINE = {"digits/acc1": 0.625, "curate/kept": 2024.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(mlflow_tmp, tmp_path):
    """`mlflow server` (what `mlflow ui` runs) on a free loopback port; yields its base URL."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            mlflow_tmp,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300  # a start on a loaded machine takes minutes
        while True:
            try:
                with urllib.request.urlopen(base + "health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(
                    "mlflow server did not start:\n" + (tmp_path / "server.log").read_text()
                )
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=2400,1200")  # every column of the table in view
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_pipeline_link_opens_the_training_view_with_dataset_and_metric_columns(
    mlflow_tmp, tmp_path, mlflow_server, browser
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = write_shapes(tmp_path / "shapes", [12, 12])
    with stage_run("pipeline", run_name="pipeline-micro") as run:
        mlflow.log_metrics(HEADLINE)
        log_dataset(open_dataset(data), context="training")
        link = share_runs_view(run.info.experiment_id, "pipeline", list(HEADLINE))
    experiment = mlflow.MlflowClient(mlflow_tmp).get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    browser.get(mlflow_server + link)
    wait = WebDriverWait(browser, 180)
    wait.until(lambda b: "pipeline-micro" in b.find_element(By.TAG_NAME, "body").text)
    page = browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(tmp_path / "runs.png"))  # kept for a failing run's reader

    assert "workflowType=machine_learning" in browser.current_url
    assert "Model training" in page and "Traces | 0" not in page.replace("\n", " | ")
    # the runs table: its dataset cell (name, digest, context) and the headline metric columns
    assert "Dataset" in page and f"{Path(data).name} (" in page and "Training" in page
    headers = {
        h.get_attribute("col-id") for h in browser.find_elements(By.CSS_SELECTOR, "[col-id]")
    }
    for metric in HEADLINE:
        assert f"metrics.`{metric}`" in headers, sorted(h for h in headers if h)
    assert "0.625" in page and "2024" in page
