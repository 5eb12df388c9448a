"""Trained-weights sources fetched into an on-disk LRU cache.

A source is an http(s) URL, a ``data:`` URI, or (where the operator enables local paths) a local tar or folder; each
may also be a bare LoRA ``.safetensors`` file (what civitai and the Hugging Face hub serve), told from a tar by its
first bytes. :meth:`WeightsCache.ensure` resolves it to an extracted folder under ``<cache>/<sha256(source)[:16]>``
(a bare file is kept there as ``BARE_LORA``). Downloads are streamed, resumed with HTTP ``Range`` after a
dropped connection, checked against the announced size (and refused when the server sends an HTML page), bounded in
time as a whole (``download_deadline_s``: a server trickling bytes cannot hold a prediction), and extracted with
:func:`safe_archive.safe_extract`. Least recently used entries are evicted when free disk falls under a floor or the
cache exceeds its byte budget (counted as extracted, so a compressed tar cannot overshoot it); pinned entries (the
weights in use) never are. A failed fetch leaves no entry and no partial file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm.auto import tqdm

from pti.preprocessing.safe_archive import ArchiveError, ExtractionLimits, safe_extract

logger = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3
CHUNK_BYTES = 64 * 1024

OUR_LORA = "pytorch_lora_weights.safetensors"
OUR_EMBEDDINGS = "embeddings.safetensors"
COG_SDXL_LORA = "lora.safetensors"
COG_SDXL_EMBEDDINGS = "embeddings.pti"
FULL_UNET = "unet.safetensors"  # full fine-tunes before single-file checkpoints
FULL_CHECKPOINT = "sdxl_checkpoint.safetensors"  # a full fine-tune as a single-file SGM checkpoint
SPECIAL_PARAMS = "special_params.json"
BARE_LORA = "bare_lora.safetensors"  # a bare .safetensors LoRA source, as its cache entry holds it
UNET_WEIGHT_FILES = (OUR_LORA, COG_SDXL_LORA, FULL_CHECKPOINT, FULL_UNET)


class WeightsError(ValueError):
    """Trained weights could not be fetched, read or applied; the message is one line naming the source and why."""


@dataclass(frozen=True)
class WeightsSettings:
    """Where and how trained weights are cached (env ``WEIGHTS_CACHE_*``; sizes in bytes)."""

    cache_dir: Path
    min_free_bytes: int = 2 * GiB
    max_cache_bytes: int | None = None
    max_download_bytes: int = 8 * GiB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    download_deadline_s: float = 3600.0  # a whole download, all attempts: a server trickling bytes cannot hold a call
    max_redirects: int = 5
    download_attempts: int = 3
    max_loaded_adapters: int = 4
    allow_local_paths: bool = False  # local tar/folder paths as sources: only where the operator enables them

    @classmethod
    def from_env(cls) -> WeightsSettings:
        from pti.models.build_cache import cache_root

        def env_int(name: str, default: int | None) -> int | None:
            value = os.environ.get(name)
            return int(value) if value else default

        defaults = cls(cache_dir=Path())
        return cls(
            cache_dir=Path(os.environ.get("WEIGHTS_CACHE_DIR") or cache_root() / "weights"),
            min_free_bytes=env_int("WEIGHTS_CACHE_MIN_FREE_BYTES", defaults.min_free_bytes),
            max_cache_bytes=env_int("WEIGHTS_CACHE_MAX_BYTES", defaults.max_cache_bytes),
            max_download_bytes=env_int("WEIGHTS_MAX_DOWNLOAD_BYTES", defaults.max_download_bytes),
            download_deadline_s=float(os.environ.get("WEIGHTS_DOWNLOAD_DEADLINE_S") or defaults.download_deadline_s),
            max_loaded_adapters=env_int("WEIGHTS_MAX_LOADED_ADAPTERS", defaults.max_loaded_adapters),
            allow_local_paths=os.environ.get("WEIGHTS_ALLOW_LOCAL_PATHS", "").strip().lower() in ("1", "true", "yes"),
        )


# ---------------------------------------------------------------------------------------------- sources


def redact(source: str) -> str:
    """A source as it may appear in messages and logs: no query string (signed URLs), data: URIs abbreviated."""
    if source.startswith("data:"):
        return source[: source.find(",") + 1] + "…" if "," in source else "data:…"
    parsed = urllib.parse.urlsplit(source)
    if parsed.scheme in ("http", "https"):
        return urllib.parse.urlunsplit((parsed.scheme, parsed.hostname or "", parsed.path, "", ""))
    return source


def source_kind(source: str) -> str:
    """``url``, ``data`` or ``path``."""
    lowered = source[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return "url"
    if lowered.startswith("data:"):
        return "data"
    return "path"


def cache_key(source: str) -> str:
    """The cache entry name of a source: the first 16 hex digits of the SHA-256 of the URL, or for a local tar,
    of its absolute path, size and modification time (so a rewritten file is read again)."""
    if source_kind(source) == "path":
        path = Path(source).expanduser().resolve()
        stat = path.stat()
        source = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length that fits in the file,
    then the header's ``{``."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def decode_data_uri(uri: str, dest: Path, max_bytes: int) -> None:
    """Write the payload of a ``data:[<type>][;base64],<data>`` URI to ``dest``."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise WeightsError(f"{redact(uri)}: malformed data: URI (no comma before the payload)")
    if len(payload) * 3 // 4 > max_bytes:
        raise WeightsError(f"{redact(uri)}: payload is larger than the {max_bytes} byte limit")
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else \
            urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as error:
        raise WeightsError(f"{redact(uri)}: payload is not valid base64 ({error})") from None
    dest.write_bytes(data)


# ---------------------------------------------------------------------------------------------- download


@dataclass(frozen=True)
class _Response:
    status: int
    start: int  # byte offset the body starts at
    total: int | None  # full size of the file, when announced
    resumable: bool


def _describe_response(response: requests.Response, offset: int, url: str) -> _Response:
    status = response.status_code
    if status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise WeightsError(f"{redact(url)}: server answered a range request with a bad Content-Range")
        total = None if match.group(2) == "*" else int(match.group(2))
        return _Response(206, offset, total, True)
    if status != 200:
        raise WeightsError(f"{redact(url)}: HTTP {status} {response.reason}".rstrip())
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/html"):
        raise WeightsError(f"{redact(url)}: server sent an HTML page, not a tar of trained weights")
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() and "Content-Encoding" not in response.headers else None
    return _Response(200, 0, total, response.headers.get("Accept-Ranges", "").lower() == "bytes")


def download(url: str, dest: Path, settings: WeightsSettings, make_room: Callable[[int], None]) -> None:
    """Stream ``url`` to ``dest``. A dropped connection is resumed from the bytes already received (HTTP Range)
    when the server accepts ranges (else from the start), up to ``settings.download_attempts`` times. The received size must match the
    announced one. On failure nothing is left at ``dest`` or in its ``.part`` file."""
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    session = requests.Session()
    session.max_redirects = settings.max_redirects
    deadline = time.monotonic() + settings.download_deadline_s
    try:
        for attempt in range(1, settings.download_attempts + 1):
            try:
                _download_once(session, url, part, settings, make_room, deadline)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                if attempt == settings.download_attempts:
                    raise WeightsError(f"{redact(url)}: download failed after {attempt} attempts "
                                       f"({type(error).__name__})") from None
                received = part.stat().st_size if part.exists() else 0
                logger.warning("%s: connection lost at %d bytes, resuming", redact(url), received)
            except requests.TooManyRedirects:
                raise WeightsError(f"{redact(url)}: more than {settings.max_redirects} redirects") from None
            except requests.RequestException as error:
                raise WeightsError(f"{redact(url)}: download failed ({type(error).__name__})") from None
        os.replace(part, dest)
    finally:
        session.close()
        part.unlink(missing_ok=True)


def _download_once(session: requests.Session, url: str, part: Path, settings: WeightsSettings,
                   make_room: Callable[[int], None], deadline: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-", "Accept-Encoding": "identity"} if offset else \
        {"Accept-Encoding": "identity"}
    timeout = (settings.connect_timeout_s, settings.read_timeout_s)
    with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
        info = _describe_response(response, offset, url)
        if info.status == 200 and offset:
            offset = 0  # the server ignored the range: start over
        if info.total is not None and info.total > settings.max_download_bytes:
            raise WeightsError(f"{redact(url)}: {info.total} bytes is over the {settings.max_download_bytes} byte limit")
        make_room((info.total or 0) - offset)
        received = offset
        mode = "ab" if offset else "wb"
        with open(part, mode) as out, tqdm(total=info.total, initial=offset, unit="B", unit_scale=True,
                                           desc="download weights", leave=False) as bar:
            for chunk in _chunks(response):
                if time.monotonic() > deadline:
                    raise WeightsError(f"{redact(url)}: download took longer than {settings.download_deadline_s:g} s "
                                       f"({received} bytes received); the server is too slow")
                if received == offset and _looks_like_html(chunk):
                    raise WeightsError(f"{redact(url)}: server sent an HTML page, not a tar of trained weights")
                received += len(chunk)
                if received > (info.total or settings.max_download_bytes):
                    raise WeightsError(f"{redact(url)}: server sent more than the "
                                       f"{info.total or settings.max_download_bytes} bytes it announced")
                out.write(chunk)
                bar.update(len(chunk))
        if info.total is not None and received != info.total:
            if info.resumable and received > offset:
                raise requests.exceptions.ChunkedEncodingError(f"received {received} of {info.total} bytes")
            raise WeightsError(f"{redact(url)}: received {received} bytes but the server announced {info.total}")
        if info.total is None and received == 0:
            raise WeightsError(f"{redact(url)}: server sent an empty body")


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each read returns what the socket has (up to CHUNK_BYTES) instead of waiting for a
    full chunk, so a deadline is checked even while a server trickles bytes. urllib3's errors become the requests
    errors that ``iter_content`` would raise."""
    from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError

    try:
        while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
            yield chunk
    except ProtocolError as error:
        raise requests.exceptions.ChunkedEncodingError(error) from None
    except ReadTimeoutError as error:
        raise requests.exceptions.ConnectionError(error) from None
    except DecodeError as error:
        raise requests.exceptions.ContentDecodingError(error) from None


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))


# ---------------------------------------------------------------------------------------------- disk cache


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    last_used: float


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class WeightsCache:
    """Extracted trained tars under ``root/<key>``, least recently used evicted first, pinned entries never."""

    def __init__(self, settings: WeightsSettings):
        self.settings = settings
        self.root = settings.cache_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.pinned: set[str] = set()
        self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """Partial downloads and extractions of a process that was killed."""
        for leftover in self.root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def entries(self) -> list[CacheEntry]:
        """Complete entries, least recently used first."""
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and not path.name.startswith("."):
                found.append(CacheEntry(path.name, path, _folder_bytes(path), path.stat().st_mtime))
        return sorted(found, key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def lookup(self, key: str) -> Path | None:
        """The entry's folder, marked as just used; None on a miss."""
        path = self.root / key
        if not path.is_dir():
            return None
        os.utime(path)
        return path

    def make_room(self, incoming_bytes: int) -> None:
        """Evict least recently used unpinned entries until ``incoming_bytes`` more fit under the byte budget and
        leave at least the free-disk floor."""
        for entry in self.entries():
            if self._fits(incoming_bytes):
                return
            if entry.key in self.pinned:
                continue
            logger.info("weights cache: evicting %s (%d bytes)", entry.key, entry.size_bytes)
            shutil.rmtree(entry.path, ignore_errors=True)
        if not self._fits(incoming_bytes):
            free = shutil.disk_usage(self.root).free
            raise WeightsError(f"weights cache: no room for {incoming_bytes} more bytes (free disk {free} bytes, "
                               f"floor {self.settings.min_free_bytes}, budget {self.settings.max_cache_bytes})")

    def _fits(self, incoming_bytes: int) -> bool:
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.settings.min_free_bytes:
            return False
        budget = self.settings.max_cache_bytes
        return budget is None or self.total_bytes() + incoming_bytes <= budget

    def discard(self, key: str) -> None:
        """Remove an entry (one whose files turned out unreadable: it could only fail again)."""
        shutil.rmtree(self.root / key, ignore_errors=True)

    def ensure(self, source: str, allow_path: bool | None = None, safetensors_only: bool = False) -> Path:
        """The extracted folder of ``source`` (a folder is used in place), fetching it on a miss. A local path is
        refused, without looking at it, unless ``allow_path`` (default: the settings' ``allow_local_paths``).
        ``safetensors_only``: a fetched file that is not a ``.safetensors`` is refused (never extracted or kept)."""
        kind = source_kind(source)
        if kind == "path" and not (self.settings.allow_local_paths if allow_path is None else allow_path):
            raise WeightsError("local paths are not accepted here; give an http(s) URL or a data: URI")
        if kind == "path":
            path = Path(source).expanduser()
            if path.is_dir():
                return path
            if not path.is_file():
                raise WeightsError(f"{source}: no such file or folder")
        key = cache_key(source)
        cached = self.lookup(key)
        if cached is not None:
            return cached
        return self._admit(source, key, safetensors_only)

    def _admit(self, source: str, key: str, safetensors_only: bool = False) -> Path:
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        self.pinned.add(key)
        try:
            archive = self._fetch(source, staging)
            extracted = staging / "extracted"
            self.make_room(archive.stat().st_size)
            if safetensors_only and not is_safetensors(archive):
                raise WeightsError(f"{redact(source)}: not a .safetensors file")
            if is_safetensors(archive):
                extracted.mkdir()
                os.rename(archive, extracted / BARE_LORA)
                folder = extracted
            else:
                try:
                    safe_extract(archive, extracted, self._limits(), declared="tar")
                except ArchiveError as error:
                    raise WeightsError(f"{redact(source)}: not a valid trained-weights tar ({error}), nor a "
                                       ".safetensors LoRA") from None
                archive.unlink()
                folder = weights_folder(extracted, redact(source))
            self.make_room(_folder_bytes(folder))  # a compressed tar extracts to more than it weighed
            entry = self.root / key
            os.rename(folder, entry)
            return entry
        finally:
            self.pinned.discard(key)
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, source: str, staging: Path) -> Path:
        archive = staging / "weights.tar"
        kind = source_kind(source)
        if kind == "url":
            download(source, archive, self.settings, self.make_room)
        elif kind == "data":
            decode_data_uri(source, archive, self.settings.max_download_bytes)
        else:
            shutil.copyfile(Path(source).expanduser(), archive)
        return archive

    def _limits(self) -> ExtractionLimits:
        return ExtractionLimits(max_members=1000, max_total_bytes=2 * self.settings.max_download_bytes,
                                max_member_bytes=self.settings.max_download_bytes, max_ratio=100.0)


def weights_folder(extracted: Path, label: str) -> Path:
    """The folder holding the weight files: the extraction root, or its only subfolder (tars of a folder)."""
    if any((extracted / name).is_file() for name in UNET_WEIGHT_FILES):
        return extracted
    children = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and any((children[0] / n).is_file() for n in UNET_WEIGHT_FILES):
        return children[0]
    raise WeightsError(f"{label}: tar holds none of {', '.join(UNET_WEIGHT_FILES)}")
