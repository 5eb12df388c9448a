"""The Cog predictor on the tiny model: trained weights by path, data: URI and URL; switching equals a fresh
process; cog-sdxl tars; every mode, output count and format; one-line errors after which predictions still work."""

from __future__ import annotations

import base64
import inspect
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from predict import Predictor
from misbehaving_server import MisbehavingServer
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)
from weights_fixtures import tiny_unet, write_cog_sdxl_tar, write_trained_tar

ROOT = Path(__file__).resolve().parents[1]
PREDICT_DEFAULTS = {name: param.default.default for name, param in inspect.signature(Predictor.predict).parameters.items()
                    if name != "self"}
FAST = dict(width=64, height=64, num_inference_steps=2, seed=11, output_format="png", prompt="a photo of TOK dog")

# Fresh processes: the imports are done once, then each case runs in its own forked child (no model, adapter or
# tokenizer state exists before the fork), which calls setup() with the weights Cog passes and predicts once.
FRESH_PROCESSES = textwrap.dedent("""
    import inspect, json, os, sys
    import numpy as np, torch
    from PIL import Image
    torch.set_num_threads(1)  # as the one_torch_thread fixture: same thread count, same bits
    sys.path.insert(0, {root!r})
    from predict import Predictor
    cases, args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    defaults = {{k: p.default.default for k, p in inspect.signature(Predictor.predict).parameters.items() if k != "self"}}
    for weights, out in cases:
        pid = os.fork()
        if pid == 0:
            predictor = Predictor()
            predictor.setup(weights)
            paths = predictor.predict(**{{**defaults, **args}})
            np.save(out, np.array(Image.open(paths[0])))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(f"fresh process for {{weights}} failed with status {{status}}")
""")


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tars")
    unet = tiny_unet()
    return {"a": write_trained_tar(folder, 1, unet), "b": write_trained_tar(folder, 2, unet),
            "cog": write_cog_sdxl_tar(folder, 4, unet)}


@pytest.fixture(scope="module")
def fresh_images(tars, tmp_path_factory):
    """Images of fresh processes (base, A, B), computed in the background while the module's other tests run;
    the fixture's value is a function that waits for them."""
    folder = tmp_path_factory.mktemp("fresh")
    env = {**os.environ, "WEIGHTS_CACHE_DIR": str(folder / "cache")}
    cases = {"none": None, "a": str(tars["a"]), "b": str(tars["b"])}
    outputs = {name: folder / f"{name}.npy" for name in cases}
    process = subprocess.Popen(
        [sys.executable, "-c", FRESH_PROCESSES.format(root=str(ROOT)),
         json.dumps([(weights, str(outputs[name])) for name, weights in cases.items()]), json.dumps(FAST)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def collect() -> dict[str, np.ndarray]:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr.decode()[-2000:]
        return {name: np.load(path) for name, path in outputs.items()}

    return collect


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    previous = os.environ.get("WEIGHTS_CACHE_DIR")
    os.environ["WEIGHTS_CACHE_DIR"] = str(tmp_path_factory.mktemp("weights-cache"))
    predictor = Predictor()
    predictor.setup()
    yield predictor
    if previous is None:
        os.environ.pop("WEIGHTS_CACHE_DIR")
    else:
        os.environ["WEIGHTS_CACHE_DIR"] = previous


def run(predictor: Predictor, **inputs) -> list[Path]:
    return predictor.predict(**{**PREDICT_DEFAULTS, **FAST, **inputs})


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def one_image(predictor: Predictor, **inputs) -> np.ndarray:
    (path,) = run(predictor, **inputs)
    return pixels(path)


def data_uri(path: Path) -> str:
    return "data:application/x-tar;base64," + base64.b64encode(path.read_bytes()).decode()


def test_weights_by_path_data_uri_and_url_change_the_image_and_repeat(predictor, tars, fresh_images):
    base = one_image(predictor)
    by_path = one_image(predictor, replicate_weights=str(tars["a"]))
    assert not np.array_equal(by_path, base), "trained weights change the image"
    assert np.array_equal(one_image(predictor, replicate_weights=str(tars["a"])), by_path), "same seed, same image"
    assert np.array_equal(one_image(predictor, replicate_weights=data_uri(tars["a"])), by_path)
    with MisbehavingServer(tars["a"].parent) as server:
        assert np.array_equal(one_image(predictor, replicate_weights=server.url("files/" + tars["a"].name)), by_path)
    assert np.array_equal(one_image(predictor), base)


def test_switching_a_b_a_none_equals_fresh_processes(predictor, tars, fresh_images):
    sequence = [("a", str(tars["a"])), ("b", str(tars["b"])), ("a", str(tars["a"])), ("none", None)]
    images = [(name, one_image(predictor, replicate_weights=weights)) for name, weights in sequence]
    fresh = fresh_images()
    assert not np.array_equal(fresh["a"], fresh["b"]) and not np.array_equal(fresh["a"], fresh["none"])
    for step, (name, image) in enumerate(images):
        assert np.array_equal(image, fresh[name]), f"step {step} ({name}) differs from a fresh process"


def test_cog_sdxl_tar_loads_and_changes_the_image(predictor, tars):
    base = one_image(predictor)
    cog = one_image(predictor, replicate_weights=str(tars["cog"]))
    assert not np.array_equal(cog, base)
    assert predictor.weights.expand_prompt("a photo of TOK") == "a photo of <s0><s1>"


def test_lora_scale_zero_leaves_only_the_embeddings(predictor, tars):
    base_prompt = one_image(predictor, replicate_weights=str(tars["a"]), prompt="a photo of a dog", lora_scale=0.0)
    assert np.array_equal(base_prompt, one_image(predictor, prompt="a photo of a dog"))


def test_img2img_inpaint_and_both_refiners_run(predictor, tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "input.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(80)[None, :].repeat(64, 0) < 40, 0, 255).astype(np.uint8)).save(mask)
    txt2img = one_image(predictor, num_inference_steps=4)
    assert one_image(predictor, image=image).shape == (64, 80, 3), "img2img keeps the input's size"
    assert one_image(predictor, image=image, mask=mask, width=64, height=64).shape == (64, 64, 3)
    for refine in ("expert_ensemble_refiner", "base_image_refiner"):
        refined = one_image(predictor, refine=refine, num_inference_steps=4)
        assert refined.shape == txt2img.shape and not np.array_equal(refined, txt2img), refine


def test_num_outputs_and_output_formats(predictor):
    paths = run(predictor, num_outputs=3, output_format="webp")
    assert [p.name for p in paths] == ["out-0.webp", "out-1.webp", "out-2.webp"]
    assert len({pixels(p).tobytes() for p in paths}) == 3, "each output is its own image"
    for output_format, pil_format in (("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")):
        (path,) = run(predictor, output_format=output_format)
        assert path.suffix == "." + output_format and Image.open(path).format == pil_format
    (low,) = run(predictor, output_format="jpg", output_quality=5)
    low_bytes = low.stat().st_size
    (high,) = run(predictor, output_format="jpg", output_quality=100)
    assert low_bytes < high.stat().st_size
    assert not low.exists(), "a prediction's files are removed when the next prediction starts"


def test_every_scheduler_runs(predictor):
    from pti.inference.generation import SCHEDULERS

    images = {name: one_image(predictor, scheduler=name, num_inference_steps=4) for name in SCHEDULERS}
    assert len({image.tobytes() for image in images.values()}) > len(SCHEDULERS) // 2


def test_watermark_applies_per_call_only(predictor):
    size = dict(width=256, height=256, num_inference_steps=1)
    marked = one_image(predictor, **size)
    unmarked = one_image(predictor, apply_watermark=False, **size)
    assert not np.array_equal(marked, unmarked)
    assert np.array_equal(one_image(predictor, **size), marked), "apply_watermark=false lasts one call"


def test_safety_checker_drops_flagged_images_unless_disabled(predictor):
    checker = predictor.models.safety_checker
    saved = checker.concept_embeds_weights.data.clone()
    checker.concept_embeds_weights.data.fill_(-1.0)  # every image now scores above every concept threshold
    try:
        with pytest.raises(ValueError, match="NSFW content detected") as error:
            run(predictor)
        assert "\n" not in str(error.value)
        assert len(run(predictor, disable_safety_checker=True)) == 1
    finally:
        checker.concept_embeds_weights.data.copy_(saved)


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory, tars) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.tar").write_text("not a tar at all\n" * 50)
    with tarfile.open(folder / "empty.tar", "w") as tar:
        tar.add(tars["a"].parent / "out1" / "special_params.json", arcname="special_params.json")
    return {"not_a_tar": str(folder / "notes.tar"), "no_weight_files": str(folder / "empty.tar"),
            "missing": str(folder / "missing.tar")}


@pytest.mark.parametrize("case, inputs, message", [
    ("width", dict(width=65), "multiple of 8"),
    ("too large", dict(width=4096), "outside"),
    ("long prompt", dict(prompt="photo " * 100), "tokens long"),
    ("mask only", dict(mask=Path(__file__)), "without image"),
    ("not a tar", dict(replicate_weights="not_a_tar"), "not a valid trained-weights tar"),
    ("no weight files", dict(replicate_weights="no_weight_files"), "holds none of"),
    ("missing", dict(replicate_weights="missing"), "no such file"),
    ("bad url", dict(replicate_weights="http://127.0.0.1:9/none.tar"), "download failed"),
])
def test_errors_are_one_line_and_the_next_prediction_works(predictor, bad_weights, case, inputs, message):
    base = one_image(predictor)
    if inputs.get("replicate_weights") in bad_weights:
        inputs = {**inputs, "replicate_weights": bad_weights[inputs["replicate_weights"]]}
    with pytest.raises(ValueError, match=message) as error:
        run(predictor, **inputs)
    assert "\n" not in str(error.value), str(error.value)
    assert np.array_equal(one_image(predictor), base)


def test_cog_accepts_the_predictor_schema():
    from cog import _inspector

    info = _inspector.create_predictor("predict", "Predictor")
    names = set(info.inputs)
    cog_sdxl = {"prompt", "negative_prompt", "image", "mask", "width", "height", "num_outputs", "scheduler",
                "num_inference_steps", "guidance_scale", "prompt_strength", "seed", "refine", "high_noise_frac",
                "refine_steps", "apply_watermark", "lora_scale", "replicate_weights", "disable_safety_checker"}
    assert cog_sdxl | {"output_format", "output_quality"} <= names
    assert info.inputs["width"].default == 1024 and info.inputs["lora_scale"].default == 0.6
    assert {"K_EULER", "KarrasDPM", "DPM++2MKarras", "DPM++2MSDEKarras", "UniPC"} <= set(info.inputs["scheduler"].choices)
