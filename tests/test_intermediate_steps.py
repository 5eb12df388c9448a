"""Intermediate weights (issue 15, point 2): train() with checkpointing_steps puts every saved step's weights and
samples in the tar, with a contact sheet of all steps; the predictor loads the step ``#step=<n>`` names."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from exactness import assert_images_close, images_differ
from training_fixtures import write_photo_zip
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)
from weights_fixtures import predictor_with_own_cache

STEPS = (2, 4, 6)  # checkpointing_steps=2 of max_train_steps=8: the final step 8 is the tar's top level
WEIGHT_FILES = {"pytorch_lora_weights.safetensors", "embeddings.safetensors", "embeddings/TOK.safetensors",
                "trained_model.safetensors", "trained_model_kohya.safetensors", "special_params.json",
                "training_config.json"}
FAST = dict(width=64, height=64, num_inference_steps=2, seed=3, output_format="png", prompt="a photo of TOK",
            guidance_scale=5.0, lora_scale=1.0)


@pytest.fixture(scope="module")
def trained_tar(tmp_path_factory) -> Path:
    import train

    work = tmp_path_factory.mktemp("steps")
    archive = write_photo_zip(work, 3, size=64)
    output = train.train(input_images=archive, seed=5, resolution=64, train_batch_size=1, max_train_steps=8,
                         checkpointing_steps=2, lora_rank=4, lora_lr=3e-2, ti_lr=3e-2, lr_warmup_steps=0,
                         captioning_model="", crop_based_on_salience=False, verbose=False,
                         validation_prompts="a photo of TOK|TOK on a table", validation_num_inference_steps=1)
    return Path(output.weights)


@pytest.fixture(scope="module")
def unpacked(trained_tar, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(trained_tar) as tar:
        tar.extractall(folder, filter="data")
    return folder


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    yield from predictor_with_own_cache(tmp_path_factory)


def image(predictor, weights: str | None, **inputs) -> np.ndarray:
    defaults = {name: p.default.default for name, p in inspect.signature(type(predictor).predict).parameters.items()
                if name != "self"}
    (path,) = predictor.predict(**{**defaults, **FAST, "replicate_weights": weights, **inputs})
    return np.array(Image.open(path))


def weight_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in [*folder.iterdir(), *folder.glob("embeddings/*")]
            if p.is_file()}


def test_every_saved_step_has_the_final_formats_and_its_samples(unpacked):
    assert WEIGHT_FILES <= weight_files(unpacked)
    assert sorted(p.name for p in (unpacked / "steps").iterdir() if p.is_dir()) == [f"{s:06d}" for s in STEPS]
    for step in STEPS:
        folder = unpacked / "steps" / f"{step:06d}"
        assert weight_files(folder) == WEIGHT_FILES
        with safe_open(folder / "trained_model_kohya.safetensors", "pt") as handle:  # save_precision's default
            assert {handle.get_slice(k).get_dtype() for k in handle.keys() if not k.endswith(".alpha")} == {"F16"}
        assert sorted(p.name for p in (folder / "samples").iterdir()) == [f"step-{step:06d}-0.png",
                                                                            f"step-{step:06d}-1.png"]
        assert json.loads((folder / "training_config.json").read_text())["step"] == step
    config = json.loads((unpacked / "training_config.json").read_text())
    assert config["saved_steps"] == list(STEPS) and config["total_steps"] == 8


def test_contact_sheet_has_a_row_per_step_and_a_column_per_prompt(unpacked):
    from pti.formats.steps import HEADER, LABEL_WIDTH, THUMB

    with Image.open(unpacked / "steps" / "contact_sheet.png") as opened:
        sheet = np.array(opened.convert("RGB"))
    rows, columns, header, cell = len(STEPS) + 1, 2, HEADER, THUMB + 4  # saved steps + final; two validation prompts
    assert sheet.shape[:2] == (header + rows * cell, LABEL_WIDTH + columns * cell)
    for row in range(rows):
        for column in range(columns):
            top, left = header + row * cell, LABEL_WIDTH + column * cell
            sample = sheet[top:top + 64, left:left + 64]
            assert (sample != 255).any(), f"cell ({row}, {column}) holds no sample"


def test_predictor_loads_the_step_the_suffix_names(predictor, trained_tar, unpacked):
    by_step = {step: image(predictor, f"{trained_tar}#step={step}") for step in STEPS}
    final = image(predictor, str(trained_tar))
    for a, b in [(2, 4), (4, 6), (2, 6)]:
        assert images_differ(by_step[a], by_step[b]), f"steps {a} and {b} give the same image"
    assert all(images_differ(by_step[s], final) for s in STEPS)
    # The step chosen is that step: the same image as its extracted folder loaded on its own.
    assert_images_close(by_step[4], image(predictor, str(unpacked / "steps" / "000004")), "step 4 by suffix")
    # The last step is the tar's top level.
    assert_images_close(image(predictor, f"{trained_tar}#step=8"), final, "final step by suffix")


@pytest.mark.parametrize("suffix, message", [
    ("#step=5", "step 5 was not saved; saved steps: 2, 4, 6, 8"),
    ("#step=best", "'#step=best' must name a saved step"),
])
def test_a_step_not_in_the_tar_is_a_one_line_error_and_the_tar_stays_usable(predictor, trained_tar, suffix,
                                                                             message):
    from pti.inference.weights_cache import WeightsError

    with pytest.raises(WeightsError) as error:
        image(predictor, f"{trained_tar}{suffix}")
    assert message in str(error.value) and "\n" not in str(error.value)
    image(predictor, f"{trained_tar}#step=2")


def test_an_extra_lora_loads_the_step_its_suffix_names(predictor, trained_tar, unpacked, tmp_path, caplog):
    step4 = image(predictor, None, extra_lora=f"{trained_tar}#step=4")
    assert_images_close(step4, image(predictor, str(unpacked / "steps" / "000004")), "extra_lora step 4 by suffix")
    assert images_differ(step4, image(predictor, None, extra_lora=f"{trained_tar}#step=2"))
    # Two steps of one tar in one request: one download (the one pinned cache entry), an adapter per step.
    image(predictor, f"{trained_tar}#step=2", extra_lora=f"{trained_tar}#step=4")
    active = predictor.weights.active
    assert [a.label for a in active] == [f"replicate_weights {trained_tar}#step=2",
                                         f"extra_lora[0] {trained_tar}#step=4"]
    assert active[0].key != active[1].key and len(predictor.weights.cache.pinned) == 1
    # Each set's base is checked: a step of a folder recorded as trained on another base is named in the log.
    other_base = tmp_path / "other-base"
    shutil.copytree(unpacked, other_base)
    config = json.loads((other_base / "training_config.json").read_text())
    config["base_model_source"] = {"name": "other_sdxl.safetensors", "url": None, "sha256": None}
    (other_base / "training_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="weights_manager"):
        image(predictor, f"{trained_tar}#step=2", extra_lora=f"{other_base}#step=4")
    mismatches = [r.getMessage() for r in caplog.records if "trained on base model" in r.getMessage()]
    assert len(mismatches) == 1
    assert mismatches[0].startswith(f"weights extra_lora[0] {other_base}#step=4 were trained on base model "
                                    f"other_sdxl.safetensors")
