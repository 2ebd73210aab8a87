"""The official MARLIN release files by name, downloaded once into a local cache.

    marlin_vit_base_ytf        -> <cache>/marlin_vit_base_ytf.encoder.pt   (the encoder, as `from_online` loads)
    marlin_vit_base_ytf.full   -> <cache>/marlin_vit_base_ytf.full.pt      (encoder and decoder)

for each name of `OFFICIAL_ARCHITECTURES` (marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf). The
files come from the official GitHub release (`RELEASE_URL`, the URLs of marlin_pytorch's config.py), or from
`$MARLIN_JAX_WEIGHTS_URL`: a mirror (https://...), a bucket (gs://..., read through etils.epath) or a local folder
holding the same file names. A mirror may serve `SHA256SUMS` (lines `<sha256>  <file name>`, as `sha256sum`
writes them) beside the files; a download is then checked against it. The official release has no such file.

The cache is `$MARLIN_JAX_CACHE_DIR`, else `~/.cache/marlin_jax`. A download goes to a folder of its own inside the
cache and is renamed into place only once it is complete, matches its checksum and loads strictly (the caller's
`check`); an interrupted or refused download leaves nothing under the file's name. A file already in the cache is
used without any request, so a file put there by hand (on a machine without network) is used as it is.

This module only resolves names and moves bytes; `marlin_jax.interop.weights.load_weights` resolves names given as
weights paths and checks each download. It imports nothing heavy, so entry points can check their arguments with
it before JAX loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import BinaryIO

from etils import epath
from tqdm import tqdm

from marlin_jax import storage
from marlin_jax.architectures import OFFICIAL_ARCHITECTURES

RELEASE_URL = "https://github.com/ControlNet/MARLIN/releases/download/model_v1"
URL_VARIABLE = "MARLIN_JAX_WEIGHTS_URL"
CACHE_VARIABLE = "MARLIN_JAX_CACHE_DIR"
CHECKSUMS_NAME = "SHA256SUMS"
FULL_SUFFIX = ".full"
# What a weights path can end with (load_weights reads these); anything else without a folder in it reads as a name.
WEIGHT_FILE_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")
TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_INCOMING_PREFIX = ".incoming-"

log = logging.getLogger(__name__)


class DownloadError(ValueError):
    """A release file that could not be fetched, or was refused; nothing was cached."""


class UnreachableError(DownloadError):
    """The source of the files did not answer (no network, an unknown host, a timeout)."""


def known_names() -> str:
    return ", ".join(OFFICIAL_ARCHITECTURES) + f" (add {FULL_SUFFIX} for the encoder and decoder)"


def parse_name(value: str) -> tuple[str, bool] | None:
    """(model name, full model) for an official weights name, else None."""
    full = value.endswith(FULL_SUFFIX)
    name = value.removesuffix(FULL_SUFFIX)
    return (name, full) if name in OFFICIAL_ARCHITECTURES else None


def is_weights_name(value) -> bool:
    """Whether a weights argument names official weights: a known name that is not also an existing path (a file or
    workdir of that name wins; `./marlin_vit_base_ytf` always means the path)."""
    return isinstance(value, str) and parse_name(value) is not None and not epath.Path(value).exists()


def looks_like_name(value) -> bool:
    """A weights argument meant as a name rather than a path: no folder or scheme in it, no weights-file suffix."""
    text = str(value)
    return "/" not in text and "\\" not in text and epath.Path(text).suffix not in WEIGHT_FILE_SUFFIXES


def unknown_name_error(value, what: str = "weights") -> ValueError:
    return ValueError(f"{what} {value!r} is neither an existing file or folder nor an official weights name; the "
                      f"names are {known_names()}")


def check_weights_argument(value, what: str) -> None:
    """An entry point's startup check of a weights argument: an official name passes (load_weights fetches it), a
    path must exist. Empty values (unset options) pass."""
    if not value or is_weights_name(value):
        return
    try:
        storage.check_exists(value, what)
    except storage.StorageError:
        if not storage.is_remote(value) and looks_like_name(value):
            raise unknown_name_error(value, what) from None
        raise


def file_name(name: str, full_model: bool) -> str:
    """The release's file name: `<name>.full.pt` or `<name>.encoder.pt`."""
    return f"{name}.{'full' if full_model else 'encoder'}.pt"


def base_url() -> str:
    return (os.environ.get(URL_VARIABLE) or RELEASE_URL).rstrip("/")


def file_url(name: str, full_model: bool) -> str:
    return f"{base_url()}/{file_name(name, full_model)}"


def cache_dir() -> epath.Path:
    configured = os.environ.get(CACHE_VARIABLE)
    folder = epath.Path(configured) if configured else epath.Path("~/.cache/marlin_jax").expanduser()
    if storage.is_remote(folder):
        raise ValueError(f"${CACHE_VARIABLE} must be a local folder (weights are read from disk), got {folder}; "
                         f"to fetch them from a bucket, set ${URL_VARIABLE} instead")
    return folder


def clean_cache() -> None:
    """Deletes the cache folder and every file in it."""
    folder = cache_dir()
    if folder.exists():
        shutil.rmtree(folder)
        log.info("removed the MARLIN weights cache %s", folder)


def fetch(name: str, full_model: bool, check: Callable[[epath.Path], None]) -> epath.Path:
    """The cached file of official weights, downloaded first when absent.

    `check(path)` must raise (a ValueError) unless the downloaded file loads strictly; the file enters the cache
    only after it passes. Raises DownloadError, naming the file, the URL and where a copy fetched by other means
    goes, when the download fails.
    """
    if name not in OFFICIAL_ARCHITECTURES:
        raise unknown_name_error(name)
    folder = cache_dir()
    target = folder / file_name(name, full_model)
    if target.is_file():
        return target
    url = file_url(name, full_model)
    folder.mkdir(parents=True, exist_ok=True)
    with _incoming_folder(folder) as incoming:
        downloaded = incoming / target.name
        try:
            digest = _download(url, downloaded)
            expected = _expected_checksum(target.name)
        except FileNotFoundError:
            raise DownloadError(f"{url} does not exist; nothing was cached") from None
        except UnreachableError as error:
            raise DownloadError(f"{error}; nothing was cached. Without network access, download {url} by other "
                                f"means and put it at {target} (or set ${URL_VARIABLE} to a mirror)") from None
        if expected is not None and digest != expected:
            raise DownloadError(f"{url} has SHA-256 {digest}, but {base_url()}/{CHECKSUMS_NAME} lists {expected}; "
                                "it was not cached")
        try:
            check(downloaded)
        except ValueError as error:
            raise DownloadError(f"{url} was refused and not cached: {error}") from None
        os.replace(downloaded, target)  # the same filesystem: the file appears whole or not at all
    log.info("cached %s at %s", url, target)
    return target


@contextlib.contextmanager
def _incoming_folder(cache: epath.Path) -> Iterator[epath.Path]:
    """A folder of this download's own inside the cache (so concurrent downloads never share a temporary), removed
    with whatever is left in it."""
    incoming = tempfile.mkdtemp(prefix=_INCOMING_PREFIX, dir=cache)
    try:
        yield epath.Path(incoming)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _is_url(location: str) -> bool:
    return location.partition("://")[0] in ("http", "https")


def _expected_checksum(file: str) -> str | None:
    """The SHA-256 that the source's SHA256SUMS lists for `file`; None when the source has no SHA256SUMS."""
    location = f"{base_url()}/{CHECKSUMS_NAME}"
    try:
        with _open_source(location) as (source, _):
            text = source.read().decode()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        digest, _, listed = line.strip().partition(" ")
        if listed.strip().lstrip("*") == file:
            return digest.lower()
    raise DownloadError(f"{location} lists no checksum for {file}; nothing was cached")


def _download(location: str, target: epath.Path) -> str:
    """Copies `location` into the local file `target` with a progress bar; returns the SHA-256 of what arrived."""
    digest = hashlib.sha256()
    received = 0
    log.info("downloading %s", location)
    with _open_source(location) as (source, size), open(target, "wb") as out, \
            tqdm(total=size, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
        try:
            while chunk := source.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except OSError as error:  # a reset connection, a timeout, a truncated chunked response
            raise DownloadError(f"the download of {location} broke off after {received} bytes ({error}); nothing "
                                "was cached, run again to retry") from None
    if size is not None and received != size:
        raise DownloadError(f"the download of {location} broke off after {received} of {size} bytes; nothing was "
                            "cached, run again to retry")
    return digest.hexdigest()


@contextlib.contextmanager
def _open_source(location: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """(readable stream, size in bytes or None) of a URL or an epath location. Raises FileNotFoundError when the
    source answers that there is no such file, DownloadError when it cannot be reached."""
    if not _is_url(location):
        path = epath.Path(location)
        try:
            size = path.stat().length
            stream = path.open("rb")
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - gcsfs and others report an unreachable store with many types
            raise UnreachableError(f"cannot read {location} ({type(error).__name__}: {error})") from None
        with stream:
            yield stream, size
        return
    try:
        response = urllib.request.urlopen(location, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise FileNotFoundError(location) from None
        raise DownloadError(f"cannot download {location} (HTTP {error.code} {error.reason}); nothing was "
                            "cached") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UnreachableError(f"cannot download {location} ({reason})") from None
    with response:
        length = response.headers.get("Content-Length")
        yield response, int(length) if length else None
