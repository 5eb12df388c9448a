"""Hostile and ordinary archives through safe_extract: refusals are one-line ArchiveErrors and leave nothing behind."""

import gzip
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pti.preprocessing.safe_archive import ArchiveError, ExtractionLimits, detect_archive_type, safe_extract, safe_member_path


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def add_tar_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_tar_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def everything_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work folder inside tmp_path, so a test can check that nothing appeared next to it."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def assert_refused(archive: Path, work: Path, match: str, limits: ExtractionLimits | None = None) -> str:
    outside_before = everything_under(work.parent)
    dest = work / "out"
    with pytest.raises(ArchiveError, match=match) as caught:
        safe_extract(archive, dest, limits)
    message = str(caught.value)
    assert "\n" not in message
    assert not dest.exists(), "a refused archive must leave no destination behind"
    assert everything_under(work.parent) == outside_before, "a refused archive must write nothing anywhere"
    return message


def test_zip_with_folders_is_extracted(work: Path) -> None:
    archive = make_zip(work / "photos.zip", {"a/b/one.txt": b"one", "two.txt": b"two", "a/empty/": b""})
    files = safe_extract(archive, work / "out")
    assert [f.relative_to(work / "out").as_posix() for f in files] == ["a/b/one.txt", "two.txt"]
    assert (work / "out/a/b/one.txt").read_bytes() == b"one"
    assert (work / "out/a/empty").is_dir()
    assert {p.name for p in work.iterdir()} == {"photos.zip", "out"}, "no staging folder may be left behind"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_variants_detected_by_content_not_extension(work: Path, mode: str) -> None:
    archive = work / "misleading.zip"
    with tarfile.open(archive, mode) as tar:
        add_tar_file(tar, "dir/x.txt", b"hello")
    assert detect_archive_type(archive) == "tar"
    assert detect_archive_type(archive, declared="zip") == "tar"
    files = safe_extract(archive, work / "out", declared="zip")
    assert [f.read_bytes() for f in files] == [b"hello"]


def test_tar_of_dot_folder_is_extracted(work: Path) -> None:
    archive = work / "dot.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_special(tar, ".", tarfile.DIRTYPE)
        add_tar_special(tar, "./sub", tarfile.DIRTYPE)
        add_tar_file(tar, "./sub/a.txt", b"a")
    files = safe_extract(archive, work / "out")
    assert files == [work / "out" / "sub" / "a.txt"]


def test_unknown_declared_type_and_non_archive_are_refused(work: Path) -> None:
    archive = make_zip(work / "a.zip", {"x": b"x"})
    with pytest.raises(ArchiveError, match="unknown archive type 'rar'"):
        detect_archive_type(archive, declared="rar")
    text = work / "notes.tar"
    text.write_bytes(b"just some text, not an archive" * 10)
    assert_refused(text, work, "notes.tar: not a zip or tar archive")


def test_refusal_removes_the_parent_folders_it_created(work: Path) -> None:
    archive = make_zip(work / "slip.zip", {"../evil.txt": b"pwned"})
    with pytest.raises(ArchiveError):
        safe_extract(archive, work / "new" / "deeper" / "out")
    assert sorted(p.name for p in work.iterdir()) == ["slip.zip"]


def test_existing_non_empty_destination_is_refused(work: Path) -> None:
    archive = make_zip(work / "a.zip", {"x": b"x"})
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract(archive, work / "out")
    assert (work / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "..\\evil.txt"])
def test_zip_slip_is_refused(work: Path, name: str) -> None:
    archive = make_zip(work / "slip.zip", {"good.txt": b"fine", name: b"pwned"})
    message = assert_refused(archive, work, r"\('\.\.'\)")
    assert "evil.txt" in message


def test_tar_slip_is_refused(work: Path) -> None:
    archive = work / "slip.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_file(tar, "good.txt", b"fine")
        add_tar_file(tar, "sub/../../evil.txt", b"pwned")
    assert_refused(archive, work, r"sub/\.\./\.\./evil.txt: path escapes")


def test_absolute_paths_are_refused(work: Path) -> None:
    zipped = make_zip(work / "abs.zip", {"/tmp/evil.txt": b"pwned"})
    # zipfile strips a leading "/" when writing, so patch the stored name back to an absolute one.
    raw = zipped.read_bytes().replace(b"tmp/evil.txt", b"/mp/evil.txt")
    zipped.write_bytes(raw)
    assert_refused(zipped, work, "/mp/evil.txt: absolute path")
    tarred = work / "abs.tar"
    with tarfile.open(tarred, "w") as tar:
        add_tar_file(tar, "/tmp/evil.txt", b"pwned")
    assert_refused(tarred, work, "/tmp/evil.txt: absolute path")


def test_tar_symlink_escape_is_refused(work: Path) -> None:
    archive = work / "link.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_special(tar, "escape", tarfile.SYMTYPE, linkname="../../..")
        add_tar_file(tar, "escape/evil.txt", b"pwned")
    assert_refused(archive, work, r"escape: symlinks are not allowed \(points to \.\./\.\./\.\.\)")


def test_tar_hard_link_is_refused(work: Path) -> None:
    archive = work / "hard.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_special(tar, "passwd", tarfile.LNKTYPE, linkname="/etc/passwd")
    assert_refused(archive, work, "passwd: hard links are not allowed")


def test_zip_symlink_is_refused(work: Path) -> None:
    archive = work / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("escape")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
    assert_refused(archive, work, "escape: symlink members are not allowed")


@pytest.mark.parametrize("kind, reason", [(tarfile.CHRTYPE, "device files"), (tarfile.BLKTYPE, "device files"),
                                          (tarfile.FIFOTYPE, "fifo")])
def test_tar_device_and_fifo_are_refused(work: Path, kind: bytes, reason: str) -> None:
    archive = work / "dev.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_special(tar, "dev/null", kind)
    assert_refused(archive, work, f"dev/null: {reason}")


def test_zip_bomb_by_ratio_is_refused(work: Path) -> None:
    archive = make_zip(work / "bomb.zip", {"zeros.bin": bytes(20 * 1024**2)})
    assert_refused(archive, work, r"zeros.bin: declared compression ratio above 100")


def test_zip_whose_header_understates_the_size_is_refused(work: Path) -> None:
    data = bytes(5 * 1024**2)
    archive = make_zip(work / "liar.zip", {"zeros.bin": data})
    raw = bytearray(archive.read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    raw[local + 22:local + 26] = (1000).to_bytes(4, "little")
    raw[central + 24:central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    assert_refused(archive, work, "zeros.bin: cannot be extracted .*Bad CRC-32")


def test_gzip_tar_bomb_is_refused_while_streaming(work: Path) -> None:
    archive = work / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_tar_file(tar, "zeros.bin", bytes(20 * 1024**2))
    assert gzip.decompress(archive.read_bytes())  # a valid archive, only far too compressible
    assert_refused(archive, work, "zeros.bin: archive expands more than 100 times its size")


def test_too_many_members_is_refused(work: Path) -> None:
    limits = ExtractionLimits(max_members=5, max_total_bytes=10**6, max_member_bytes=10**6, max_ratio=100)
    zipped = make_zip(work / "many.zip", {f"{i}.txt": b"x" for i in range(6)})
    assert_refused(zipped, work, "5.txt: archive has 6 members, more than 5", limits)
    tarred = work / "many.tar"
    with tarfile.open(tarred, "w") as tar:
        for i in range(6):
            add_tar_file(tar, f"{i}.txt", b"x")
    assert_refused(tarred, work, "5.txt: archive has more than 5 members", limits)


def test_size_limits_are_enforced(work: Path) -> None:
    limits = ExtractionLimits(max_members=100, max_total_bytes=2500, max_member_bytes=1500, max_ratio=100)
    big_member = make_zip(work / "big.zip", {"big.bin": b"x" * 2000}, compression=zipfile.ZIP_STORED)
    assert_refused(big_member, work, "big.bin: declared size 2000 bytes exceeds the per-member limit", limits)
    too_much = work / "total.tar"
    with tarfile.open(too_much, "w") as tar:
        for i in range(3):
            add_tar_file(tar, f"{i}.bin", b"x" * 1000)
    assert_refused(too_much, work, "2.bin: archive expands to more than 2500 bytes", limits)


def test_duplicate_members_are_refused(work: Path) -> None:
    archive = work / "twice.tar"
    with tarfile.open(archive, "w") as tar:
        add_tar_file(tar, "a/photo.jpg", b"first")
        add_tar_file(tar, "a//./photo.jpg", b"second")
    assert_refused(archive, work, "a//./photo.jpg: appears twice in the archive")


def test_truncated_tar_is_refused(work: Path) -> None:
    archive = work / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_tar_file(tar, "a.bin", bytes(range(256)) * 400)
    archive.write_bytes(archive.read_bytes()[:200])
    assert_refused(archive, work, "cut.tar.gz: corrupt or truncated tar")


@settings(max_examples=300, deadline=None)
@example("\n:")  # a control character in a refused name must not break the one-line message
@given(st.lists(st.sampled_from(["..", ".", "", "a", "b.png", "/", "\\", "C:", "~", "\x00", " "]), max_size=6)
       .map("/".join) | st.text(max_size=30))
def test_accepted_member_names_always_land_inside(name: str) -> None:
    try:
        rel = safe_member_path(name)
    except ArchiveError as error:
        assert "\n" not in str(error)
        return
    joined = os.path.normpath(os.path.join("/base", *rel.parts))
    assert joined.startswith("/base/") and not rel.is_absolute() and ".." not in rel.parts
