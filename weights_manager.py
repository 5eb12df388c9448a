"""Trained weights, hot: fetch trained tars into an on-disk LRU cache and switch them on a live SDXL pipeline.

Three layers, each usable alone:

* :class:`WeightsCache` resolves a weights source (http(s) URL, ``data:`` URI, local tar or folder) to an extracted
  folder. Entries live under ``<cache>/<sha256(source)[:16]>``; downloads are streamed, resumed with HTTP ``Range``
  after a dropped connection, checked against the announced size, and extracted with
  :func:`safe_archive.safe_extract`. Least recently used entries are evicted when free disk falls under a floor or
  the cache exceeds its byte budget; pinned entries (the weights in use) never are. A failed fetch leaves no entry.
* :func:`read_trained_weights` reads a folder in this project's artifact layout or replicate/cog-sdxl's
  (``lora.safetensors`` with attention-processor keys, ``embeddings.pti``) into one :class:`TrainedWeights`.
* :class:`LiveWeights` keeps a bounded set of PEFT adapters loaded in the UNet by name and swaps the new-token
  embeddings with them. Only one adapter is active at a time; without weights the pipeline is the clean base
  (adapters disabled, tokenizers without the new tokens), so it produces exactly what a fresh process does. A
  load that fails or is cancelled half-way is rolled back to the base.

:class:`WeightsManager` ties them together for the predictor.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

import lora_formats
from lora_formats import LoraFormatError, PeftLora
from safe_archive import ArchiveError, ExtractionLimits, safe_extract

logger = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3
CHUNK_BYTES = 64 * 1024

OUR_LORA = "pytorch_lora_weights.safetensors"
OUR_EMBEDDINGS = "embeddings.safetensors"
COG_SDXL_LORA = "lora.safetensors"
COG_SDXL_EMBEDDINGS = "embeddings.pti"
FULL_UNET = "unet.safetensors"
SPECIAL_PARAMS = "special_params.json"
UNET_WEIGHT_FILES = (OUR_LORA, COG_SDXL_LORA, FULL_UNET)


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
    max_redirects: int = 5
    download_attempts: int = 3
    max_loaded_adapters: int = 4

    @classmethod
    def from_env(cls) -> WeightsSettings:
        from base_model import cache_root

        def env_int(name: str, default: int | None) -> int | None:
            value = os.environ.get(name)
            return int(value) if value else default

        defaults = cls(cache_dir=Path())
        return cls(
            cache_dir=Path(os.environ.get("WEIGHTS_CACHE_DIR") or cache_root() / "weights"),
            min_free_bytes=env_int("WEIGHTS_CACHE_MIN_FREE_BYTES", defaults.min_free_bytes),
            max_cache_bytes=env_int("WEIGHTS_CACHE_MAX_BYTES", defaults.max_cache_bytes),
            max_download_bytes=env_int("WEIGHTS_MAX_DOWNLOAD_BYTES", defaults.max_download_bytes),
            max_loaded_adapters=env_int("WEIGHTS_MAX_LOADED_ADAPTERS", defaults.max_loaded_adapters),
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
    try:
        for attempt in range(1, settings.download_attempts + 1):
            try:
                _download_once(session, url, part, settings, make_room)
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
                   make_room: Callable[[int], None]) -> None:
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
            for chunk in response.iter_content(CHUNK_BYTES):
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

    def ensure(self, source: str) -> Path:
        """The extracted folder of ``source`` (a folder is used in place), fetching it on a miss."""
        kind = source_kind(source)
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
        return self._admit(source, key)

    def _admit(self, source: str, key: str) -> Path:
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        self.pinned.add(key)
        try:
            archive = self._fetch(source, staging)
            extracted = staging / "extracted"
            self.make_room(archive.stat().st_size)
            try:
                safe_extract(archive, extracted, self._limits(), declared="tar")
            except ArchiveError as error:
                raise WeightsError(f"{redact(source)}: not a valid trained-weights tar ({error})") from None
            archive.unlink()
            folder = weights_folder(extracted, redact(source))
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


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class TrainedWeights:
    """One trained model in memory: a UNet LoRA (PEFT layout) or full UNet weights, the new-token embeddings
    (``clip_l``/``clip_g``, rows in ``<s0>…<sN>`` order) and the trigger words."""

    lora: PeftLora | None
    unet_full: dict[str, Tensor] | None
    embeddings: dict[str, Tensor]
    special_params: dict[str, str]

    @property
    def tokens(self) -> list[str]:
        rows = next(iter(self.embeddings.values())).shape[0] if self.embeddings else 0
        return [f"<s{i}>" for i in range(rows)]


def _read_safetensors(path: Path, label: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{label}: {path.name} is not a readable safetensors file ({error})") from None


def read_special_params(folder: Path, label: str) -> dict[str, str]:
    path = folder / SPECIAL_PARAMS
    if not path.is_file():
        return {}
    try:
        params = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{label}: {SPECIAL_PARAMS} is not valid JSON ({error})") from None
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise WeightsError(f"{label}: {SPECIAL_PARAMS} must map trigger words to token strings")
    return params


def read_trained_weights(folder: Path, label: str | None = None) -> TrainedWeights:
    """Read a trained-weights folder in this project's layout or replicate/cog-sdxl's."""
    label = label or str(folder)
    try:
        lora, unet_full = _read_unet_weights(folder, label)
        embeddings = _read_embeddings(folder, label)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    widths = {name: t.shape[0] for name, t in embeddings.items()}
    if len(set(widths.values())) > 1:
        raise WeightsError(f"{label}: embeddings have different token counts {widths}")
    return TrainedWeights(lora, unet_full, embeddings, read_special_params(folder, label))


def _read_unet_weights(folder: Path, label: str) -> tuple[PeftLora | None, dict[str, Tensor] | None]:
    if (folder / OUR_LORA).is_file():
        tensors, metadata = _read_safetensors(folder / OUR_LORA, label)
        return lora_formats.diffusers_file_to_peft(tensors, metadata), None
    if (folder / COG_SDXL_LORA).is_file():
        tensors, _ = _read_safetensors(folder / COG_SDXL_LORA, label)
        return lora_formats.cog_sdxl_lora_to_peft(tensors), None
    if (folder / FULL_UNET).is_file():
        return None, _read_safetensors(folder / FULL_UNET, label)[0]
    raise WeightsError(f"{label}: folder holds none of {', '.join(UNET_WEIGHT_FILES)}")


def _read_embeddings(folder: Path, label: str) -> dict[str, Tensor]:
    if (folder / OUR_EMBEDDINGS).is_file():
        tensors, _ = _read_safetensors(folder / OUR_EMBEDDINGS, label)
        missing = {"clip_l", "clip_g"} - set(tensors)
        if missing:
            raise WeightsError(f"{label}: {OUR_EMBEDDINGS} lacks {', '.join(sorted(missing))}")
        return {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    if (folder / COG_SDXL_EMBEDDINGS).is_file():
        tensors, _ = _read_safetensors(folder / COG_SDXL_EMBEDDINGS, label)
        return lora_formats.cog_sdxl_embeddings(tensors)
    return {}


# ---------------------------------------------------------------------------------------------- live pipeline


def expand_triggers(prompt: str, special_params: dict[str, str]) -> tuple[str, bool]:
    """Replace each trigger word (whole words only) by its tokens; also say whether any trigger was found."""
    found = False
    for trigger, tokens in special_params.items():
        pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")
        prompt, count = pattern.subn(tokens.replace("\\", r"\\"), prompt)
        found = found or count > 0
    return prompt, found


class TokenTables:
    """The new tokens ``<s0>…<sN>`` of the active weights: tokenizers that know them, embedding rows behind them.

    The base tokenizers are never changed; an extended copy per token count is swapped onto the pipelines while
    trained weights are active. The text encoders' embedding tables grow once (rows appended, existing rows
    untouched), and the active weights' vectors are written into the appended rows. The base tokenizers never
    produce those ids, so the base model's outputs do not depend on them.
    """

    ENCODER_NAMES = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))

    def __init__(self, pipelines: Sequence):
        self.pipelines = list(pipelines)
        base = self.pipelines[0]
        self.base_tokenizers = {tok: getattr(base, tok) for tok, _, _ in self.ENCODER_NAMES}
        self.encoders = {key: getattr(base, enc) for _, enc, key in self.ENCODER_NAMES}
        self.base_vocab = {tok: len(t) for tok, t in self.base_tokenizers.items()}
        self._extended: dict[int, dict[str, object]] = {}

    def check(self, embeddings: dict[str, Tensor], label: str) -> None:
        """Refuse embeddings whose width is not this base model's."""
        for key, table in embeddings.items():
            width = self.encoders[key].get_input_embeddings().weight.shape[1]
            if table.dim() != 2 or table.shape[1] != width:
                raise WeightsError(f"{label}: {key} embeddings have shape {list(table.shape)} but this base model's "
                                   f"text encoder has width {width} (weights trained for another base model?)")

    def activate(self, embeddings: dict[str, Tensor]) -> None:
        n = next(iter(embeddings.values())).shape[0] if embeddings else 0
        if n == 0:
            self.deactivate()
            return
        for tok, _, key in self.ENCODER_NAMES:
            weight = self._grown(key, self.base_vocab[tok] + n).weight
            start = self.base_vocab[tok]
            with torch.no_grad():
                weight[start:start + n] = embeddings[key].to(device=weight.device, dtype=weight.dtype)
        self._set_tokenizers(self._extended_tokenizers(n))

    def deactivate(self) -> None:
        self._set_tokenizers(self.base_tokenizers)

    def _grown(self, key: str, rows: int) -> torch.nn.Embedding:
        encoder = self.encoders[key]
        table = encoder.get_input_embeddings()
        if table.weight.shape[0] >= rows:
            return table
        old = table.weight.data
        grown = torch.nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[: old.shape[0]] = old
        encoder.set_input_embeddings(grown)
        encoder.config.vocab_size = rows
        return grown

    def _extended_tokenizers(self, n: int) -> dict[str, object]:
        if n not in self._extended:
            tokens = [f"<s{i}>" for i in range(n)]
            extended = {}
            for name, base in self.base_tokenizers.items():
                tokenizer = copy.deepcopy(base)
                tokenizer.add_tokens(tokens, special_tokens=True)
                ids = tokenizer.convert_tokens_to_ids(tokens)
                if ids != list(range(self.base_vocab[name], self.base_vocab[name] + n)):
                    raise RuntimeError(f"{name}: new tokens got ids {ids}, expected them after the base vocabulary")
                extended[name] = tokenizer
            self._extended[n] = extended
        return self._extended[n]

    def _set_tokenizers(self, tokenizers: dict[str, object]) -> None:
        for pipe in self.pipelines:
            for name, tokenizer in tokenizers.items():
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, tokenizer)

    def active_tokenizers(self) -> list:
        base = self.pipelines[0]
        return [getattr(base, tok) for tok, _, _ in self.ENCODER_NAMES]


@dataclass
class _Loaded:
    """A trained model whose adapter sits in the UNet (or, for full UNet weights, whose tensors are in memory)."""

    adapter: str | None
    weights: TrainedWeights = field(repr=False)


class FullUnetPatch:
    """Full fine-tuned UNet weights (``unet.safetensors``) applied in place; the base values of every tensor ever
    replaced are kept (on CPU) to restore the base exactly."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._base: dict[str, Tensor] = {}
        self._applied: set[str] = set()

    def check(self, state: dict[str, Tensor], label: str) -> None:
        params = self.unet.state_dict()
        for key, value in state.items():
            if key not in params:
                raise WeightsError(f"{label}: {FULL_UNET} has {key!r}, which this base model's UNet lacks")
            if tuple(value.shape) != tuple(params[key].shape):
                raise WeightsError(f"{label}: {FULL_UNET} {key} has shape {list(value.shape)} but this base model's "
                                   f"is {list(params[key].shape)} (weights trained for another base model?)")

    def apply(self, state: dict[str, Tensor]) -> None:
        params = self.unet.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if key not in self._base:
                    self._base[key] = params[key].detach().to("cpu", copy=True)
                self._applied.add(key)
                params[key].copy_(value.to(device=params[key].device, dtype=params[key].dtype))

    def restore(self) -> None:
        params = self.unet.state_dict()
        with torch.no_grad():
            for key in sorted(self._applied):
                params[key].copy_(self._base[key].to(device=params[key].device, dtype=params[key].dtype))
        self._applied.clear()


class LiveWeights:
    """Switches trained weights on the pipelines (the first one owns the UNet; all share the text encoders).

    ``activate(key, read, lora_scale)`` makes ``key`` the active weights, reading them with ``read()`` only when
    their adapter is not already loaded; ``deactivate()`` returns to the clean base. At most
    ``max_loaded`` adapters stay loaded, least recently used evicted. Any exception (or cancellation) during a
    switch leaves the pipelines on the base model, with no half-loaded adapter.
    """

    def __init__(self, pipelines: Sequence, max_loaded: int):
        self.pipelines = list(pipelines)
        self.unet = self.pipelines[0].unet
        self.tokens = TokenTables(self.pipelines)
        self.full_unet = FullUnetPatch(self.unet)
        self.max_loaded = max(1, max_loaded)
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.active: str | None = None
        self._consistent = True

    @property
    def active_weights(self) -> TrainedWeights | None:
        return self.loaded[self.active].weights if self.active else None

    def activate(self, key: str, read: Callable[[], TrainedWeights], lora_scale: float, label: str) -> TrainedWeights:
        self._switch(lambda: self._activate(key, read, lora_scale, label))
        return self.loaded[key].weights

    def deactivate(self) -> None:
        self._switch(lambda: None)

    def _switch(self, then: Callable[[], None]) -> None:
        if not self._consistent:
            self._reset()
        self._consistent = False
        try:
            self._to_base()
            then()
        except BaseException:
            self._reset()
            raise
        self._consistent = True

    def _to_base(self) -> None:
        if self._adapter_names():
            self.unet.disable_lora()
        self.full_unet.restore()
        self.tokens.deactivate()
        self.active = None

    def _reset(self) -> None:
        """Back to the base after an interrupted switch: also drop adapters that were never fully registered."""
        registered = {entry.adapter for entry in self.loaded.values()}
        stray = [name for name in self._adapter_names() if name not in registered]
        if stray:
            self.unet.delete_adapters(stray)
        self._to_base()
        self._consistent = True

    def _adapter_names(self) -> list[str]:
        return list(getattr(self.unet, "peft_config", {}) or {})

    def _activate(self, key: str, read: Callable[[], TrainedWeights], lora_scale: float, label: str) -> None:
        entry = self.loaded.get(key)
        if entry is None:
            entry = self._load(key, read(), label)
        self.loaded.move_to_end(key)
        weights = entry.weights
        if entry.adapter is not None:
            self.unet.set_adapters([entry.adapter], weights=[lora_scale])
            self.unet.enable_lora()
        if weights.unet_full is not None:
            self.full_unet.apply(weights.unet_full)
        self.tokens.activate(weights.embeddings)
        self.active = key

    def _load(self, key: str, weights: TrainedWeights, label: str) -> _Loaded:
        self.tokens.check(weights.embeddings, label)
        if weights.unet_full is not None:
            self.full_unet.check(weights.unet_full, label)
            entry = _Loaded(None, weights)
        else:
            self._check_lora(weights.lora, label)
            self._evict_to(self.max_loaded - 1)
            adapter = f"w{key}"
            self._load_adapter(adapter, weights.lora, label)
            entry = _Loaded(adapter, TrainedWeights(None, None, weights.embeddings, weights.special_params))
        self.loaded[key] = entry
        return entry

    def _evict_to(self, count: int) -> None:
        while len(self.loaded) > count:
            _, entry = self.loaded.popitem(last=False)
            if entry.adapter is not None:
                self.unet.delete_adapters(entry.adapter)

    def _check_lora(self, lora: PeftLora, label: str) -> None:
        modules = dict(self.unet.named_modules())
        for module in lora.modules:
            target = modules.get(module)
            target = getattr(target, "base_layer", target)
            if not isinstance(target, (torch.nn.Linear, torch.nn.Conv2d)):
                raise WeightsError(f"{label}: LoRA adapts {module!r}, which this base model's UNet lacks "
                                   f"(weights trained for another base model?)")
            lora_a, lora_b = lora.state[module + ".lora_A.weight"], lora.state[module + ".lora_B.weight"]
            fan_in = target.in_features if isinstance(target, torch.nn.Linear) else target.in_channels
            fan_out = target.out_features if isinstance(target, torch.nn.Linear) else target.out_channels
            if lora_a.shape[1] != fan_in or lora_b.shape[0] != fan_out:
                raise WeightsError(f"{label}: LoRA for {module} has shapes {list(lora_a.shape)}/{list(lora_b.shape)} "
                                   f"but the layer is {fan_in}->{fan_out} (weights trained for another base model?)")

    def _load_adapter(self, adapter: str, lora: PeftLora, label: str) -> None:
        tensors = {"unet." + k: v for k, v in lora.state.items()}
        metadata = {"unet." + k: v for k, v in lora_formats.peft_adapter_metadata(lora).items()}
        try:
            self.unet.load_lora_adapter(tensors, prefix="unet", adapter_name=adapter, metadata=metadata)
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsError(f"{label}: LoRA does not load into this base model ({first_line})") from None
        self.unet.disable_lora()


# ---------------------------------------------------------------------------------------------- facade


@dataclass(frozen=True)
class ActiveWeights:
    key: str
    label: str
    special_params: dict[str, str]
    is_lora: bool


class WeightsManager:
    """What the predictor calls: ``use(source, lora_scale)`` before generating, then ``expand_prompt(prompt)``."""

    def __init__(self, pipelines: Sequence, settings: WeightsSettings):
        self.settings = settings
        self.cache = WeightsCache(settings)
        self.live = LiveWeights(pipelines, settings.max_loaded_adapters)
        self.active: ActiveWeights | None = None
        self._warned_missing_trigger: set[str] = set()
        self._lock = threading.Lock()

    def use(self, source: str | None, lora_scale: float) -> ActiveWeights | None:
        """Make ``source`` (URL, data: URI, tar or folder path; None for the base model) the active weights."""
        with self._lock:
            self.active = None
            self.cache.pinned.clear()
            if not source:
                self.live.deactivate()
                return None
            label = redact(source)
            key = self._key(source)
            started = time.perf_counter()
            self.cache.pinned.add(key)
            weights = self.live.activate(key, lambda: self._read(source, label), lora_scale, label)
            logger.info("weights %s active after %.3fs", label, time.perf_counter() - started)
            self.active = ActiveWeights(key, label, dict(weights.special_params), weights.unet_full is None)
            return self.active

    def _key(self, source: str) -> str:
        if source_kind(source) == "path":
            path = Path(source).expanduser()
            if not path.exists():
                raise WeightsError(f"{source}: no such file or folder")
            if path.is_dir():
                return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        return cache_key(source)

    def _read(self, source: str, label: str) -> TrainedWeights:
        return read_trained_weights(self.cache.ensure(source), label)

    def expand_prompt(self, prompt: str) -> str:
        """The prompt with the active weights' trigger words replaced by their tokens (warns once per weights when
        the prompt has none of them)."""
        if self.active is None or not self.active.special_params:
            return prompt
        expanded, found = expand_triggers(prompt, self.active.special_params)
        if not found and self.active.key not in self._warned_missing_trigger:
            self._warned_missing_trigger.add(self.active.key)
            logger.warning("prompt has none of the trigger words %s of %s; the trained concept may not show",
                           ", ".join(self.active.special_params), self.active.label)
        return expanded

    def tokenizers(self) -> list:
        """The tokenizers the pipelines use right now (with the active weights' tokens)."""
        return self.live.tokens.active_tokenizers()
