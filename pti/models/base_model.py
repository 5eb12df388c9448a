"""Where the base SDXL weights come from, and which device and dtype everything runs on.

One setting names the base model everywhere: env ``SDXL_MODEL`` (or an explicit argument).

* a Hugging Face repo id (default ``stabilityai/stable-diffusion-xl-base-1.0``), downloaded once into the
  hub cache; in half precision the fp16-safe VAE ``madebyollin/sdxl-vae-fp16-fix`` replaces the stock one;
* a local directory in diffusers layout;
* a single-file SDXL checkpoint (``.safetensors``, SGM layout), a local path or an https URL (:mod:`single_file`);
* ``mini-world``: the tiny architecture pretrained on the toy world of captioned shapes (``pti/toyworld``);
* ``tiny``: a small pipeline of the real SDXL classes with random weights, built from a fixed seed on first
  use and cached on disk (see :mod:`tiny_models`). Tests, the demo and CPU benchmarks use it.

Every Hugging Face repo id is first looked up in the weights folder (env ``SDXL_WEIGHTS_DIR``, default
``<checkout>/weights``, filled by ``scripts/download_weights.py`` and copied into the image by ``cog build``):
``<weights>/<org>--<name>`` holds the half-precision files of that repo, and when it is there the network is never
touched.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch

from pti.models import single_file

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
TINY = "tiny"
MINI_WORLD = "mini-world"
# The toy world's pretrained mini SDXL, committed in diffusers layout (rebuilt by scripts/build_mini_world.py). A path,
# not an import: the models room does not import the toyworld room.
MINI_WORLD_DIR = Path(__file__).resolve().parents[1] / "toyworld" / "weights" / "mini-world"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # the checkout's (the image's /src/weights)
HALF_VARIANT = "fp16"  # the hub's half-precision files (any half-precision runtime loads them: half the download)
HALF_DTYPES = (torch.float16, torch.bfloat16)
BF16_MIN_CAPABILITY = 8  # Ampere and newer compute bf16 in hardware; T4 (7.5) and V100 (7.0) only emulate it


def model_spec(explicit: str | None = None) -> str:
    """The base-model setting: the argument if given, else env ``SDXL_MODEL``, else the SDXL base repo."""
    return explicit or os.environ.get("SDXL_MODEL") or DEFAULT_MODEL


@dataclass(frozen=True)
class Runtime:
    """The one place that decides device and dtypes. CPU is the tested path; CUDA runs the same code."""

    device: torch.device
    dtype: torch.dtype  # weights of frozen modules and autocast dtype
    vae_dtype: torch.dtype  # SDXL's VAE overflows in fp16; keep it in float32 unless it is the fp16-fix VAE

    @property
    def autocast_enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast_enabled)


    def generator(self, seed: int) -> torch.Generator:
        """A generator on exactly this device (``cuda:N`` included; ``device.type`` alone would mean cuda:0)."""
        return torch.Generator(self.device).manual_seed(seed)


def default_device_name(device: str | None = None) -> str:
    """The device setting: the argument, else env ``SDXL_DEVICE``, else CUDA when present, else CPU."""
    return device or os.environ.get("SDXL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def has_bf16_hardware(device: torch.device) -> bool:
    """True when the GPU computes bf16 natively (compute capability 8.0+). ``torch.cuda.is_bf16_supported()``
    also counts emulation, which is slow and has no flash / memory-efficient attention kernels."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= BF16_MIN_CAPABILITY


def auto_dtype(device: torch.device) -> torch.dtype:
    """``precision=auto``: bf16 on GPUs with bf16 hardware, fp16 on older GPUs, float32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if has_bf16_hardware(device) else torch.float16


def pick_runtime(precision: str = "auto", device: str | None = None) -> Runtime:
    """``precision``: ``auto`` (see :func:`auto_dtype`), ``fp32``, ``bf16`` or ``fp16``. ``device`` defaults to
    CUDA when present, else CPU (env ``SDXL_DEVICE`` overrides, e.g. ``cuda:1``)."""
    dev = torch.device(default_device_name(device))
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        dtype = auto_dtype(dev)
    elif precision in choices:
        dtype = choices[precision]
    else:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision fp16 is not supported on CPU; use bf16 or fp32")
    return Runtime(device=dev, dtype=dtype, vae_dtype=torch.float32)


def weights_dir() -> Path:
    """The folder of downloaded weights (env ``SDXL_WEIGHTS_DIR``, default ``<checkout>/weights``)."""
    return Path(os.environ.get("SDXL_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR).expanduser()


def weights_copy_dir(repo_id: str) -> Path:
    """Where the weights folder keeps ``repo_id`` (``org/name`` → ``org--name``)."""
    return weights_dir() / repo_id.replace("/", "--")


def downloaded_copy(repo_id: str) -> Path | None:
    """The weights folder's complete copy of ``repo_id`` (marked by ``.complete``), or None."""
    folder = weights_copy_dir(repo_id)
    return folder if (folder / ".complete").is_file() else None


def resolve_source(repo_id: str) -> Path | str:
    """A hub repo's downloaded copy when the weights folder has one, else the repo id (hub cache / download)."""
    return downloaded_copy(repo_id) or repo_id


def is_weights_copy(source: Path | str) -> bool:
    return isinstance(source, Path) and source.parent == weights_dir() and (source / ".complete").is_file()


def has_half_variant(folder: Path) -> bool:
    return any(folder.glob(f"*/*.{HALF_VARIANT}.safetensors"))


def has_full_files(folder: Path) -> bool:
    return any(path for path in folder.glob("*/*.safetensors") if not path.name.endswith(
        f".{HALF_VARIANT}.safetensors"))


def pretrained_kwargs(source: Path | str, runtime: Runtime) -> dict:
    """``from_pretrained`` options for a diffusers pipeline from ``source``: the runtime dtype, and the fp16 variant
    (half the bytes) for any half-precision runtime, or wherever it is the only copy (the weights folder)."""
    kwargs: dict = {"dtype": runtime.dtype}  # loading float32 and casting later doubles the peak at full size
    half = runtime.dtype in HALF_DTYPES
    if is_hub_id(source):
        kwargs["use_safetensors"] = True
        if half:
            kwargs["variant"] = HALF_VARIANT
    elif has_half_variant(Path(source)) and (half or not has_full_files(Path(source))):
        kwargs["variant"] = HALF_VARIANT
    return kwargs


def resolve_model_dir(spec: str | None = None) -> Path | str:
    """A local folder for ``tiny`` (built on first use), a local diffusers directory, or the weights folder's copy
    of a hub repo; else the repo id."""
    spec = model_spec(spec)
    if spec == TINY:
        from pti.models.tiny_models import ensure_tiny_sdxl

        return ensure_tiny_sdxl()
    if spec == MINI_WORLD:
        if not (MINI_WORLD_DIR / "model_index.json").is_file():
            raise ValueError(f"SDXL_MODEL={spec}: {MINI_WORLD_DIR} is missing; rebuild it with scripts/build_mini_world.py")
        return MINI_WORLD_DIR
    if spec.startswith(("random-full", "random_full")):
        from pti.models.full_random_model import ensure_random_full_sdxl

        return ensure_random_full_sdxl()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ValueError(f"SDXL_MODEL={spec}: folder is not in diffusers layout (no model_index.json)")
        return path
    if os.sep in spec.strip("/") and spec.count("/") > 1:
        raise ValueError(f"SDXL_MODEL={spec}: no such folder, and not a Hugging Face repo id")
    return resolve_source(spec)


def is_hub_id(resolved: Path | str) -> bool:
    return isinstance(resolved, str)


def load_sdxl_pipeline(spec: str | None = None, runtime: Runtime | None = None, pipeline_class=None):
    """Load the base SDXL pipeline (text encoders, tokenizers, VAE, UNet, scheduler) onto the runtime device.

    Hub downloads go to the Hugging Face cache once (the weights folder's copy is read first); half-precision
    runtimes load the fp16 files; an fp16 runtime of the hub model uses the fp16-fix VAE.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    runtime = runtime or pick_runtime()
    pipeline_class = pipeline_class or StableDiffusionXLPipeline
    if single_file.is_single_file(model_spec(spec)):
        pipe = single_file.load_pipeline(checked_base_file(spec), reference_config(), runtime.dtype, pipeline_class,
                                         _label(model_spec(spec)))
    else:
        source = resolve_model_dir(spec)
        kwargs = pretrained_kwargs(source, runtime)
        if runtime.dtype == torch.float16 and (is_hub_id(source) or is_weights_copy(source)):
            vae_source = resolve_source(FP16_VAE)
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_source, dtype=torch.float16)
        pipe = pipeline_class.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if runtime.device.type == "cpu":
        _copy_into_process_memory(pipe)
    return pipe.to(runtime.device)


def _label(spec: str) -> str:
    return single_file.redacted(spec) if single_file.is_url(spec) else spec


def checked_base_file(spec: str | None = None) -> Path:
    """The single-file base model on disk (an https URL is downloaded once into the cache), checked to be an SDXL
    base checkpoint; :class:`single_file.BaseModelError` (one line) otherwise."""
    from pti.models.build_cache import cache_root

    spec = model_spec(spec)
    path = single_file.local_file(spec, cache_root() / "base-models")
    single_file.check_sdxl_checkpoint(path, _label(spec))
    return path


def reference_config() -> Path | str:
    """Where a single file's configs and tokenizers come from: the diffusers model ``SDXL_MODEL`` names (the SDXL
    base when that is itself a single file), read offline."""
    spec = model_spec()
    return resolve_model_dir(DEFAULT_MODEL if single_file.is_single_file(spec) else spec)


def base_model_source(spec: str | None = None) -> single_file.BaseModelSource:
    """Name, URL and SHA-256 (single files) of the base model, for training_config.json and the metadata."""
    spec = model_spec(spec)
    if not single_file.is_single_file(spec):
        return single_file.BaseModelSource(spec, None, None)
    path = checked_base_file(spec)
    url = single_file.redacted(spec) if single_file.is_url(spec) else None
    name = Path(urllib.parse.urlsplit(spec).path).name if url else path.name
    return single_file.BaseModelSource(name, url, single_file.file_sha256(path))


def _copy_into_process_memory(pipe) -> None:
    """Weights whose file dtype matches stay memory-mapped from the safetensors files; under memory pressure the
    kernel drops such pages and reads them back from disk in every step. One copy per tensor (peak: one tensor)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


def free_bytes(device: torch.device) -> int:
    """Memory still free on ``device`` (CUDA: ``mem_get_info`` of that GPU; CPU: the system's available memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory allocated by torch on ``device`` since the last reset (None off CUDA: not measured there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous CUDA kernels); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks back (after large models were dropped)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allow_tf32(device: torch.device) -> None:
    """TF32 tensor-core matmuls for the float32 parts (VAE, upcasts, float32 runs) on CUDA; cuDNN convolutions
    use TF32 by default. Process-wide, so only for a CUDA runtime."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
