"""Downloads of trained weights from a misbehaving server: every fault is a one-line WeightsError, within a time
bound, and leaves nothing in the weights cache; a good download into the same cache still works afterwards."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from pti.inference import weights_cache as wc
import weights_manager as wm
from misbehaving_server import MisbehavingServer
from weights_fixtures import write_trained_tar

CASE_BOUND_S = 20.0
MiB = 1024**2


@pytest.fixture(scope="module")
def tar_path(tmp_path_factory) -> Path:
    return write_trained_tar(tmp_path_factory.mktemp("served"), seed=1)


@pytest.fixture(scope="module")
def server(tar_path):
    with MisbehavingServer(tar_path.parent, stall_s=6.0, trickle_interval_s=0.02) as running:
        yield running


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def settings(cache_dir: Path, **overrides) -> wc.WeightsSettings:
    values = dict(cache_dir=cache_dir, min_free_bytes=0, connect_timeout_s=1.0, read_timeout_s=1.0,
                  download_attempts=2, download_deadline_s=3.0)
    return wc.WeightsSettings(**{**values, **overrides})


FAULTS = [
    ("no answer (read timeout)", "silent", {}, r"download failed after 2 attempts \(\w*Timeout\)"),
    ("stalls half-way", "stall/{tar}", {}, r"download failed after 2 attempts"),
    ("trickles a byte at a time", "trickle/{tar}", {}, r"took longer than 3 ?s"),
    ("drops every connection half-way", "drop-always/{tar}", {}, r"download failed after 2 attempts"),
    ("sends less than announced", "short/{tar}", {}, r"download failed|received \d+ bytes but the server announced"),
    ("sends more than announced", "long/{tar}", {}, r"not a valid trained-weights tar"),
    ("HTML error page", "html", {}, r"HTML page, not a tar"),
    ("HTML page labelled as a tar", "html-as-tar", {}, r"HTML page, not a tar"),
    ("HTTP 403", "status/403", {}, r"HTTP 403"),
    ("HTTP 500", "status/500", {}, r"HTTP 500"),
    ("redirect loop", "loop", {}, r"more than 5 redirects"),
    ("endless body", "endless", {"max_download_bytes": 4 * MiB}, r"more than the 4194304 bytes"),
    ("gzip bomb", "gzip-bomb", {"max_download_bytes": 4 * MiB}, r"more than the 4194304 bytes"),
    ("missing file", "files/nothing.tar", {}, r"HTTP 404"),
    ("connection refused", None, {}, r"download failed after 2 attempts \(ConnectionError\)"),
]


@pytest.mark.parametrize(("case", "path", "overrides", "expected"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_misbehaving_download_is_one_clear_error_and_leaves_no_cache_entry(server, tar_path, cache_dir, case, path,
                                                                            overrides, expected):
    url = server.url(path.format(tar=tar_path.name)) if path else "http://127.0.0.1:9/weights.tar"
    cache = wc.WeightsCache(settings(cache_dir, **overrides))
    started = time.perf_counter()
    with pytest.raises(wc.WeightsError, match=expected) as error:
        cache.ensure(url + "?X-Amz-Signature=secret")
    elapsed = time.perf_counter() - started
    message = str(error.value)
    assert "\n" not in message and len(message) < 300, message
    assert "secret" not in message, "signed URLs are not echoed"
    assert elapsed < CASE_BOUND_S, f"{case} took {elapsed:.1f}s"
    assert cache.entries() == [] and list(cache.root.iterdir()) == [], "no entry and no partial file is left"


def test_a_connection_dropped_once_resumes_with_range_and_the_cache_still_works(server, tar_path, cache_dir):
    cache = wc.WeightsCache(settings(cache_dir))
    folder = cache.ensure(server.url("drop-once/" + tar_path.name))
    ranges = [rng for path, rng in server.requests if path == "/drop-once/" + tar_path.name]
    assert ranges[0] is None and ranges[1].startswith("bytes="), ranges
    assert wm.read_trained_weights(folder).lora is not None
    assert [entry.path for entry in cache.entries()] == [folder]


def test_a_compressed_tar_cannot_push_the_cache_over_its_budget(tmp_path):
    """The budget is checked against what the tar extracts to, not what it weighs compressed."""
    files = {"pytorch_lora_weights.safetensors": bytes(900 * 1024), "special_params.json": b"{}"}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    packed = tmp_path / "weights.tar.gz"
    packed.write_bytes(gzip.compress(raw.getvalue()))
    assert packed.stat().st_size < 10 * 1024
    cache = wc.WeightsCache(settings(tmp_path / "cache", max_cache_bytes=500 * 1024, allow_local_paths=True))
    with pytest.raises(wc.WeightsError, match="no room"):
        cache.ensure(str(packed))
    assert cache.entries() == [] and list(cache.root.iterdir()) == []
