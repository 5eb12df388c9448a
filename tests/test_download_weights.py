"""Issue 11, section 2: with the weights folder present and the network unreachable, the predictor sets up (the
refiner is not needed until a request asks for it) and generates, training reads its base from the folder, and the
download script fills the folder the code reads (marker last, only what the code loads)."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from pti.models import base_model
from pti.models.tiny_models import ensure_tiny_safety_checker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import download_weights  # noqa: E402


def mark_complete(folder: Path) -> Path:
    (folder / download_weights.COMPLETE_MARKER).write_text("test\n")
    return folder


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory) -> Path:
    """A weights folder as the download script leaves it, with the tiny models standing in under the hub names:
    the base with fp16-variant files only, the safety checker and its feature extractor; no refiner."""
    root = tmp_path_factory.mktemp("weights")
    pipe = base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))
    base = download_weights.item_folder(root, base_model.DEFAULT_MODEL)
    pipe.to(torch.float16).save_pretrained(base, variant="fp16", safe_serialization=True)
    mark_complete(base)
    tiny_checker = ensure_tiny_safety_checker()
    for repo_id, part in (("CompVis/stable-diffusion-safety-checker", "safety_checker"),
                          ("openai/clip-vit-base-patch32", "feature_extractor")):
        shutil.copytree(tiny_checker / part, download_weights.item_folder(root, repo_id))
        mark_complete(download_weights.item_folder(root, repo_id))
    return root


@pytest.fixture
def offline_with_weights(weights_folder, monkeypatch):
    """The default (hub) model settings, the weights folder, and no network at all."""
    for name in ("SDXL_MODEL", "SDXL_REFINER_MODEL", "SAFETY_CHECKER_MODEL", "FEATURE_EXTRACTOR_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(weights_folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    return weights_folder


def test_every_model_resolves_to_the_weights_folder(offline_with_weights):
    folder = base_model.resolve_model_dir()
    assert folder == download_weights.item_folder(offline_with_weights, base_model.DEFAULT_MODEL)
    kwargs = base_model.pretrained_kwargs(folder, base_model.pick_runtime("fp32", "cpu"))
    assert kwargs["variant"] == "fp16"  # the folder holds only the half-precision files
    assert isinstance(base_model.resolve_source("stabilityai/stable-diffusion-xl-refiner-1.0"), str)  # not there


def test_a_folder_without_its_complete_marker_is_not_used(offline_with_weights, tmp_path, monkeypatch):
    partial = tmp_path / "weights"
    shutil.copytree(offline_with_weights, partial)
    (download_weights.item_folder(partial, base_model.DEFAULT_MODEL) / ".complete").unlink()
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(partial))
    assert base_model.resolve_model_dir() == base_model.DEFAULT_MODEL


def test_setup_succeeds_offline_with_only_the_base_and_generates(offline_with_weights, tmp_path, monkeypatch):
    from predict import Predictor
    from pti.inference.generation import ModelUnavailableError
    from test_predict import FAST, PREDICT_DEFAULTS

    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    predictor = Predictor()
    predictor.setup()
    assert predictor.models.loaded_refiner is None
    (path,) = predictor.predict(**{**PREDICT_DEFAULTS, **FAST, "seed": 1})
    assert Path(path).is_file()
    with pytest.raises(ModelUnavailableError, match="refiner stabilityai/stable-diffusion-xl-refiner-1.0") as error:
        predictor.predict(**{**PREDICT_DEFAULTS, **FAST, "seed": 1, "refine": "expert_ensemble_refiner"})
    assert "\n" not in str(error.value)


def test_the_refiner_loads_on_the_first_request_that_asks_for_it(monkeypatch, tmp_path):
    from predict import Predictor
    from test_predict import FAST, PREDICT_DEFAULTS

    monkeypatch.setenv("WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    predictor = Predictor()
    predictor.setup()  # SDXL_MODEL=tiny (tests): the tiny refiner
    assert predictor.models.loaded_refiner is None
    predictor.predict(**{**PREDICT_DEFAULTS, **FAST, "seed": 1})
    assert predictor.models.loaded_refiner is None
    predictor.predict(**{**PREDICT_DEFAULTS, **FAST, "seed": 1, "refine": "expert_ensemble_refiner"})
    refiner = predictor.models.loaded_refiner
    assert refiner is not None and refiner.vae is predictor.models.txt2img.vae
    assert refiner.text_encoder_2 is predictor.models.txt2img.text_encoder_2


def test_training_reads_its_base_from_the_weights_folder_offline(offline_with_weights):
    pipe = base_model.load_sdxl_pipeline(None, base_model.pick_runtime("fp32", "cpu"))
    assert Path(pipe.name_or_path) == download_weights.item_folder(offline_with_weights, base_model.DEFAULT_MODEL)
    assert pipe.unet.dtype == torch.float32  # fp16 files, loaded at the runtime's dtype


def test_preprocessing_reads_its_models_from_the_weights_folder(offline_with_weights):
    import preprocess

    captioner = download_weights.item_folder(offline_with_weights, "Salesforce/blip-image-captioning-large")
    captioner.mkdir()
    mark_complete(captioner)
    settings = preprocess.with_local_models(preprocess.PreprocessSettings())
    assert settings.captioning_model == str(captioner)
    assert settings.clipseg_model == preprocess.DEFAULT_CLIPSEG  # not downloaded: the hub id, as before
    shutil.rmtree(captioner)


# ------------------------------------------------------------------------------------------ the download script


def fake_fetch(files: dict[str, bytes]):
    calls = []

    def fetch(repo_id, allow_patterns, local_dir):
        calls.append((repo_id, allow_patterns))
        assert not (local_dir / download_weights.COMPLETE_MARKER).exists()  # the marker comes last
        for name, data in files.items():
            (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / name).write_bytes(data)

    return fetch, calls


def test_download_marks_a_complete_copy_where_the_code_reads_it(tmp_path, monkeypatch):
    item = next(i for i in download_weights.ITEMS if i.name == "vae-fp16-fix")
    fetch, calls = fake_fetch({"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"x"})
    folder = download_weights.download(item, tmp_path, fetch=fetch)
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tmp_path))
    assert base_model.resolve_source(base_model.FP16_VAE) == folder
    assert calls == [(base_model.FP16_VAE, item.allow_patterns)]
    download_weights.download(item, tmp_path, fetch=fetch)
    assert len(calls) == 1  # complete: not fetched again


def test_a_download_missing_the_weights_is_not_marked_complete(tmp_path):
    item = next(i for i in download_weights.ITEMS if i.name == "base")
    fetch, _ = fake_fetch({"model_index.json": b"{}", "unet/config.json": b"{}"})
    with pytest.raises(download_weights.DownloadError, match=r"nothing matched text_encoder/\*\.fp16\.safetensors"):
        download_weights.download(item, tmp_path, fetch=fetch)
    assert not (download_weights.item_folder(tmp_path, item.repo_id) / ".complete").exists()


def test_only_half_precision_files_of_the_components_the_code_loads():
    base = next(i for i in download_weights.ITEMS if i.name == "base")
    weights = [p for p in base.allow_patterns if p.endswith(".safetensors")]
    assert weights and all(p.endswith(".fp16.safetensors") for p in weights)
    refiner = next(i for i in download_weights.ITEMS if i.name == "refiner")
    assert [p for p in refiner.allow_patterns if p.endswith(".safetensors")] == ["unet/*.fp16.safetensors"]


def test_the_script_refuses_to_download_offline_and_unknown_names(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_weights.main(["--only", "base"]) == 1
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
    assert download_weights.main(["--only", "nope", "--list"]) == 1
    assert download_weights.main(["--list"]) == 0
