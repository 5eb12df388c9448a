"""Hostile input, measured: hypothesis throws generated archives and image bytes at preprocessing.

Each generated archive (zip or tar, plain or gzipped) mixes good photos with hostile members: `..` and absolute
names, symlinks and hard links pointing out, device files and fifos, members whose headers declare huge sizes,
corrupt, truncated and bit-flipped images, decompression-bomb headers and garbage caption files. For every case:

* preprocessing either builds a valid dataset folder or raises one of the project's own one-line errors
  (ArchiveError, PreprocessError, CaptionTableError: all ValueError subclasses), nothing else;
* nothing is written outside the work folder (a sandbox is listed before and after, and the absolute paths the
  members aim at are checked);
* no case runs longer than its bound.

The counts (cases tried, accepted, refused by class, slowest case) are printed at the end of the module:
`.venv/bin/python -m pytest -q -s tests/test_fuzz_preprocess.py`.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pti.preprocessing import image_loading
import preprocess
from pti.preprocessing.captioning import CaptionTableError
from pti.preprocessing.safe_archive import ArchiveError

ALLOWED_ERRORS = (ArchiveError, preprocess.PreprocessError, CaptionTableError)
CASE_BOUND_S = 20.0  # one case: a few tiny images through extraction, decoding, cropping and the contact sheet
ARCHIVE_EXAMPLES = 200
IMAGE_EXAMPLES = 250
ESCAPE_ROOT = Path("/tmp") / f"cog-sdxl-fuzz-escape-{os.getpid()}"  # where absolute member names point


@dataclass
class Tally:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    hostile_members: int = 0
    slowest_s: float = 0.0
    escape_checks: int = 0  # listings compared around an extraction or a whole run
    escapes: int = 0  # paths found outside where they may be
    unexpected: int = 0  # exceptions outside ALLOWED_ERRORS

    def record(self, outcome: str, seconds: float) -> None:
        self.cases += 1
        self.outcomes[outcome] += 1
        self.slowest_s = max(self.slowest_s, seconds)


TALLIES = {"archives": Tally(), "images": Tally()}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for name, tally in TALLIES.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items()))
        print(f"\nfuzz {name}: {tally.cases} cases ({tally.hostile_members} hostile members); {outcomes}; "
              f"slowest {tally.slowest_s:.2f}s; {tally.escape_checks} escape checks found {tally.escapes} escapes; "
              f"unexpected exceptions {tally.unexpected}")


# ---------------------------------------------------------------------------------------------- image bytes


def _encoded(seed: int, fmt: str, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's header) and whose data is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@st.composite
def image_bytes(draw) -> tuple[str, bytes, bool]:
    """(kind, bytes, hostile): a valid small image, or one damaged or forged in a generated way."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF"]))
    size = (draw(st.integers(8, 96)), draw(st.integers(8, 96)))
    good = _encoded(draw(st.integers(0, 2**16)), fmt, size)
    kind = draw(st.sampled_from(["good", "truncated", "bitflips", "random", "empty", "bomb_header", "header_only"]))
    if kind == "good":
        return kind, good, False
    if kind == "truncated":
        return kind, good[: draw(st.integers(0, max(len(good) - 1, 0)))], True
    if kind == "bitflips":
        data = bytearray(good)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=16)):
            data[position] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(data), True
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=2048)), True
    if kind == "empty":
        return kind, b"", True
    if kind == "bomb_header":
        return kind, _png_claiming(draw(st.integers(20_000, 2**31 - 1)), draw(st.integers(20_000, 2**31 - 1))), True
    return kind, good[:32], True


# ---------------------------------------------------------------------------------------------- archives


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # file | dir | symlink | hardlink | device | fifo | lying_size
    data: bytes = b""
    link: str = ""
    hostile: bool = False


SAFE_NAMES = st.sampled_from(["a.png", "b.jpg", "photos/c.webp", "x/y/z.png", "UPPER.PNG", "ümlaut ß.jpg",
                              "with space.png", "__MACOSX/._a.png", ".hidden.png", "notes.bin"])


def hostile_names() -> st.SearchStrategy[str]:
    return st.sampled_from([
        "../escape.png", "../../escape.png", "a/../../escape.png", "./../escape.png", "..\\escape.png",
        f"{ESCAPE_ROOT}/abs.png", "/etc/cog-sdxl-fuzz.png", "C:\\windows\\escape.png", "//server/share.png",
        "a/./b/../../../escape.png", "", ".", "..", "a" * 300 + ".png", "dir/" + "b" * 255 + ".png",
    ])


CONTENT_KINDS = ["file"] * 6 + ["dir", "caption", "caption_table"]
STRUCTURE_KINDS = CONTENT_KINDS + ["symlink", "hardlink", "device", "fifo", "lying_size", "zeros"]
ZEROS_BYTES = 8 * 1024**2  # compresses about 1000:1, past the ratio limit


@st.composite
def members(draw) -> list[Member]:
    """Half the archives are hostile in structure (names, links, nodes, sizes), half only in content (damaged
    images, odd captions), so the steps after extraction see plenty of hostile data too."""
    structural = draw(st.booleans())
    count = draw(st.integers(1, 6))
    result = []
    for _ in range(count):
        hostile_name = structural and draw(st.booleans())
        name = draw(hostile_names()) if hostile_name else draw(SAFE_NAMES)
        kind = draw(st.sampled_from(STRUCTURE_KINDS if structural else CONTENT_KINDS))
        if kind == "zeros":
            result.append(Member(name or "zeros.png", "file", bytes(ZEROS_BYTES), hostile=True))
        elif kind in ("file", "lying_size"):
            image_kind, data, hostile_data = draw(image_bytes())
            result.append(Member(name, kind, data, hostile=hostile_name or hostile_data or kind == "lying_size"))
        elif kind == "caption":
            text = draw(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
            result.append(Member(Path(name).with_suffix(".txt").as_posix() if name.strip("./\\") else "a.txt",
                                 "file", text.encode("utf-8", "surrogatepass"), hostile=hostile_name))
        elif kind == "caption_table":
            body = draw(st.sampled_from(["image_file,caption\n", "caption\n", "", "image_file,caption\na.png\n",
                                         "\ufeffimage_file,caption\n../escape.png,TOK\n"]))
            body += draw(st.text(max_size=200))
            result.append(Member(draw(st.sampled_from(["caption.csv", "captions.csv", "x/captions.csv"])), "file",
                                 body.encode("utf-8", "surrogatepass"), hostile=True))
        elif kind in ("symlink", "hardlink"):
            link = draw(st.sampled_from(["../..", "/etc/passwd", str(ESCAPE_ROOT), "a.png", "../escape.png", "."]))
            result.append(Member(name or "link", kind, link=link, hostile=True))
        else:
            result.append(Member(name or "node", kind, hostile=kind != "dir" or hostile_name))
    good_photo = draw(st.booleans())
    if good_photo:  # often one usable photo, so the whole pipeline past extraction runs too
        result.append(Member(f"good{len(result)}.png", "file", _encoded(len(result), "PNG", (48, 40))))
    return result


def _tar_bytes(items: list[Member], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in items:
            info = tarfile.TarInfo(member.name or "unnamed")
            if member.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif member.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if member.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = member.link
                tar.addfile(info)
            elif member.kind == "device":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
            elif member.kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            elif member.kind == "lying_size":  # a header declaring 64 GiB followed by a few bytes: a truncated tar
                info.size = 64 * 1024**3
                buffer.write(info.tobuf(tarfile.GNU_FORMAT))
                buffer.write(member.data)
                tar.offset = buffer.tell()
            else:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


def _zip_bytes(items: list[Member], compress: bool) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    lying: list[str] = []
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", method) as archive:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are one of the hostile cases
        for member in items:
            info = zipfile.ZipInfo(member.name or "unnamed")
            info.create_system = 3
            info.compress_type = method
            if member.kind == "dir":
                info.external_attr = (0o40755 << 16) | 0x10
                info.filename = info.filename.rstrip("/") + "/"
                archive.writestr(info, b"")
            elif member.kind in ("symlink", "hardlink"):
                info.external_attr = 0o120777 << 16
                archive.writestr(info, member.link)
            elif member.kind == "device":
                info.external_attr = 0o20644 << 16
                archive.writestr(info, b"")
            elif member.kind == "fifo":
                info.external_attr = 0o10644 << 16
                archive.writestr(info, b"")
            else:
                info.external_attr = 0o100644 << 16
                archive.writestr(info, member.data)
                if member.kind == "lying_size":
                    lying.append(info.filename)
    data = bytearray(buffer.getvalue())
    for name in lying:  # declare 4 GiB - 1 uncompressed in the central directory and the local header
        encoded = name.encode("utf-8")
        central = data.find(b"PK\x01\x02" + bytes(0), 0)
        while central != -1:
            name_len = struct.unpack_from("<H", data, central + 28)[0]
            if bytes(data[central + 46: central + 46 + name_len]) == encoded:
                struct.pack_into("<I", data, central + 24, 0xFFFFFFFE)
                local = struct.unpack_from("<I", data, central + 42)[0]
                struct.pack_into("<I", data, local + 22, 0xFFFFFFFE)
                break
            central = data.find(b"PK\x01\x02", central + 4)
    return bytes(data)


def _listing(folder: Path, allowed: Path) -> set[str]:
    """Every path under ``folder`` except ``allowed`` and what it holds."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path != allowed and allowed not in path.parents}


def _check_no_escape(tally: Tally, found: set[str], where: str) -> None:
    tally.escape_checks += 1
    tally.escapes += len(found)
    assert not found, f"written outside {where}: {sorted(found)}"


def _extraction_checked(tally: Tally, sandbox: Path):
    """preprocess's safe_extract, followed by a look above the extraction root: the hostile ``..`` names climb one
    or two levels, into the run's temporary folder (removed afterwards) and the work folder."""
    original = preprocess.safe_extract

    def extract_then_look(archive, destination, *args, **kwargs):
        before = _listing(sandbox, Path(destination))
        try:
            return original(archive, destination, *args, **kwargs)
        finally:
            _check_no_escape(tally, _listing(sandbox, Path(destination)) - before, f"the extraction root {destination}")

    return extract_then_look


def _run_preprocess(archive_bytes: bytes, suffix: str, tmp_root: Path) -> tuple[str, Path]:
    """Preprocess one archive in a fresh sandbox; return the outcome name and the dataset folder."""
    sandbox = Path(tmp_root) / f"case{TALLIES['archives'].cases}"
    inputs, work = sandbox / "in", sandbox / "work"
    inputs.mkdir(parents=True)
    work.mkdir()
    archive = inputs / f"upload{suffix}"
    archive.write_bytes(archive_bytes)
    dataset = work / "dataset"
    tally = TALLIES["archives"]
    before = _listing(sandbox, dataset)
    original_extract = preprocess.safe_extract
    preprocess.safe_extract = _extraction_checked(tally, sandbox)
    try:
        preprocess.preprocess(archive, dataset, preprocess.PreprocessSettings(
            resolution=64, captioning_model=None, crop_based_on_salience=False, device="cpu"))
        outcome = "accepted"
    except ALLOWED_ERRORS as error:
        message = str(error)
        assert message and "\n" not in message, f"{type(error).__name__} is not one line: {message!r}"
        outcome = type(error).__name__
    except Exception:
        tally.unexpected += 1
        raise
    finally:
        preprocess.safe_extract = original_extract
    _check_no_escape(tally, _listing(sandbox, dataset) ^ before, "the dataset folder")
    assert not ESCAPE_ROOT.exists() and not Path("/etc/cog-sdxl-fuzz.png").exists()
    assert not (sandbox.parent / "escape.png").exists() and not (Path(tmp_root).parent / "escape.png").exists()
    return outcome, dataset


def _check_dataset(dataset: Path) -> None:
    import csv

    with (dataset / "captions.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, "an accepted upload yields at least one training image"
    for row in rows:
        with Image.open(dataset / row["image_file"]) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
        assert row["caption"].strip()
    assert sorted(p.name for p in dataset.iterdir()) == ["captions.csv", "images", "preview.png"]


@settings(max_examples=ARCHIVE_EXAMPLES, deadline=timedelta(seconds=CASE_BOUND_S), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(items=members(), container=st.sampled_from(["zip", "zip-deflate", "tar", "tar.gz"]))
def test_generated_archives_are_refused_cleanly_or_become_valid_datasets(tmp_path_factory, items, container):
    tally = TALLIES["archives"]
    tmp_root = tmp_path_factory.getbasetemp() / "fuzz-archives"
    tmp_root.mkdir(exist_ok=True)
    if container.startswith("zip"):
        data, suffix = _zip_bytes(items, container == "zip-deflate"), ".zip"
    else:
        data, suffix = _tar_bytes(items, container == "tar.gz"), ".tar.gz" if container == "tar.gz" else ".tar"
    started = time.perf_counter()
    outcome, dataset = _run_preprocess(data, suffix, tmp_root)
    seconds = time.perf_counter() - started
    tally.hostile_members += sum(m.hostile for m in items)
    tally.record(outcome, seconds)
    assert seconds < CASE_BOUND_S
    if outcome == "accepted":
        _check_dataset(dataset)
    shutil.rmtree(tmp_root / f"case{tally.cases - 1}", ignore_errors=True)


@settings(max_examples=IMAGE_EXAMPLES, deadline=timedelta(seconds=CASE_BOUND_S), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=image_bytes(), suffix=st.sampled_from([".png", ".jpg", ".webp", ".gif", ".bmp"]))
def test_generated_image_bytes_decode_or_are_refused_cleanly(tmp_path_factory, case, suffix):
    kind, data, hostile = case
    tally = TALLIES["images"]
    folder = tmp_path_factory.getbasetemp() / "fuzz-images"
    folder.mkdir(exist_ok=True)
    path = folder / f"image{suffix}"
    path.write_bytes(data)
    started = time.perf_counter()
    try:
        photo = image_loading.load_photo(path, path.name, min_side=64)
        assert photo.image.mode == "RGB" and min(photo.image.size) >= 1
        outcome = "decoded"
    except (image_loading.ImageBombError, image_loading.UnreadableImageError) as error:
        assert "\n" not in str(error), str(error)
        outcome = type(error).__name__
    seconds = time.perf_counter() - started
    tally.hostile_members += hostile
    tally.record(outcome, seconds)
    if kind == "bomb_header":
        assert outcome == "ImageBombError", "a header declaring billions of pixels is refused as a bomb"
    if kind == "good":
        assert outcome == "decoded"
    assert seconds < CASE_BOUND_S
