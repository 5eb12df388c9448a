"""Base models given as one SDXL checkpoint file (``.safetensors`` in the SGM/A1111 layout, what civitai serves):
a local path or an https URL, downloaded once into ``$COG_SDXL_CACHE/base-models``.

The file is checked by its key names before anything loads (a file that is not an SDXL base checkpoint is a
one-line :class:`BaseModelError`), and loaded with diffusers' single-file loader using the configs of the
reference model: the diffusers folder of ``SDXL_MODEL`` (the SDXL base in the weights folder or hub cache; the tiny
model in tests), so nothing is downloaded but the file itself. Its SHA-256 is recorded with the trained weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

SGM_UNET = "model.diffusion_model."
SGM_CLIP_L = "conditioner.embedders.0.transformer."
SGM_CLIP_G = "conditioner.embedders.1.model."
SGM_VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model."
SUFFIX = ".safetensors"
HASH_CHUNK = 16 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = (10.0, 60.0)


class BaseModelError(ValueError):
    """A base model that cannot be used, one line naming it and why."""


@dataclass(frozen=True)
class BaseModelSource:
    """What training_config.json, the model card and the kohya metadata record about the base model."""

    name: str  # the file's name, or the setting itself for a repo id / folder / built-in model
    url: str | None  # where a downloaded file came from (query string dropped: signed URLs)
    sha256: str | None  # of a single file

    def as_config(self) -> dict:
        return {"name": self.name, "url": self.url, "sha256": self.sha256}


def is_single_file(spec: str) -> bool:
    """A setting that names one checkpoint file: a ``.safetensors`` path or an http(s) URL of one."""
    path = urllib.parse.urlsplit(spec).path if is_url(spec) else spec
    return path.lower().endswith(SUFFIX)


def is_url(spec: str) -> bool:
    return spec[:8].lower().startswith(("https://", "http://"))


def redacted(url: str) -> str:
    """The URL without credentials, query string or fragment (a signed URL's token stays out of logs and files)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def local_file(spec: str, cache: Path) -> Path:
    """The checkpoint on disk: the path itself, or the cached download of the URL (fetched once, atomically)."""
    if not is_url(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BaseModelError(f"base_model {spec}: no such file")
        return path
    target = cache / f"{hashlib.sha256(redacted(spec).encode()).hexdigest()[:16]}{SUFFIX}"
    if not target.is_file():
        _download(spec, target)
    return target


def _download(url: str, target: Path) -> None:
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    staging = Path(staging_name)
    try:
        with os.fdopen(fd, "wb") as handle, requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            if response.status_code != 200:
                raise BaseModelError(f"base_model {redacted(url)}: download failed (HTTP {response.status_code})")
            for chunk in response.iter_content(HASH_CHUNK):
                handle.write(chunk)
        os.replace(staging, target)
    except requests.RequestException as error:
        raise BaseModelError(f"base_model {redacted(url)}: download failed ({type(error).__name__})") from None
    finally:
        staging.unlink(missing_ok=True)


def check_sdxl_checkpoint(path: Path, label: str) -> None:
    """Refuse, by key names only (no tensor is read), a file that is not an SDXL base checkpoint."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise BaseModelError(f"base_model {label}: not a readable safetensors file ({error})") from None
    has = {prefix: any(k.startswith(prefix) for k in keys) for prefix in (SGM_UNET, SGM_CLIP_L, SGM_CLIP_G, SGM_VAE,
                                                                           SD1_TEXT)}
    if has[SGM_UNET] and has[SGM_CLIP_L] and has[SGM_CLIP_G] and has[SGM_VAE]:
        return
    if has[SD1_TEXT]:
        what = "a Stable Diffusion 1.x/2.x checkpoint"
    elif has[SGM_CLIP_G] and not has[SGM_CLIP_L]:
        what = "an SDXL refiner (one text encoder)"
    elif not has[SGM_UNET]:
        what = "not a whole-model checkpoint (a LoRA, VAE or embedding?)"
    else:
        what = "missing the VAE or a text encoder"
    raise BaseModelError(f"base_model {label}: not an SDXL base checkpoint ({what})")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_pipeline(path: Path, config: Path | str, dtype: torch.dtype, pipeline_class, label: str):
    """The pipeline of a checked single file, with the configs (and tokenizers) of ``config``, offline."""
    try:
        return pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True,
                                               torch_dtype=dtype)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BaseModelError(f"base_model {label}: does not load as an SDXL model with the configs of {config} "
                             f"({first[:200]})") from None
