"""Colour augmentation (kohya's color_aug): hue-turned copies are encoded when the latents are cached, so what a
sample trains on is the latents of the augmented pixels, and the samples draw the original and its copies."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from pti.dataset.cached import MAX_HUE_SHIFT_DEGREES, hue_shifted
from pti.training.trainer import Trainer
from test_trainer import make_settings
from training_fixtures import single_torch_thread, write_dataset_folder

one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def mean_hue_degrees(image: Image.Image) -> float:
    r, g, b = (np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0) / 255).tolist()
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


@pytest.mark.parametrize("degrees", [-16.0, -5.0, 10.0])
def test_hue_shift_turns_the_hue_by_the_asked_degrees(degrees):
    image = Image.new("RGB", (8, 8), (200, 80, 40))  # hue 12.5 degrees
    turned = mean_hue_degrees(hue_shifted(image, degrees)) - mean_hue_degrees(image)
    assert abs(turned - degrees) < 1.5, turned  # PIL's HSV keeps hue in 256 steps (1.4 degrees)


def test_cached_copies_spread_in_hue_and_samples_draw_them(tmp_path):
    captions = ["a photo of TOK", "TOK on a table"]
    dataset = write_dataset_folder(tmp_path / "dataset", captions)
    settings = make_settings(dataset, tmp_path / "out", max_train_steps=6, train_batch_size=2, color_aug_copies=3,
                             flip_augmentation=True, validation_prompts=())
    trainer = Trainer.create(settings)
    shifts = [degrees for item in trainer.dataset.items for degrees in item.hue_shifts]
    assert len(shifts) == 2 * 3 and all(abs(d) <= MAX_HUE_SHIFT_DEGREES for d in shifts)
    assert np.std(shifts) > 3, shifts  # uniform in ±16 has std 9.2
    for item in trainer.dataset.items:
        for latents, flipped in item.color_copies:
            assert not torch.equal(latents, item.latents) and flipped is not None
    colors = []
    real_draw = Trainer._draw

    def recording_draw(self, *args):
        batch = real_draw(self, *args)
        colors.extend(batch["colors"])
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_draw", recording_draw)
        trainer.run()
    assert len(set(colors)) >= 3, colors  # 12 draws over the original and 3 copies
