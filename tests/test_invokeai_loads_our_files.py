"""InvokeAI's own code loads the exported files: model identification, LoRA loader, LoRA patcher, textual inversion.

InvokeAI ships on the package index, so rather than restate its rules this test runs its code, in a test environment
separate from the product's: InvokeAI's wheel and the few small packages its loading modules import are installed
with ``pip install --no-deps --target`` into a folder of the test cache (``.cache/invokeai-<version>-site``, fetched
from the package index on first use; ``PTI_INVOKEAI_SITE`` names a ready folder instead), and
``tests/invokeai_driver.py`` runs in a subprocess whose path holds that folder and not the product's code. It uses the
torch/diffusers/transformers of the test environment, InvokeAI's files as released. Without the package index and
without a ready folder, the test is skipped with the reason.

The files are the real exporter's, on the real SDXL-base UNet built on the ``meta`` device (the ``sdxl`` fixture of
tests/test_consumer_formats.py: 560 attention modules, 7 trigger words).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_consumer_formats import ALPHA, RANK, TRIGGERS, sdxl  # noqa: F401  (sdxl: the module fixture)
from test_lora_formats import SDXL_UNET_CONFIG

ROOT = Path(__file__).resolve().parents[1]
INVOKEAI_VERSION = "6.14.2"
# InvokeAI and what its model-manager, LoRA and textual-inversion modules import beyond torch/diffusers/transformers/
# safetensors/pydantic/numpy (which the test environment has). Pinned so every run loads the same code.
INVOKEAI_SITE_PACKAGES = (
    f"invokeai=={INVOKEAI_VERSION}", "pydantic-settings==2.16.3", "python-dotenv==1.2.4", "compel==2.5.1",
    "gguf==0.19.0", "blake3==1.0.11", "picklescan==1.0.5", "onnxruntime==1.19.2", "onnx==1.16.1", "einops==0.8.2",
    "Deprecated==1.3.1", "wrapt==2.5.2", "spandrel==0.4.2",
)
PIP_TIMEOUT_S = 600
DRIVER_TIMEOUT_S = 600
EMBEDDING_TRIGGERS = ("T0", "T6")
# Three shapes of SDXL attention projection: self-attention 640→640, cross-attention 2048→1280, an output projection.
SAMPLE_MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                  "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k",
                  "mid_block.attentions.0.transformer_blocks.5.attn1.to_out.0")


def _cache_dir() -> Path:
    return Path(os.environ.get("COG_SDXL_CACHE", ROOT / ".cache"))


def invokeai_site() -> Path:
    """The folder holding InvokeAI's package and its small imports, installed on first use; skips the test when it
    cannot be had."""
    if os.environ.get("PTI_INVOKEAI_SITE"):
        return Path(os.environ["PTI_INVOKEAI_SITE"])
    site = _cache_dir() / f"invokeai-{INVOKEAI_VERSION}-site"
    marker = site / "INSTALLED"
    if marker.is_file() and marker.read_text() == "\n".join(INVOKEAI_SITE_PACKAGES):
        return site
    staging = site.with_name(site.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
               "--target", str(staging), *INVOKEAI_SITE_PACKAGES]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"InvokeAI {INVOKEAI_VERSION} not installable: pip took over {PIP_TIMEOUT_S} s")
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"InvokeAI {INVOKEAI_VERSION} not installable from the package index: {last_line}")
    shutil.rmtree(site, ignore_errors=True)
    staging.rename(site)
    marker.write_text("\n".join(INVOKEAI_SITE_PACKAGES))
    return site


@pytest.fixture(scope="module")
def invokeai(sdxl, tmp_path_factory):  # noqa: F811
    """Run the driver on the exported files; InvokeAI's report and the tensors it produced."""
    from pti.models.tiny_models import ensure_tiny_sdxl

    site = invokeai_site()
    out, exported = tmp_path_factory.mktemp("invokeai"), sdxl["out"]
    tiny = ensure_tiny_sdxl()
    state = sdxl["state"]
    request = {
        "loras": [str(exported / "subject_kohya.safetensors"), str(exported / "subject.safetensors")],
        "embeddings": [str(exported / "embeddings" / f"{trigger}.safetensors") for trigger in EMBEDDING_TRIGGERS],
        "unet_config": SDXL_UNET_CONFIG,
        "sample_modules": {m: [state[f"{m}.lora_B.weight"].shape[0], state[f"{m}.lora_A.weight"].shape[1]]
                           for m in SAMPLE_MODULES},
        "tokenizers": {"clip_l": str(tiny / "tokenizer"), "clip_g": str(tiny / "tokenizer_2")},
        "widths": sdxl["widths"],
    }
    (out / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    command = [sys.executable, str(ROOT / "tests" / "invokeai_driver.py"), str(out / "request.json"), str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, env=env,
                            cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert Path(report["invokeai_file"]).is_relative_to(site)  # InvokeAI's code from the separate folder ran
    return {"report": report, "tensors": load_file(out / "tensors.safetensors")}


def test_the_separate_environment_holds_invokeai_and_not_the_product():
    """The product's environment has no InvokeAI, the driver does not import the product's code."""
    import importlib.util

    assert importlib.util.find_spec("invokeai") is None
    driver = (ROOT / "tests" / "invokeai_driver.py").read_text()
    assert "import pti" not in driver and "from pti" not in driver


@pytest.mark.parametrize("name", ["subject_kohya", "subject"])
def test_invokeai_identifies_the_lora_as_sdxl_and_patches_every_trained_module(invokeai, sdxl, name):  # noqa: F811
    """Both LoRA files install as SDXL LoRAs; InvokeAI's loader drops the ``bundle_emb`` keys of the bundled file
    (its embeddings are not used), so either gives the same 560 layers, each patched onto the module it was trained on,
    at alpha/rank, with no "Failed to find module" warning."""
    lora = invokeai["report"]["loras"][f"{name}.safetensors"]
    assert lora["identified"] == {"as": {"type": "lora", "format": "lycoris", "base": "sdxl"}, "errors": {}}
    assert len(lora["layers"]) == len(sdxl["modules"]) == 560
    assert set(lora["patched_modules"]) == set(sdxl["modules"])
    assert sorted(key for keys in lora["patched_modules"].values() for key in keys) == lora["layers"]
    assert lora["scales"] == [ALPHA / RANK]
    assert lora["warnings"] == []


def test_invokeai_adds_the_trained_weight_change(invokeai, sdxl):  # noqa: F811
    """The weight change InvokeAI's layer adds at strength 1 is the trained one, alpha/rank · B·A, from the fp16
    file's values. Tolerance: both sides multiply the same fp16-exact factors in float32; only the summation order
    over the rank (4 terms) may differ, so ~1e-6 relative to the largest entry."""
    for module in SAMPLE_MODULES:
        down = sdxl["state"][f"{module}.lora_A.weight"].half().float()
        up = sdxl["state"][f"{module}.lora_B.weight"].half().float()
        expected = (ALPHA / RANK) * (up @ down)
        for name in ("subject_kohya", "subject"):
            applied = invokeai["tensors"][f"{name}.safetensors:{module}"]
            assert applied.shape == expected.shape
            torch.testing.assert_close(applied, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("trigger", EMBEDDING_TRIGGERS)
def test_invokeai_puts_each_trigger_embedding_into_both_text_encoders(invokeai, sdxl, trigger):  # noqa: F811
    """``embeddings/TOK.safetensors`` installs as an SDXL embedding; its 1280-wide ``clip_g`` and 768-wide ``clip_l``
    rows go into the text encoder of that width, under the token ``<TOK>`` the prompt uses."""
    embedding = invokeai["report"]["embeddings"][f"{trigger}.safetensors"]
    assert embedding["identified"] == {"as": {"type": "embedding", "format": "embedding_file", "base": "sdxl"},
                                       "errors": {}}
    assert (embedding["embedding"], embedding["embedding_2"]) == ([1, 1280], [1, 768])
    row = list(TRIGGERS).index(trigger)
    for encoder, width in sdxl["widths"].items():
        assert embedding["prompts"][encoder] == {"trigger_in_prompt": True, "trigger_is_new_token": True}
        inserted = invokeai["tensors"][f"{trigger}.safetensors:{encoder}"]
        assert inserted.shape == (width,)
        assert torch.equal(inserted, sdxl["embeddings"][encoder][row].half().float())
