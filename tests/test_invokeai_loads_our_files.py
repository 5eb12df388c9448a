"""InvokeAI's own code loads the exported files: model identification, LoRA loader, LoRA patcher, textual inversion.

InvokeAI ships on the package index, so rather than restate its rules this test runs its code, in a test environment
separate from the product's: InvokeAI's wheel and the few small packages its loading modules import are installed
with ``pip install --no-deps --target`` into a folder of the test cache by ``make invokeai``
(scripts/install_invokeai.py; ``PTI_INVOKEAI_SITE`` names a ready folder instead), and
``tests/invokeai_driver.py`` runs in a subprocess whose path holds that folder and not the product's code. It uses the
torch/diffusers/transformers of the test environment, InvokeAI's files as released. The test never downloads:
without that folder it is skipped, saying how to install it.

The files are the real exporter's, on the real SDXL-base UNet built on the ``meta`` device (the ``sdxl`` fixture of
tests/test_consumer_formats.py: 560 attention modules, 7 trigger words).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_consumer_formats import ALPHA, RANK, TRIGGERS, sdxl  # noqa: F401  (sdxl: the module fixture)
from test_lora_formats import SDXL_UNET_CONFIG

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import install_invokeai  # noqa: E402

DRIVER_TIMEOUT_S = 600
EMBEDDING_TRIGGERS = ("T0", "T6")
# Three shapes of SDXL attention projection: self-attention 640→640, cross-attention 2048→1280, an output projection.
SAMPLE_MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                  "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k",
                  "mid_block.attentions.0.transformer_blocks.5.attn1.to_out.0")


def invokeai_site() -> Path:
    """The separate environment ``make invokeai`` installs; the test skips without it (tests never download)."""
    site = install_invokeai.site_folder()
    if not install_invokeai.is_installed(site):
        pytest.skip(f"InvokeAI {install_invokeai.INVOKEAI_VERSION} not installed in {site}: run `make invokeai`")
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
