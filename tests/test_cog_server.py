"""Drive the real Cog HTTP server (coglet, no Docker) the way Replicate does, on the tiny base model.

One server per mode for the whole module: `POST /trainings` with the photos as a `data:` URI and as an http URL
from a local file server, returning the tar; `POST /predictions` with `replicate_weights` pointing at that tar,
returning images; invalid inputs answered with HTTP 422 naming the field; and the servers still healthy after.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cog_server import CogServer, FileServer, data_uri, decode_data_uri
from conftest import ROOT
from exactness import images_differ

SETUP_TIMEOUT_S = 300
TRAIN_INPUTS = {"token_string": "TOK", "caption_prefix": "a photo of TOK", "resolution": 64, "max_train_steps": 2,
                "train_batch_size": 1, "seed": 0, "validation_num_inference_steps": 2}
PREDICT_INPUTS = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 7,
                  "output_format": "png"}
ARTIFACT_FILES = {"pytorch_lora_weights.safetensors", "embeddings.safetensors", "special_params.json",
                  "training_config.json", "README.md"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cog_server")


@pytest.fixture(scope="module")
def photos_zip(work) -> Path:
    """Three real photos that scikit-image ships, shrunk so the data: URI stays small."""
    import skimage

    path = work / "www" / "photos.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("astronaut.png", "chelsea.png", "coffee.png"):
            image = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
            image.thumbnail((96, 96))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            archive.writestr(name.replace(".png", ".jpg"), buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def files(work, photos_zip):
    with FileServer(photos_zip.parent) as server:
        yield server


@pytest.fixture(scope="module")
def servers(work):
    env = {"SDXL_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "WEIGHTS_CACHE_DIR": str(work / "weights-cache"),
           "WEIGHTS_ALLOW_LOCAL_PATHS": ""}  # as hosted: local paths in replicate_weights are refused
    started = {mode: CogServer(ROOT, mode, env, work / f"{mode}-server.log").start() for mode in ("train", "predict")}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda server: server.wait_ready(SETUP_TIMEOUT_S), started.values()))
        yield started
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(CogServer.stop, started.values()))


def _train(server: CogServer, input_images: str, **overrides) -> dict:
    response = server.post("/trainings", {"input": {"input_images": input_images, **TRAIN_INPUTS, **overrides}})
    assert response.status_code == 200, response.text
    return response.json()


def _tar_members(tar_bytes: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {Path(member.name).as_posix().removeprefix("./") for member in tar.getmembers() if member.isfile()}


@pytest.fixture(scope="module")
def trained_tar(servers, files, photos_zip) -> Path:
    """Train from an http URL (as Replicate passes uploaded files) and publish the tar on the file server."""
    result = _train(servers["train"], files.url(photos_zip.name))
    assert result["status"] == "succeeded", result.get("error") or servers["train"].log_tail()
    tar_path = photos_zip.parent / "trained_model.tar"
    tar_path.write_bytes(decode_data_uri(result["output"]["weights"]))
    return tar_path


def test_training_from_an_http_url_returns_the_trained_tar(trained_tar):
    members = _tar_members(trained_tar.read_bytes())
    assert ARTIFACT_FILES <= members, members


def test_training_from_a_data_uri_returns_the_trained_tar(servers, photos_zip):
    result = _train(servers["train"], data_uri(photos_zip, "application/zip"), token_string="ZQX",
                    caption_prefix="a photo of ZQX")
    assert result["status"] == "succeeded", result.get("error")
    weights = result["output"]["weights"]
    assert weights.startswith("data:application/x-tar;base64,")  # no upload URL: Cog inlines the file
    tar_bytes = decode_data_uri(weights)
    assert ARTIFACT_FILES <= _tar_members(tar_bytes)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        special = next(m for m in tar.getmembers() if m.name.endswith("special_params.json"))
        assert '"ZQX"' in tar.extractfile(special).read().decode()


def _predict(server: CogServer, **inputs) -> list[np.ndarray]:
    response = server.post("/predictions", {"input": {**PREDICT_INPUTS, **inputs}})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "succeeded", result.get("error") or server.log_tail()
    return [np.asarray(Image.open(io.BytesIO(decode_data_uri(uri))).convert("RGB")) for uri in result["output"]]


def test_prediction_with_the_trained_tar_url_returns_images_that_the_weights_change(servers, files, trained_tar):
    tuned = _predict(servers["predict"], replicate_weights=files.url(trained_tar.name), num_outputs=2)
    assert len(tuned) == 2 and all(image.shape == (64, 64, 3) for image in tuned)
    base = _predict(servers["predict"])
    assert images_differ(tuned[0], base[0])


INVALID = [
    ("predict", "num_inference_steps", "ten", "is not of type"),
    ("predict", "guidance_scale", 1000, "greater than the maximum"),
    ("predict", "scheduler", "NO_SUCH_SCHEDULER", "is not one of"),
    ("predict", "num_outputs", 0, "less than the minimum"),
    ("predict", "lora_scale", 2.5, "greater than the maximum"),
    ("predict", "extra_lora_scale", "strong", "is not valid under any of the schemas"),
    ("predict", "extra_lora", 7, "is not valid under any of the schemas"),
    ("predict", "embeddings", 7, "is not valid under any of the schemas"),
    ("predict", "width", 4096, "greater than the maximum"),
    ("predict", "height", 32, "less than the minimum"),
    ("train", "max_train_steps", "many", "is not of type"),
    ("train", "resolution", 512.5, "is not of type"),
    ("train", "lora_rank", 0, "less than the minimum"),
]


@pytest.mark.parametrize(("mode", "field", "value", "message"), INVALID, ids=[f"{m}-{f}" for m, f, *_ in INVALID])
def test_invalid_input_is_a_422_naming_the_field(servers, files, photos_zip, mode, field, value, message):
    base = {"input_images": files.url(photos_zip.name), **TRAIN_INPUTS} if mode == "train" else dict(PREDICT_INPUTS)
    endpoint = "/trainings" if mode == "train" else "/predictions"
    response = servers[mode].post(endpoint, {"input": {**base, field: value}})
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert [d["loc"][-1] for d in details] == [field]
    assert message in details[0]["msg"]


def test_training_without_photos_is_a_422_naming_input_images(servers):
    response = servers["train"].post("/trainings", {"input": dict(TRAIN_INPUTS)})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "input_images"


def test_a_corrupt_archive_fails_that_training_only(servers, work):
    garbage = work / "not_a_zip.zip"
    garbage.write_bytes(b"this is not an archive" * 10)
    response = servers["train"].post("/trainings", {"input": {"input_images": data_uri(garbage, "application/zip"),
                                                              **TRAIN_INPUTS}})
    assert response.status_code == 200
    result = response.json()
    assert result["status"] == "failed"
    assert len(result["error"].splitlines()) == 1 and re.search(r"archive|zip|tar", result["error"], re.I)


def _failure(server: CogServer, **inputs) -> str:
    response = server.post("/predictions", {"input": {**PREDICT_INPUTS, **inputs}})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "failed", result
    assert len(result["error"].splitlines()) == 1, result["error"]
    return result["error"].rpartition("Error: ")[2]  # coglet prefixes "Prediction failed: …: WeightsError: "


@pytest.fixture(scope="module")
def bare_lora(trained_tar) -> Path:
    """The trained tar's LoRA as a lone diffusers .safetensors file, its up weights negated (another LoRA)."""
    import safetensors.torch

    with tarfile.open(trained_tar) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("pytorch_lora_weights.safetensors"))
        state = safetensors.torch.load(tar.extractfile(member).read())
    path = trained_tar.parent / "other_lora.safetensors"
    safetensors.torch.save_file({k: -v if "lora_B" in k else v for k, v in state.items()}, path)
    return path


def test_extra_loras_as_one_url_or_a_list_with_their_scales(servers, files, trained_tar, bare_lora):
    server = servers["predict"]
    tuned = _predict(server, replicate_weights=files.url(trained_tar.name))[0]
    one = _predict(server, replicate_weights=files.url(trained_tar.name), extra_lora=files.url(bare_lora.name),
                   extra_lora_scale=0.8)[0]
    listed = _predict(server, replicate_weights=files.url(trained_tar.name), extra_lora=[files.url(bare_lora.name)],
                      extra_lora_scale=[0.8])[0]
    assert images_differ(one, tuned)
    assert np.array_equal(one, listed), "a one-item list is the single value"
    error = _failure(server, extra_lora=[files.url(bare_lora.name)] * 2, extra_lora_scale=[0.5])
    assert error == "extra_lora[1]: the same weights as extra_lora[0]; give each set once (its scale can go up to 2)"


def test_an_embedding_file_by_url_brings_its_trigger_word_and_a_lora_given_as_one_is_refused(servers, files,
                                                                                              trained_tar, bare_lora):
    """The trained tar's embeddings/TOK.safetensors by URL, as an A1111/ComfyUI embedding file is given."""
    folder = trained_tar.parent / "embeddings"
    with tarfile.open(trained_tar) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("embeddings/TOK.safetensors"))
        folder.mkdir(exist_ok=True)
        (folder / "TOK.safetensors").write_bytes(tar.extractfile(member).read())
    server = servers["predict"]
    base = _predict(server)[0]
    assert images_differ(_predict(server, embeddings=files.url("embeddings/TOK.safetensors"))[0], base)
    assert np.array_equal(_predict(server, embeddings=[files.url("embeddings/TOK.safetensors")],
                                   prompt="a photo of a dog")[0],
                          _predict(server, prompt="a photo of a dog")[0]), "no trigger word, no change"
    error = _failure(server, embeddings=files.url(bare_lora.name))
    assert re.fullmatch(r"embeddings\[0\] http://127\.0\.0\.1/other_lora\.safetensors: not an SDXL embedding: it "
                        r"lacks clip_l and clip_g \(has unet\..*\)", error), error


def test_what_cog_predict_sends_for_at_file_works_and_local_paths_are_refused(servers, trained_tar):
    """`cog predict -i replicate_weights=@trained_model.tar` reads the file and sends it as a data: URL (Cog's CLI,
    pkg/predict/input.go: an `@` value becomes a File input, materialised with fileToDataURL), whatever the input's
    type; a hosted predictor refuses local paths without saying whether they exist."""
    server = servers["predict"]
    by_url = _predict(server, replicate_weights=data_uri(trained_tar, "application/x-tar"))[0]
    assert by_url.shape == (64, 64, 3)
    refusal = "replicate_weights: local paths are not accepted here; give an http(s) URL or a data: URI"
    assert _failure(server, replicate_weights=str(trained_tar)) == refusal
    assert _failure(server, replicate_weights="/no/such/weights.tar") == refusal
    assert _failure(server, extra_lora=[str(trained_tar)]) == refusal.replace("replicate_weights", "extra_lora[0]")


def test_what_only_the_predictor_checks_fails_with_one_line_naming_the_input(servers):
    server = servers["predict"]
    assert _failure(server, width=1001) == "width=1001 is not a multiple of 8; the nearest are 1000 and 1008"
    assert _failure(server, scheduler="PNDM", num_inference_steps=3) == \
        "scheduler=PNDM needs num_inference_steps >= 4, got 3"


def test_servers_stay_healthy_after_bad_requests(servers):
    for server in servers.values():
        server.wait_ready(60)  # Cog frees its slot just after answering: READY again, not necessarily at once
    assert len(_predict(servers["predict"])) == 1


def test_readme_diffusers_code_loads_the_trained_tar(trained_tar, work, monkeypatch):
    """The README's diffusers snippet, run as written on the trained tar, with the tiny base model on the CPU."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"### diffusers\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    from pti.models.base_model import resolve_model_dir

    code = (code.replace('"stabilityai/stable-diffusion-xl-base-1.0"', repr(str(resolve_model_dir("tiny"))))
            .replace("torch.float16", "torch.float32").replace('.to("cuda")', '.to("cpu")')
            .replace("num_inference_steps=30", "num_inference_steps=2, height=64, width=64"))
    run_dir = work / "readme"
    run_dir.mkdir()
    (run_dir / "trained_model.tar").write_bytes(trained_tar.read_bytes())
    monkeypatch.chdir(run_dir)
    exec(compile(code, "README.md (diffusers)", "exec"), {})
    assert Image.open(run_dir / "beach.png").size == (64, 64)
