"""A local Cloud Storage for tests: `gcp-storage-emulator` on a free port, pointed at by the variables that gcsfs
(STORAGE_EMULATOR_HOST), tensorstore (TENSORSTORE_GCS_HTTP_URL) and subprocesses read; and `FaultyProxy`, a
proxy in front of it that fails some requests the way a real store sometimes does.

gcsfs >= 2025.10 probes each bucket's type over gRPC first, which the emulator does not speak (each probe waits
60 s); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns the probe off, and gcsfs reads it when it is imported.

The emulator omits the `x-goog-generation` header that Cloud Storage sends with every object download.
tensorstore's OCDBT (orbax's checkpoint format) reads its manifest's generation from it to update the manifest
conditionally, and fails with "Malformed StorageGeneration" without it; `serve` adds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

_READY_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def storage_environment(url: str) -> dict[str, str]:
    """The variables that point gcsfs, tensorstore (orbax) and google-cloud-storage at `url`."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@dataclasses.dataclass
class Emulator:
    url: str
    process: subprocess.Popen

    def create_bucket(self, name: str) -> str:
        """Creates a bucket; returns its gs:// root."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(credentials=AnonymousCredentials(), project="test",
                                client_options={"api_endpoint": self.url})
        client.create_bucket(name)
        return f"gs://{name}"

    def env(self, url: str | None = None) -> dict[str, str]:
        """os.environ for a subprocess that uses this store (or a proxy in front of it at `url`)."""
        return {**os.environ, **storage_environment(url or self.url)}


def _wait_until_serving(process: subprocess.Popen, url: str, log) -> None:
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"gcp-storage-emulator exited: {log.read().decode(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection(host, int(port), timeout=2)
            connection.request("GET", "/")
            if connection.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not answer at {url} within {_READY_TIMEOUT_S} s")


def _forget_gcsfs_instances() -> None:
    """fsspec caches a GCSFileSystem per set of arguments, with the endpoint it found when created: drop them, so the
    next gs:// access in this process goes to the emulator running now, not to an earlier module's."""
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


@contextlib.contextmanager
def running_emulator() -> Iterator[Emulator]:
    """An in-memory emulator on a free port, with this process's environment pointed at it."""
    if "gcsfs" in sys.modules and os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") != "false":
        raise RuntimeError("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: its bucket-type "
                           "probe would wait 60 s per bucket against the emulator")
    url = f"http://127.0.0.1:{free_port()}"
    # The probe switch stays set afterwards: gcsfs read it when imported, and a later emulator in this process
    # (another test module's) needs it still set.
    saved = {name: os.environ.get(name) for name in storage_environment(url)
             if name != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    # Its log (a line per request) goes to a file: a pipe nobody reads would fill up and stop the server.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, __file__, url.rsplit(":", 1)[1]], stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            _wait_until_serving(process, url, log)
            os.environ.update(storage_environment(url))
            _forget_gcsfs_instances()
            yield Emulator(url, process)
        finally:
            process.kill()
            process.wait()
            _forget_gcsfs_instances()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[Emulator]:
    with running_emulator() as emulator:
        yield emulator


# --- a store that fails some requests ----------------------------------------------------------------------

@dataclasses.dataclass
class FaultCounts:
    forwarded: int = 0
    unavailable: int = 0  # answered 503
    reset: int = 0  # connection closed before an answer
    cut: int = 0  # answer cut off inside its body
    bytes_sent: int = 0  # response body bytes sent to clients


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def log_message(self, *_):
        pass

    def _handle(self) -> None:
        body = self._read_body()
        proxy: FaultyProxy = self.server.proxy
        if proxy.holding.is_set():  # no answer until the proxy closes (or its client is killed)
            proxy.closing.wait()
            self.close_connection = True
            return
        fault = proxy.next_fault()
        if fault == "unavailable":
            self._answer(503, json.dumps({"error": {"code": 503, "message": "injected: backend unavailable"}}).encode(),
                         {"Content-Type": "application/json"})
            return
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, content = proxy.forward(self.command, self.path, self.headers, body)
        if fault == "cut" and self.command == "GET" and len(content) > 1:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content[:len(content) // 2])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            proxy.count("cut", len(content) // 2)
            return
        self._answer(status, content, dict(headers))
        proxy.count("forwarded", len(content))
        # A finished upload is answered with the object's resource, its name included (a resumable upload's
        # first request, which names the object too, is answered without it).
        if proxy.hold_after and self.command in ("POST", "PUT") and status < 300 and proxy.hold_after in content:
            proxy.holding.set()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Clients drop connections they no longer need (a cancelled read-ahead): not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date", "host"}


class FaultyProxy:
    """An HTTP proxy in front of the emulator that answers 503 to every `unavailable_every`-th request, closes the
    connection of every `reset_every`-th without answering, and cuts every `cut_every`-th GET answer in half;
    the other requests are forwarded. `counts` says what happened.

    With `hold_after` (bytes), once an upload of an object whose name holds them has finished, `holding` is set
    and every later request waits without an answer until the proxy closes: a process that uses the store stops
    at its next request, at a known point, where a test can kill it."""

    def __init__(self, target_url: str, *, unavailable_every: int = 0, reset_every: int = 0, cut_every: int = 0,
                 hold_after: bytes | None = None):
        self._target = target_url.removeprefix("http://")
        self._every = {"unavailable": unavailable_every, "reset": reset_every, "cut": cut_every}
        self.hold_after = hold_after
        self.holding = threading.Event()
        self.closing = threading.Event()
        self._requests = itertools.count(1)
        self._lock = threading.Lock()
        self.counts = FaultCounts()
        self._server = _QuietServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()

    def next_fault(self) -> str | None:
        with self._lock:
            number = next(self._requests)
        for fault, every in self._every.items():
            if every and number % every == 0:
                if fault != "cut":
                    self.count(fault)
                return fault
        return None

    def count(self, what: str, body_bytes: int = 0) -> None:
        with self._lock:
            setattr(self.counts, what, getattr(self.counts, what) + 1)
            self.counts.bytes_sent += body_bytes

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self._target, timeout=60)
        try:
            connection.request(method, path, body=body or None,
                               headers={k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS})
            response = connection.getresponse()
            content = response.read()
            # A resumable upload's Location names the emulator: keep its chunks coming through the proxy.
            kept = [(k, v.replace(self._target, self.url.removeprefix("http://")) if k.lower() == "location" else v)
                    for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            return response.status, kept, content
        finally:
            connection.close()


def serve(port: int) -> None:
    """Runs the emulator in memory on 127.0.0.1:`port`, its downloads carrying the object's generation."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(stored["generation"])
            response["x-goog-metageneration"] = str(stored["metageneration"])

    objects.download = download_with_generation  # before the server module builds its routes from it
    from gcp_storage_emulator.__main__ import main
    main(["start", "--host=127.0.0.1", f"--port={port}", "--in-memory"])


if __name__ == "__main__":
    serve(int(sys.argv[1]))
