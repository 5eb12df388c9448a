"""The text-encoder cache after the pivot holds at most text_cache_max_bytes when caption shuffling keeps bringing
new captions (bench/caption_cache.py measures it at SDXL shapes on a 200-image set:

    .venv/bin/python bench/caption_cache.py

1000 steps, batch 4, pivot at 500: 2200 captions, 667 MiB unbounded; 256 MiB with the default budget, hit rate
0% either way, since shuffled tag orders almost never repeat)."""

from __future__ import annotations

import pytest
import torch

from pti.training.text_cache import TextCache, entry_bytes
from pti.training.trainer import Trainer
from test_trainer import make_settings
from training_fixtures import single_torch_thread, write_dataset_folder

one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def entry(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((77, 8), value), torch.full((4,), value)


def test_least_recently_used_captions_leave_past_the_budget():
    size = entry_bytes(*entry(0))
    cache = TextCache(max_bytes=2 * size)
    cache.put("a", *entry(1))
    cache.put("b", *entry(2))
    cache.get("a")  # "b" is now the least recently used
    cache.put("c", *entry(3))
    assert list(cache) == ["a", "c"] and cache.bytes == 2 * size and cache.evicted == 1
    assert torch.equal(cache["c"][0], entry(3)[0])


def test_unbounded_cache_keeps_every_caption():
    cache = TextCache(max_bytes=None)
    for index in range(50):
        cache.put(str(index), *entry(index))
    assert len(cache) == 50 and cache.evicted == 0


def test_shuffled_captions_stay_within_the_budget_while_training(tmp_path):
    captions = [f"TOK, tag{i}, tag{i + 1}, tag{i + 2}, tag{i + 3}" for i in range(4)]
    dataset = write_dataset_folder(tmp_path / "dataset", captions)
    budget_entries = 3
    probe = Trainer.create(make_settings(dataset, tmp_path / "probe", max_train_steps=1, validation_prompts=()))
    width = sum(encoder.config.hidden_size for encoder in probe.text_encoders)
    one = 77 * width * 4 + probe.text_encoders[1].config.projection_dim * 4  # float32 on the CPU
    settings = make_settings(dataset, tmp_path / "out", max_train_steps=8, ti_frac=0.25, caption_shuffle=True,
                             text_cache_max_bytes=budget_entries * one, validation_prompts=())
    trainer = Trainer.create(settings)
    sizes = []
    real_step = Trainer._optimizer_step

    def recording_step(self):
        loss = real_step(self)
        if self.text_cache is not None:
            sizes.append(self.text_cache.bytes)
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", recording_step)
        trainer.run()
    assert sizes and max(sizes) <= budget_entries * one, (sizes, one)
    assert trainer.text_cache.evicted > 0 and len(trainer.text_cache) == budget_entries
