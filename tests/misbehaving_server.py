"""A local HTTP server that serves files well or badly, for the download, weights-cache, predictor and soak tests.

Paths (``<name>`` is a file in the served folder):

==========================  =====================================================================================
``/files/<name>``           the file, honouring ``Range`` (a well-behaved server)
``/slow/<name>``            the file, after waiting ``stall_s`` (a slow but well-behaved server)
``/drop-once/<name>``       the first request is cut half-way (the connection closes); later ones honour ``Range``
``/drop-always/<name>``     every request is cut half-way, and ranges are not offered
``/short/<name>``           announces the full length, sends half, closes (no ranges)
``/long/<name>``            announces half the length and sends it all
``/stall/<name>``           sends the headers and half the body, then stalls for ``stall_s``
``/silent``                 accepts the connection and never answers
``/trickle/<name>``         sends the file one byte every ``trickle_interval_s`` (each read is quick: no read timeout)
``/endless``                a chunked body of zeros that never ends
``/html``                   an HTML error page with status 200 and ``text/html``
``/html-as-tar``            an HTML error page labelled ``application/x-tar``
``/status/<code>``          that status with an HTML body
``/loop``                   a redirect to itself
``/gzip-bomb``              a small gzip body (``Content-Encoding: gzip``) that inflates to 64 MiB of zeros
==========================  =====================================================================================
"""

from __future__ import annotations

import gzip
import http.server
import re
import threading
import time
from pathlib import Path

HTML_PAGE = b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1>Request has expired</body></html>"


class MisbehavingServer:
    def __init__(self, folder: Path, stall_s: float = 5.0, trickle_interval_s: float = 0.05):
        server = self
        self.folder = folder
        self.stall_s = stall_s
        self.trickle_interval_s = trickle_interval_s
        self.requests: list[tuple[str, str | None]] = []
        self._dropped: set[str] = set()
        self._stop = threading.Event()
        self._gzip_bomb = gzip.compress(bytes(64 * 1024**2), compresslevel=9)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                kind, _, rest = self.path.split("?")[0].lstrip("/").partition("/")
                try:
                    server.respond(self, kind, rest)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def send_body(self, status: int, body: bytes, content_type: str, *, length: int | None = None,
                          ranges: bool = False, close: bool = False, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                if ranges:
                    self.send_header("Accept-Ranges", "bytes")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, handler, kind: str, rest: str) -> None:
        simple = {"html": lambda: handler.send_body(200, HTML_PAGE, "text/html; charset=utf-8"),
                  "html-as-tar": lambda: handler.send_body(200, HTML_PAGE, "application/x-tar"),
                  "silent": lambda: self._stop.wait(self.stall_s),
                  "loop": lambda: handler.send_body(302, b"", "text/plain", extra={"Location": "/loop"}),
                  "endless": lambda: self._endless(handler),
                  "gzip-bomb": lambda: handler.send_body(200, self._gzip_bomb, "application/x-tar",
                                                         extra={"Content-Encoding": "gzip"})}
        if kind in simple:
            return simple[kind]()
        if kind == "status":
            return handler.send_body(int(rest), HTML_PAGE, "text/html")
        path = self.folder / rest
        if not path.is_file():
            return handler.send_body(404, b"not found", "text/plain")
        data = path.read_bytes()
        half = len(data) // 2
        if kind == "short" or kind == "drop-always" or (kind == "drop-once" and rest not in self._dropped):
            if kind == "drop-once":
                self._dropped.add(rest)
            return handler.send_body(200, data[:half], "application/x-tar", length=len(data), close=True,
                                     ranges=kind == "drop-once")
        if kind == "long":
            return handler.send_body(200, data, "application/x-tar", length=half, close=True)
        if kind == "slow":
            self._stop.wait(self.stall_s)
            return handler.send_body(200, data, "application/x-tar")
        if kind == "stall":
            handler.send_body(200, data[:half], "application/x-tar", length=len(data))
            self._stop.wait(self.stall_s)
            return None
        if kind == "trickle":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/x-tar")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            for index in range(len(data)):
                if self._stop.wait(self.trickle_interval_s):
                    return None
                handler.wfile.write(data[index:index + 1])
                handler.wfile.flush()
            return None
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if match and kind in ("files", "drop-once"):
            start = int(match.group(1))
            return handler.send_body(206, data[start:], "application/x-tar", ranges=True,
                                     extra={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return handler.send_body(200, data, "application/x-tar", ranges=True)

    def _endless(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-tar")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        chunk = bytes(64 * 1024)
        while not self._stop.is_set():
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            time.sleep(0.001)

    def __enter__(self) -> MisbehavingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"
