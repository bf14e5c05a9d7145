"""A small web of images on 127.0.0.1 for the fault suite: URL lists A and B of the same length
(distinct images and captions), served with an optional delay per request so a crawl can be
caught half-way."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, prefix: str, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = (40 + 7 * i % 200, 200 if prefix == "A" else 30, 90 + 3 * i % 150)
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buf, "JPEG", quality=90)
        (folder / f"{prefix}{i:03d}.jpg").write_bytes(buf.getvalue())


class _Handler(SimpleHTTPRequestHandler):
    delay = 0.0

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.delay:
            time.sleep(self.delay)
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def serve(folder: Path, delay: float = 0.0) -> Iterator[str]:
    """Serve `folder` on a free loopback port; yields the base URL."""
    handler = type("Handler", (_Handler,), {"delay": delay})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_list(path: Path, base_url: str, prefix: str, n: int) -> Path:
    pq.write_table(
        pa.table(
            {
                "url": [f"{base_url}/{prefix}{i:03d}.jpg" for i in range(n)],
                "caption": [f"{prefix} caption {i}" for i in range(n)],
            }
        ),
        path,
    )
    return path


def crawl_params(**overrides):
    from tasks.ingest import CrawlParams

    settings = dict(
        image_size=32,
        resize_mode="center_crop",
        processes_count=1,
        thread_count=4,
        number_sample_per_shard=10,
        timeout=5,
        retries=0,
    )
    return CrawlParams(**{**settings, **overrides})


def ingest_command(url_list: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.ingest", "--url-list", str(url_list), "--output", str(output),
        "--image-size", "32", "--resize-mode", "center_crop", "--processes-count", "1", "--thread-count", "4",
        "--number-sample-per-shard", "10", "--timeout", "5", *extra,
    ]  # fmt: skip


def child_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a stage run as a real process: this checkout first on the path, the
    session's Prefect API (no ephemeral server per process), a SQLite MLflow of the test."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if api := PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = api
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A stage as a real process in its own session (so a kill takes its children too)."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(log, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (a machine losing power, an OOM kill)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False
