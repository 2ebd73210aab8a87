"""Official weights by name: the release URLs, the download cache against a local release server (download once,
cut connections, checksums, files of the wrong architecture), the errors without network, and .safetensors read
back equal to .pt."""

from __future__ import annotations

import dataclasses
import socket

import jax
import ml_dtypes
import numpy as np
import pytest
from release_server import TINY, TINY_NAME, Release, ReleaseServer, official_weights_file, sha256sums

from marlin_jax import Marlin
from marlin_jax.architectures import OFFICIAL_ARCHITECTURES
from marlin_jax.interop import official_weights
from marlin_jax.interop.official_weights import CACHE_VARIABLE, URL_VARIABLE, DownloadError
from marlin_jax.interop.weights import load_weights

ENCODER_FILE = f"{TINY_NAME}.encoder.pt"
FULL_FILE = f"{TINY_NAME}.full.pt"
OFFICIAL_NAMES = ("marlin_vit_small_ytf", "marlin_vit_base_ytf", "marlin_vit_large_ytf")


@pytest.fixture(scope="module")
def tiny_files(marlin_pytorch) -> dict[str, bytes]:
    return {ENCODER_FILE: official_weights_file(marlin_pytorch, TINY, seed=1, full=False),
            FULL_FILE: official_weights_file(marlin_pytorch, TINY, seed=1, full=True)}


@pytest.fixture
def release(tiny_files) -> Release:
    return Release({**tiny_files, "SHA256SUMS": sha256sums(tiny_files)})


@pytest.fixture
def cache(release, monkeypatch, tmp_path):
    """The release served on 127.0.0.1 as the weights URL, an empty cache, and the tiny model's official name."""
    monkeypatch.setitem(OFFICIAL_ARCHITECTURES, TINY_NAME, TINY)
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    with ReleaseServer(release) as url:
        monkeypatch.setenv(URL_VARIABLE, url)
        yield tmp_path / "cache"


def assert_same_params(a: Marlin, b: Marlin) -> None:
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def cached_files(cache) -> list[str]:
    return sorted(str(path.relative_to(cache)) for path in cache.rglob("*"))


def test_names_map_to_the_urls_marlin_pytorch_downloads(marlin_pytorch, monkeypatch, tmp_path):
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    for name in OFFICIAL_NAMES:
        config = marlin_pytorch.config.resolve_config(name)
        assert official_weights.file_url(name, full_model=False) == config.encoder_model_url
        assert official_weights.file_url(name, full_model=True) == config.full_model_url
    monkeypatch.setenv(URL_VARIABLE, "gs://my-bucket/marlin/")
    assert (official_weights.file_url("marlin_vit_large_ytf", full_model=True)
            == "gs://my-bucket/marlin/marlin_vit_large_ytf.full.pt")
    assert official_weights.parse_name("marlin_vit_base_ytf.full") == ("marlin_vit_base_ytf", True)
    assert official_weights.parse_name("marlin_vit_base_ytf.encoder.pt") is None

    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert official_weights.cache_dir() == tmp_path / ".cache" / "marlin_jax"
    monkeypatch.setenv(CACHE_VARIABLE, "gs://my-bucket/cache")
    with pytest.raises(ValueError, match="must be a local folder"):
        official_weights.cache_dir()


def test_downloads_once_then_reads_the_cache(cache, release, tmp_path):
    model = Marlin.from_online(TINY_NAME)
    assert release.requests == [ENCODER_FILE, "SHA256SUMS"]
    assert cached_files(cache) == [ENCODER_FILE]
    (tmp_path / "local.pt").write_bytes(release.files[ENCODER_FILE])
    assert_same_params(model, Marlin.from_file(TINY, tmp_path / "local.pt"))
    assert not model.has_decoder

    # The same name wherever a weights path is taken: a cache hit, no request.
    assert_same_params(Marlin.from_file(TINY_NAME, TINY_NAME), model)
    assert_same_params(Marlin(TINY, load_weights(TINY, TINY_NAME).generator), model)
    assert len(release.requests) == 2

    full = Marlin.from_file(TINY, f"{TINY_NAME}.full")
    assert full.has_decoder and release.requests[2:] == [FULL_FILE, "SHA256SUMS"]
    assert_same_params(Marlin.from_online(TINY_NAME, full_model=True), full)
    assert len(release.requests) == 4
    Marlin.clean_cache()
    assert not cache.exists()


def test_an_existing_path_wins_over_a_name(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / TINY_NAME).mkdir()
    assert official_weights.is_weights_name(f"{TINY_NAME}.full")
    assert not official_weights.is_weights_name(TINY_NAME)


def test_a_cut_connection_leaves_nothing_in_the_cache(cache, release):
    release.cut.add(ENCODER_FILE)
    with pytest.raises(DownloadError, match=rf"{ENCODER_FILE} broke off after \d+ of \d+ bytes; nothing was cached"):
        Marlin.from_online(TINY_NAME)
    assert cached_files(cache) == []
    release.cut.clear()
    Marlin.from_online(TINY_NAME)
    assert cached_files(cache) == [ENCODER_FILE]


def test_a_file_whose_checksum_differs_is_refused(cache, release):
    release.files["SHA256SUMS"] = sha256sums({ENCODER_FILE: b"another file", FULL_FILE: b""})
    with pytest.raises(DownloadError, match=f"{ENCODER_FILE} has SHA-256 [0-9a-f]{{64}}, but .*SHA256SUMS lists"):
        Marlin.from_online(TINY_NAME)
    release.files["SHA256SUMS"] = sha256sums({FULL_FILE: b""})
    with pytest.raises(DownloadError, match=f"SHA256SUMS lists no checksum for {ENCODER_FILE}"):
        Marlin.from_online(TINY_NAME)
    assert cached_files(cache) == []


def test_a_file_of_another_architecture_is_refused_naming_both(cache, release, marlin_pytorch, tmp_path):
    shallower = official_weights_file(marlin_pytorch, dataclasses.replace(TINY, encoder_depth=1), seed=2, full=False)
    release.files = {ENCODER_FILE: shallower}  # no SHA256SUMS: the strict load alone refuses it
    with pytest.raises(DownloadError, match=rf"refused and not cached: .*another architecture: encoder 64 wide x 1 "
                                            rf"blocks.*the model is {TINY_NAME} \(encoder 64 wide x 2 blocks"):
        Marlin.from_online(TINY_NAME)
    assert cached_files(cache) == []

    # The name's architecture against the model's: refused before any request.
    requests = len(release.requests)
    with pytest.raises(ValueError, match=rf"weights marlin_vit_base_ytf are marlin_vit_base_ytf \(encoder 768 wide "
                                         rf"x 12 blocks.*but the model is {TINY_NAME} \(encoder 64 wide"):
        Marlin.from_file(TINY, "marlin_vit_base_ytf")
    assert len(release.requests) == requests

    # A local file: its official name when it is one, the model's, and the file.
    (tmp_path / "tiny.pt").write_bytes(official_weights_file(marlin_pytorch, TINY, seed=3, full=False))
    with pytest.raises(ValueError, match=rf"tiny.pt: .*another architecture: {TINY_NAME} \(encoder 64 wide x 2 "
                                         r"blocks, no decoder.*the model is marlin_vit_small_ytf \(encoder 384 wide"):
        Marlin.from_file("marlin_vit_small_ytf", tmp_path / "tiny.pt")


def test_an_unknown_name_lists_the_known_ones(tmp_path):
    known = "marlin_vit_small_ytf, marlin_vit_base_ytf, marlin_vit_large_ytf"
    with pytest.raises(ValueError, match=f"'marlin_vit_bsae_ytf' is neither an existing file or folder nor an "
                                         f"official weights name; the names are {known}"):
        Marlin.from_file("marlin_vit_base_ytf", "marlin_vit_bsae_ytf")
    with pytest.raises(ValueError, match=f"--weights 'marlin_vit_bsae_ytf' is neither .* {known}"):
        official_weights.check_weights_argument("marlin_vit_bsae_ytf", "--weights")
    with pytest.raises(ValueError, match=f"no official weights are named 'marlin_vit_huge'; .* {known}"):
        Marlin.from_online("marlin_vit_huge")
    official_weights.check_weights_argument("marlin_vit_large_ytf.full", "--config.init_from")  # nothing fetched
    with pytest.raises(ValueError, match="--weights .*missing.pt does not exist"):
        official_weights.check_weights_argument(str(tmp_path / "missing.pt"), "--weights")


def test_without_network_one_line_says_where_to_put_the_file(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(URL_VARIABLE, f"http://127.0.0.1:{port}/marlin")
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    with pytest.raises(DownloadError) as raised:
        Marlin.from_online("marlin_vit_base_ytf")
    message = str(raised.value)
    assert "\n" not in message
    assert f"cannot download http://127.0.0.1:{port}/marlin/marlin_vit_base_ytf.encoder.pt" in message
    assert f"put it at {tmp_path / 'cache' / 'marlin_vit_base_ytf.encoder.pt'}" in message
    assert [path.name for path in (tmp_path / "cache").iterdir()] == []


def test_safetensors_load_equals_the_pt_load(tiny_files, tmp_path):
    (tmp_path / "official.pt").write_bytes(tiny_files[FULL_FILE])
    full = Marlin.from_file(TINY, tmp_path / "official.pt")
    encoder = Marlin(TINY, {"encoder": full.params["encoder"]})
    for name, model in (("full", full), ("encoder", encoder)):
        files = model.to_pytorch(tmp_path / name)
        from_pt, from_safetensors = (Marlin.from_file(TINY, files[kind]) for kind in ("pt", "safetensors"))
        assert_same_params(from_safetensors, from_pt)
        assert_same_params(from_safetensors, model)

    # bfloat16 is the one dtype numpy (and so safetensors.numpy) lacks: named rather than misread.
    from safetensors.numpy import save
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in encoder.state_dict().items()}
    (tmp_path / "bf16.safetensors").write_bytes(save(bf16))
    with pytest.raises(ValueError, match="bf16.safetensors holds 'BF16' tensors, which numpy cannot hold"):
        Marlin.from_file(TINY, tmp_path / "bf16.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        Marlin.from_file(TINY, tmp_path / "broken.safetensors")
