"""Bucket bounds (kohya's min/max_bucket_reso) and the enlargement limit for small photos, as a user sees them: the
bucket sizes written to the dataset, the photos skipped, and one-line refusals."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import PreprocessError, PreprocessSettings, preprocess


def photo(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(path)


def sizes(dataset: Path) -> dict[str, tuple[int, int]]:
    with (dataset / "captions.csv").open(newline="") as handle:
        return {row["image_file"].split("-", 1)[1]: (int(row["width"]), int(row["height"]))
                for row in csv.DictReader(handle)}


def settings(**overrides) -> PreprocessSettings:
    values = dict(resolution=512, use_bucketing=True, captioning_model=None, crop_based_on_salience=False,
                  device="cpu")
    values.update(overrides)
    return PreprocessSettings(**values)


def test_bucket_bounds_limit_the_bucket_sizes_used(tmp_path):
    photo(tmp_path / "up" / "wide.png", (900, 300))
    photo(tmp_path / "up" / "square.png", (600, 600), seed=1)
    free = sizes(preprocess(tmp_path / "up", tmp_path / "free", settings()))
    bounded = sizes(preprocess(tmp_path / "up", tmp_path / "bounded",
                               settings(bucket_min_side=384, bucket_max_side=640)))
    assert free == {"wide.png": (768, 320), "square.png": (512, 512)}
    assert bounded == {"wide.png": (640, 384), "square.png": (512, 512)}, "the widest bucket within 384..640"


def test_bounds_that_leave_no_bucket_are_a_one_line_error():
    with pytest.raises(PreprocessError, match="bucket_min_side=700 and bucket_max_side=None") as caught:
        settings(bucket_min_side=700)
    assert "\n" not in str(caught.value)


def test_small_photos_are_not_enlarged_beyond_max_upscale(tmp_path, caplog):
    photo(tmp_path / "up" / "tiny.png", (100, 100))  # 5.1x to 512
    photo(tmp_path / "up" / "fine.png", (300, 300), seed=1)  # 1.7x
    with caplog.at_level(logging.WARNING):
        default = sizes(preprocess(tmp_path / "up", tmp_path / "default", settings(use_bucketing=False)))
    assert set(default) == {"fine.png"}
    assert "tiny.png: 100x100 would be enlarged 5.1x to 512x512, more than max_upscale=4" in caplog.text
    asked = sizes(preprocess(tmp_path / "up", tmp_path / "asked", settings(use_bucketing=False, max_upscale=6)))
    assert set(asked) == {"fine.png", "tiny.png"}


def test_an_upload_of_only_too_small_photos_says_why(tmp_path):
    photo(tmp_path / "up" / "tiny.png", (64, 64))
    with pytest.raises(PreprocessError, match="none of the 1 images could be used: tiny.png: 64x64 would be "
                                              r"enlarged 8.0x to 512x512, more than max_upscale=4"):
        preprocess(tmp_path / "up", tmp_path / "ds", settings(use_bucketing=False))


def test_train_passes_the_bucket_and_upscale_inputs_on():
    import train
    from test_train_inputs import train_defaults

    args = {**train_defaults(), "input_images": "x.zip", "resolution": 512, "use_bucketing": True,
            "bucket_min_side": 384, "bucket_max_side": 640, "max_upscale": 2.0}
    preprocess_settings = train._preprocess_settings(args)
    assert preprocess_settings.buckets() == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert preprocess_settings.max_upscale == 2.0
    assert train._class_preprocess_settings({**args, "class_prompt": "a dog"}).buckets() == \
        preprocess_settings.buckets()
