"""Test helpers: the real Cog HTTP server (`python -m cog.server.http`, coglet) and a local file server.

Both listen on free loopback ports and are stopped by their own process ids / objects, never by name.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), f"not a base64 data URI: {uri[:60]}"
    return base64.b64decode(payload)


@dataclass
class CogServer:
    """One coglet server process for one mode, started in `project` (where `.cog/openapi_schema.json` lives)."""

    project: Path
    mode: str  # "predict" or "train"
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "CogServer":
        config = {"predict": ("COG_PREDICT_TYPE_STUB", "predict.py:Predictor"),
                  "train": ("COG_TRAIN_TYPE_STUB", "train.py:train")}[self.mode]
        env = {**os.environ, **self.env, "PORT": str(self.port), config[0]: config[1],
               # coglet starts its worker as `python -c ...` from PATH: it must be this interpreter's
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
        if self.mode == "train":
            args += ["--x-mode", "train"]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=self.project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return self

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cog server ({self.mode}) exited: {self.log_tail()}")
            try:
                status = self.health()["status"]
            except requests.ConnectionError:
                status = "STARTING"
            if status == "READY":
                return
            if status in ("SETUP_FAILED", "DEFUNCT"):
                raise RuntimeError(f"cog server ({self.mode}) {status}: {self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"cog server ({self.mode}) not READY after {timeout}s: {self.log_tail()}")

    def post(self, path: str, body: dict, timeout: float = 300) -> requests.Response:
        """POST like Replicate's dispatcher: a 409 (the one slot not yet released by the previous request) is
        retried for a few seconds."""
        deadline = time.monotonic() + 10
        while True:
            response = requests.post(f"{self.url}{path}", json=body, timeout=timeout)
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM the server, then make sure it and its worker (found by pid) are gone."""
        if self.process is None or self.process.poll() is not None:
            return
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()


class FileServer:
    """A local http server for one folder, standing in for the URLs Replicate passes to a model."""

    def __init__(self, folder: Path):
        class QuietHandler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args):
                super().__init__(*args, directory=str(folder))

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"
