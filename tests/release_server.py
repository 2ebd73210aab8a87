"""A local stand-in for the official MARLIN release: official-format weight files of a tiny architecture, made by
the real marlin_pytorch from random weights, served over HTTP on 127.0.0.1 with a SHA256SUMS file.

The tiny architecture gets an official-style name (`TINY_NAME`) for the tests that ask for weights by name: in the
test process through `monkeypatch.setitem(OFFICIAL_ARCHITECTURES, ...)`, in a subprocess through
`RUN_MODULE_WITH_TINY_NAME` (`python -c RUN_MODULE_WITH_TINY_NAME <module> <args>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading

from marlin_jax.architectures import VIT_TINY

TINY_NAME = "marlin_vit_tiny_test"
TINY = VIT_TINY
RUN_MODULE_WITH_TINY_NAME = (
    "import runpy, sys\n"
    "from marlin_jax.architectures import OFFICIAL_ARCHITECTURES, VIT_TINY\n"
    f"OFFICIAL_ARCHITECTURES[{TINY_NAME!r}] = VIT_TINY\n"
    "module = sys.argv.pop(1)\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def official_weights_file(marlin_pytorch, arch, seed: int, full: bool) -> bytes:
    """`torch.save(model.state_dict())` of marlin_pytorch's model, as the release files are made."""
    import torch
    from torch_reference import build_torch_marlin
    buffer = io.BytesIO()
    torch.save(build_torch_marlin(marlin_pytorch, arch, seed=seed, full=full).state_dict(), buffer)
    return buffer.getvalue()


def sha256sums(files: dict[str, bytes]) -> bytes:
    """What `sha256sum *` prints for the files."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())).encode()


@dataclasses.dataclass
class Release:
    """What the server serves (file name -> bytes), which files it cuts off halfway, and the names requested."""

    files: dict[str, bytes]
    cut: set[str] = dataclasses.field(default_factory=set)
    requests: list[str] = dataclasses.field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        release: Release = self.server.release
        name = self.path.lstrip("/")
        release.requests.append(name)
        data = release.files.get(name)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # A cut connection: the headers promise the whole file, half of it comes, then the socket closes.
        self.wfile.write(data[:len(data) // 2] if name in release.cut else data)

    def log_message(self, *args) -> None:
        """Silent: the tests read the requests from `Release.requests`, not from an access log on stderr."""


class ReleaseServer:
    """`with ReleaseServer(release) as url:` serves `release` at `url` (http://127.0.0.1:<port>) until the end."""

    def __init__(self, release: Release):
        self.release = release
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.release = release
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_port}"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
