"""Resuming through the Cog ``train()`` entry point: a run that dies after a checkpoint, started again with the same
inputs and ``resume_from``, returns the weights of a run that was never interrupted."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from pti.training import failures
import train
from pti.training import trainer
from training_fixtures import write_plain_folder

# Warmup over three steps, then cosine decay: the run dies in step 4 and resumes from checkpoint 2, inside the
# warmup, so the resumed run has to continue the schedule across warmup and decay to reach the same weights.
INPUTS = dict(seed=11, resolution=64, train_batch_size=1, max_train_steps=6, lora_rank=2, lora_lr=1e-3,
              ti_lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=3, checkpointing_steps=2, captioning_model="",
              crop_based_on_salience=False, verbose=False, validation_prompts="")


def weights(tar_path: Path) -> dict[str, torch.Tensor]:
    with tarfile.open(tar_path) as tar:
        out = {}
        for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
            data = tar.extractfile(name).read()
            out.update({f"{name}:{k}": v for k, v in load(data).items()})
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = write_plain_folder(tmp_path_factory.mktemp("photos") / "photos", 2, size=64)
    archive = folder.parent / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for photo in folder.iterdir():
            handle.write(photo, photo.name)
    return archive


def test_a_run_that_died_resumes_from_its_logged_checkpoints(photos, tmp_path, monkeypatch):
    real_step = trainer.Trainer._optimizer_step
    reference_lrs = []

    def recorded(self):
        reference_lrs.append(self.lr_scheduler.get_last_lr())
        return real_step(self)

    monkeypatch.setattr(trainer.Trainer, "_optimizer_step", recorded)
    reference = weights(Path(train.train(input_images=photos, **INPUTS).weights))
    monkeypatch.undo()
    assert reference_lrs[1] < reference_lrs[3] and reference_lrs[5] < reference_lrs[3], "warmup, then decay"

    monkeypatch.setenv("COG_SDXL_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))

    def dies_in_step_four(self):
        if self.step == 3:
            raise RuntimeError("simulated preemption")
        return real_step(self)

    monkeypatch.setattr(trainer.Trainer, "_optimizer_step", dies_in_step_four)
    with pytest.raises(failures.RunFailed):
        train.train(input_images=photos, **INPUTS)
    monkeypatch.undo()

    (run_folder,) = (tmp_path / "checkpoints").iterdir()  # kept: it lives outside the removed work folder
    assert sorted(p.name for p in run_folder.iterdir())[-1].endswith("2")
    steps_run, resumed_lrs = [], []

    def counted(self):
        steps_run.append(self.step)
        resumed_lrs.append(self.lr_scheduler.get_last_lr())
        return real_step(self)

    monkeypatch.setattr(trainer.Trainer, "_optimizer_step", counted)
    resumed = weights(Path(train.train(input_images=photos, resume_from=str(run_folder), **INPUTS).weights))
    assert steps_run == [2, 3, 4, 5]  # it went on from the checkpoint instead of starting again
    assert resumed_lrs == reference_lrs[2:], "the learning-rate schedule goes on where it stopped"
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6)
