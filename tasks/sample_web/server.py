"""Serving the sample web on 127.0.0.1: a threaded HTTP server whose first path segment picks the
behaviour (`/img/` static, `/slow/` late, `/noai/` with `X-Robots-Tag: noai`, `/html/` as
text/html, `/status/CODE/` that status)."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tasks.sample_web.defects import SLOW_SECONDS
from tasks.sample_web.url_list import base_url_of


class _SampleWebServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections under a 32-thread crawl

    def __init__(self, address, www: Path, slow_seconds: float):
        super().__init__(address, _SampleWebHandler)
        self.www = www.resolve()
        self.slow_seconds = slow_seconds
        self.stopping = threading.Event()  # wakes the slow endpoint's sleepers at shutdown

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (the crawler's timeout) is expected, not worth a traceback


_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


class _SampleWebHandler(BaseHTTPRequestHandler):
    server: _SampleWebServer
    server_version = "SampleWeb/1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        route, _, rest = path.lstrip("/").partition("/")
        if route == "status":
            code, _, _ = rest.partition("/")
            if code.isdigit() and 400 <= int(code) < 600:
                self.send_error(int(code))
            else:
                self.send_error(HTTPStatus.NOT_FOUND)
            return
        if route not in ("img", "slow", "noai", "html"):
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        file = (self.server.www / route / rest).resolve()
        if not file.is_relative_to(self.server.www / route) or not file.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        if route == "slow" and self.server.stopping.wait(self.server.slow_seconds):
            return  # shutting down
        body = file.read_bytes()
        self.send_response(HTTPStatus.OK)
        if route == "html":
            self.send_header("Content-Type", "text/html; charset=utf-8")
        else:
            ctype = _CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
            self.send_header("Content-Type", ctype)
        if route == "noai":
            self.send_header("X-Robots-Tag", "noai")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@contextmanager
def serve_sample_web(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    slow_seconds: float = SLOW_SECONDS,
) -> Iterator[str]:
    """Serve DIR/www in a background thread; yields the base URL ("http://127.0.0.1:PORT").

    port=0 picks a free port (tests); use write_url_list(DIR, base_url, out) for a list on it.
    """
    www = Path(root) / "www"
    if not www.is_dir():
        raise FileNotFoundError(
            f"{www} is not a folder: run generate_sample_web({str(root)!r}) first"
        )
    server = _SampleWebServer((host, port), www, slow_seconds)
    thread = threading.Thread(target=server.serve_forever, name="sample-web", daemon=True)
    thread.start()
    try:
        yield base_url_of(host, server.server_address[1])
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
