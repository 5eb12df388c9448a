"""Where the base SDXL weights come from, and which device and dtype everything runs on.

One setting names the base model everywhere: env ``SDXL_MODEL`` (or an explicit argument).

* a Hugging Face repo id (default ``stabilityai/stable-diffusion-xl-base-1.0``), downloaded once into the
  hub cache; in half precision the fp16-safe VAE ``madebyollin/sdxl-vae-fp16-fix`` replaces the stock one;
* a local directory in diffusers layout;
* ``mini-world``: the tiny architecture pretrained on the toy world of captioned shapes (``pti/toyworld``);
* ``tiny``: a small pipeline of the real SDXL classes with random weights, built from a fixed seed on first
  use and cached on disk (see :mod:`tiny_models`). Tests, the demo and CPU benchmarks use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
TINY = "tiny"
MINI_WORLD = "mini-world"
# The toy world's pretrained mini SDXL, committed in diffusers layout (rebuilt by scripts/build_mini_world.py). A path,
# not an import: the models room does not import the toyworld room.
MINI_WORLD_DIR = Path(__file__).resolve().parents[1] / "toyworld" / "weights" / "mini-world"


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


def pick_runtime(precision: str = "auto", device: str | None = None) -> Runtime:
    """``precision``: ``auto`` (bf16 on CUDA that supports it, else fp16 on CUDA, float32 on CPU), ``fp32``,
    ``bf16`` or ``fp16``. ``device`` defaults to CUDA when present, else CPU (env ``SDXL_DEVICE`` overrides)."""
    name = device or os.environ.get("SDXL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    elif precision in choices:
        dtype = choices[precision]
    else:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision fp16 is not supported on CPU; use bf16 or fp32")
    return Runtime(device=dev, dtype=dtype, vae_dtype=torch.float32)


def resolve_model_dir(spec: str | None = None) -> Path | str:
    """A local folder for ``tiny`` (built on first use) or a local diffusers directory; else the repo id."""
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
    return spec


def is_hub_id(resolved: Path | str) -> bool:
    return isinstance(resolved, str)


def load_sdxl_pipeline(spec: str | None = None, runtime: Runtime | None = None, pipeline_class=None):
    """Load the base SDXL pipeline (text encoders, tokenizers, VAE, UNet, scheduler) onto the runtime device.

    Hub downloads go to the Hugging Face cache once; with a half-precision runtime the fp16-fix VAE is used.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    runtime = runtime or pick_runtime()
    pipeline_class = pipeline_class or StableDiffusionXLPipeline
    source = resolve_model_dir(spec)
    kwargs: dict = {"dtype": runtime.dtype}  # loading float32 and casting later doubles the peak at full size
    if is_hub_id(source):
        kwargs["use_safetensors"] = True
        if runtime.dtype == torch.float16:
            kwargs["variant"] = "fp16"
            kwargs["vae"] = AutoencoderKL.from_pretrained(FP16_VAE, torch_dtype=torch.float16)
    pipe = pipeline_class.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if runtime.device.type == "cpu":
        _copy_into_process_memory(pipe)
    return pipe.to(runtime.device)


def _copy_into_process_memory(pipe) -> None:
    """Weights whose file dtype matches stay memory-mapped from the safetensors files; under memory pressure the
    kernel drops such pages and reads them back from disk in every step. One copy per tensor (peak: one tensor)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()
