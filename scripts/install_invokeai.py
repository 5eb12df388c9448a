"""Install InvokeAI's own loading code into a folder apart from the product's environment, for
tests/test_invokeai_loads_our_files.py (which never downloads anything itself and skips without this folder).

    make invokeai          # = .venv/bin/python scripts/install_invokeai.py

InvokeAI's wheel and the few small packages its model-manager, LoRA and textual-inversion modules import beyond
torch/diffusers/transformers/safetensors/pydantic/numpy go in with ``pip install --no-deps --target`` into
``$COG_SDXL_CACHE/invokeai-<version>-site`` (``<checkout>/.cache`` by default, as in the tests), staged and renamed so
a half-finished install is never used. Pinned, so every run loads the same code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INVOKEAI_VERSION = "6.14.2"
PACKAGES = (
    f"invokeai=={INVOKEAI_VERSION}", "pydantic-settings==2.16.3", "python-dotenv==1.2.4", "compel==2.5.1",
    "gguf==0.19.0", "blake3==1.0.11", "picklescan==1.0.5", "onnxruntime==1.19.2", "onnx==1.16.1", "einops==0.8.2",
    "Deprecated==1.3.1", "wrapt==2.5.2", "spandrel==0.4.2",
)
MARKER = "INSTALLED"


def site_folder() -> Path:
    """Where the separate environment lives: ``PTI_INVOKEAI_SITE`` if set, else the project cache."""
    if os.environ.get("PTI_INVOKEAI_SITE"):
        return Path(os.environ["PTI_INVOKEAI_SITE"])
    return Path(os.environ.get("COG_SDXL_CACHE", ROOT / ".cache")) / f"invokeai-{INVOKEAI_VERSION}-site"


def is_installed(site: Path) -> bool:
    marker = site / MARKER
    return marker.is_file() and marker.read_text() == "\n".join(PACKAGES)


def install(site: Path) -> None:
    staging = site.with_name(site.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
               "--target", str(staging), *PACKAGES]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"InvokeAI {INVOKEAI_VERSION} not installable: {last_line}")
    shutil.rmtree(site, ignore_errors=True)
    staging.rename(site)
    (site / MARKER).write_text("\n".join(PACKAGES))


def main() -> None:
    site = site_folder()
    if is_installed(site):
        print(f"InvokeAI {INVOKEAI_VERSION} already in {site}")
        return
    install(site)
    print(f"InvokeAI {INVOKEAI_VERSION} installed in {site}")


if __name__ == "__main__":
    main()
