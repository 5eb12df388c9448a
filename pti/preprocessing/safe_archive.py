"""Extract untrusted zip/tar archives without ever writing outside the destination folder.

Every refusal is an `ArchiveError` whose one-line message names the archive member and the reason. Extraction goes
into a temporary sibling of `dest` that is renamed into place only when the whole archive was accepted, so a refused
archive leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

logger = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3
CHUNK_BYTES = 1 * MiB
# Tiny members (a text file of spaces) compress far better than any photo or weight file without being a bomb;
# the compression ratio is only judged once a member or the whole archive has produced this much data.
RATIO_GRACE_BYTES = 1 * MiB
DECLARED_TYPES = ("infer", "zip", "tar")


class ArchiveError(ValueError):
    """An archive was refused; the message names the member and the reason, on one line whatever the name holds."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


@dataclass(frozen=True)
class ExtractionLimits:
    max_members: int = 10_000
    max_total_bytes: int = 8 * GiB
    max_member_bytes: int = 4 * GiB
    max_ratio: float = 100.0


def detect_archive_type(path: Path, declared: str = "infer") -> str:
    """Return "zip" or "tar" (also compressed tar) from the file's content; `declared` is cog-sdxl's
    `input_images_filetype` ("zip", "tar" or "infer"), and the content wins when the two disagree."""
    path = Path(path)
    if declared not in DECLARED_TYPES:
        raise ArchiveError(f"{path.name}: unknown archive type {declared!r}, expected one of "
                           f"{', '.join(DECLARED_TYPES)}")
    if not path.is_file():
        raise ArchiveError(f"{path}: not a file")
    detected = _detect_by_content(path)
    if declared != "infer" and declared != detected:
        logger.warning("%s was declared %s but its content is %s; reading it as %s", path.name, declared, detected,
                       detected)
    return detected


def safe_extract(archive: Path, dest: Path, limits: ExtractionLimits | None = None,
                 declared: str = "infer") -> list[Path]:
    """Extract `archive` into `dest` (which must not exist or be empty) and return the extracted files, in archive
    order. Only regular files and folders are accepted; links, devices, escaping paths and bombs are refused."""
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractionLimits()
    kind = detect_archive_type(archive, declared)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{archive.name}: destination {dest} already exists and is not an empty folder")
    created_parents = [folder for folder in (dest.parent, *dest.parent.parents) if not folder.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        extractor = _ZipExtractor if kind == "zip" else _TarExtractor
        relative_files = extractor(archive, staging, limits).run()
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created_parents:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return [dest / rel for rel in relative_files]


ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
COMPRESSED_TAR_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
TAR_MAGIC_OFFSET = 257


def _detect_by_content(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head.startswith(COMPRESSED_TAR_MAGICS) or head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] == b"ustar":
        if _opens_as_tar(path):
            return "tar"
    elif zipfile.is_zipfile(path):  # self-extracting or otherwise prefixed zips
        return "zip"
    elif _opens_as_tar(path):  # pre-POSIX tars carry no magic
        return "tar"
    raise ArchiveError(f"{path.name}: not a zip or tar archive (starts with bytes {head[:8]!r})")


def _opens_as_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:*"):
            return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path a member name may be written to; refuses absolute paths and `..` components."""
    posix = name.replace("\\", "/")
    if "\x00" in posix:
        raise ArchiveError(f"{name!r}: member name contains a NUL byte")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ArchiveError(f"{name}: absolute path")
    parts = [part for part in PurePosixPath(posix).parts if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{name}: path escapes the destination ('..')")
    if not parts:
        raise ArchiveError(f"{name!r}: empty member name")
    return PurePosixPath(*parts)


def _is_top_folder(name: str) -> bool:
    """`.` or `./`: the folder entry `tar -C photos -cf photos.tar .` starts with."""
    return name.replace("\\", "/").rstrip("/") in (".", "")


class _Extractor:
    """Shared bookkeeping: member count, byte budgets, ratio checks and writing streamed data."""

    def __init__(self, archive: Path, root: Path, limits: ExtractionLimits) -> None:
        self.archive = archive
        self.root = root
        self.limits = limits
        self.members_seen = 0
        self.total_written = 0
        self.files: list[PurePosixPath] = []
        self.written: set[PurePosixPath] = set()

    def count_member(self, name: str) -> None:
        self.members_seen += 1
        if self.members_seen > self.limits.max_members:
            raise ArchiveError(f"{name}: archive has more than {self.limits.max_members} members")

    def check_declared_size(self, name: str, size: int) -> None:
        if size > self.limits.max_member_bytes:
            raise ArchiveError(f"{name}: declared size {size} bytes exceeds the per-member limit of "
                               f"{self.limits.max_member_bytes} bytes")

    def make_dir(self, name: str, rel: PurePosixPath) -> None:
        try:
            self.target(rel).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArchiveError(f"{name}: folder cannot be created ({error.strerror})") from None

    def target(self, rel: PurePosixPath) -> Path:
        path = self.root.joinpath(*rel.parts)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ArchiveError(f"{rel}: path escapes the destination")
        return path

    def write_file(self, name: str, rel: PurePosixPath, source: BinaryIO, size_limit: int,
                   compressed_bytes: int) -> None:
        """Stream `source` to disk, counting the bytes actually produced: headers can lie about sizes."""
        if rel in self.written:
            raise ArchiveError(f"{name}: appears twice in the archive")
        self.written.add(rel)
        path = self.target(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = path.open("wb")
        except OSError as error:
            raise ArchiveError(f"{name}: cannot be written ({error.strerror})") from None
        written = 0
        with out:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                self.total_written += len(chunk)
                if written > size_limit:
                    raise ArchiveError(f"{name}: produced more than {size_limit} bytes (its header or the "
                                       f"per-member limit)")
                if self.total_written > self.limits.max_total_bytes:
                    raise ArchiveError(f"{name}: archive expands to more than {self.limits.max_total_bytes} bytes")
                if written > RATIO_GRACE_BYTES and written > self.limits.max_ratio * max(compressed_bytes, 1):
                    raise ArchiveError(f"{name}: compression ratio above {self.limits.max_ratio:g} (zip bomb?)")
                self.check_archive_ratio(name)
                out.write(chunk)
        self.files.append(rel)

    def check_archive_ratio(self, name: str) -> None:
        archive_bytes = max(self.archive.stat().st_size, 1)
        if self.total_written > RATIO_GRACE_BYTES and self.total_written > self.limits.max_ratio * archive_bytes:
            raise ArchiveError(f"{name}: archive expands more than {self.limits.max_ratio:g} times its size (bomb?)")


class _ZipExtractor(_Extractor):
    def run(self) -> list[PurePosixPath]:
        try:
            with zipfile.ZipFile(self.archive) as zf:
                infos = zf.infolist()
                if len(infos) > self.limits.max_members:
                    raise ArchiveError(f"{infos[self.limits.max_members].filename}: archive has {len(infos)} members, "
                                       f"more than {self.limits.max_members}")
                self.check_declared_totals(infos)
                for info in infos:
                    self.extract_member(zf, info)
        except zipfile.BadZipFile as error:
            raise ArchiveError(f"{self.archive.name}: corrupt zip ({error})") from None
        return self.files

    def check_declared_totals(self, infos: list[zipfile.ZipInfo]) -> None:
        total = sum(info.file_size for info in infos)
        if total > self.limits.max_total_bytes:
            raise ArchiveError(f"{self.archive.name}: members declare {total} bytes in total, more than "
                               f"{self.limits.max_total_bytes}")

    def extract_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        name = info.filename
        self.count_member(name)
        kind = _zip_member_kind(info)
        if kind == "dir" and _is_top_folder(name):
            return
        rel = safe_member_path(name)
        if kind == "dir":
            self.make_dir(name, rel)
            return
        if kind != "file":
            raise ArchiveError(f"{name}: {kind} members are not allowed")
        self.check_declared_size(name, info.file_size)
        if info.file_size > RATIO_GRACE_BYTES and info.file_size > self.limits.max_ratio * max(info.compress_size, 1):
            raise ArchiveError(f"{name}: declared compression ratio above {self.limits.max_ratio:g} (zip bomb?)")
        try:
            with zf.open(info) as source:
                self.write_file(name, rel, source, min(info.file_size, self.limits.max_member_bytes),
                                info.compress_size)
        except (RuntimeError, NotImplementedError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise ArchiveError(f"{name}: cannot be extracted ({error})") from None


def _zip_member_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # Unix-made zips keep st_mode in the high bits
        if stat.S_ISLNK(mode):
            return "symlink"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "device file"
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return "fifo/socket"
        if stat.S_ISDIR(mode):
            return "dir"
    return "dir" if info.is_dir() else "file"


class _TarExtractor(_Extractor):
    def run(self) -> list[PurePosixPath]:
        try:
            with tarfile.open(self.archive, mode="r:*") as tar:
                # Iterate lazily: each header is judged before the (possibly compressed) data behind it is read.
                while (member := tar.next()) is not None:
                    self.extract_member(tar, member)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ArchiveError(f"{self.archive.name}: corrupt or truncated tar ({error})") from None
        return self.files

    def extract_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        self.count_member(name)
        if member.isdir() and _is_top_folder(name):
            return
        rel = safe_member_path(name)
        if member.isdir():
            self.make_dir(name, rel)
            return
        if member.issym():
            raise ArchiveError(f"{name}: symlinks are not allowed (points to {member.linkname})")
        if member.islnk():
            raise ArchiveError(f"{name}: hard links are not allowed (points to {member.linkname})")
        if member.ischr() or member.isblk():
            raise ArchiveError(f"{name}: device files are not allowed")
        if member.isfifo():
            raise ArchiveError(f"{name}: fifo members are not allowed")
        if not member.isfile():
            raise ArchiveError(f"{name}: unsupported member type {member.type!r}")
        self.check_declared_size(name, member.size)
        if self.total_written + member.size > self.limits.max_total_bytes:
            raise ArchiveError(f"{name}: archive expands to more than {self.limits.max_total_bytes} bytes")
        source = tar.extractfile(member)
        if source is None:
            raise ArchiveError(f"{name}: cannot be read")
        with source:
            self.write_file(name, rel, source, member.size, compressed_bytes=member.size)
