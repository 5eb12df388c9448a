"""Training survives faults: preemption (SIGKILL) and resume, a crash inside a checkpoint save, non-finite losses,
running out of GPU memory or disk; every failure of ``train()`` is one line and a non-zero status.

Tiny model, CPU, 64x64 images. The kill tests run the trainer in separate processes (tests/training_driver.py)
while the uninterrupted reference run trains in this one; the resumed runs must end with its weights.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti.training import checkpoints
import cog_local
from pti.training import failures
import train
from pti.training import trainer
from training_fixtures import concept_image, write_dataset_folder
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread, as the driver processes)

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("training_driver.py")
STEPS = 8
CHECKPOINT_EVERY = 2
CRASH_STEP = 4  # the crash-in-save run dies inside the save of this checkpoint
KILL_STEP = 5  # the SIGKILLed run dies right after this step: between checkpoints 4 and 6, so it resumes from 4
# The interrupted runs' schedule: linear warmup over steps 1-3, cosine decay over 4-8. The crashed run resumes from
# checkpoint 2, inside the warmup; the killed one from checkpoint 4, inside the decay.
SCHEDULE = {"lr_scheduler": "cosine", "lr_warmup_steps": 3}
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "embeddings.safetensors")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset_folder(tmp_path_factory.mktemp("data") / "dataset", ["a photo of TOK"] * 2)


def run_settings(dataset: Path, output_dir: Path, **overrides) -> dict:
    return {"dataset_dir": str(dataset), "output_dir": str(output_dir), "precision": "fp32", "device": "cpu",
            "seed": 5, "resolution": 64, "train_batch_size": 1, "max_train_steps": STEPS, "lora_rank": 4,
            "checkpointing_steps": CHECKPOINT_EVERY, "validation_prompts": [], "show_progress": False, **overrides}


def resume_settings(dataset: Path, output_dir: Path, **overrides) -> dict:
    """The settings of the interrupted, resumed and reference runs: run_settings with the warmup + cosine schedule."""
    return run_settings(dataset, output_dir, **SCHEDULE, **overrides)


def in_process_settings(values: dict) -> trainer.TrainingSettings:
    from training_driver import settings_from_json

    return settings_from_json(json.dumps(values))


@dataclass
class DriverRun:
    """A training process; ``kill_at_step``: it SIGKILLs itself right after that optimizer step."""

    settings: dict
    kill_at_step: int | None = None
    crash_in_checkpoint: tuple[int, int] | None = None
    lines: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    stderr: str = ""

    def start(self) -> DriverRun:
        args = [sys.executable, str(DRIVER), json.dumps(self.settings)]
        if self.crash_in_checkpoint:
            args += ["--crash-in-checkpoint", *map(str, self.crash_in_checkpoint)]
        if self.kill_at_step is not None:
            args += ["--kill-at-step", str(self.kill_at_step)]
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.stderr_file, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def wait(self, timeout: float = 600) -> int:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.stderr_file.seek(0)
        self.stderr = self.stderr_file.read()
        self.stderr_file.close()
        return self.process.returncode


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in WEIGHT_FILES:
        found.update({f"{name}:{key}": value for key, value in load_file(output_dir / name).items()})
    return found


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def interrupted_and_reference(dataset, tmp_path_factory):
    """Start the SIGKILLed run and the crash-in-save run, train the uninterrupted reference meanwhile, then resume
    both with ``resume_from``: the first in a new process from its partial output folder, the second in this one
    from its last checkpoint (only what is on disk carries over either way)."""
    root = tmp_path_factory.mktemp("runs")
    kill_step = KILL_STEP
    killed = DriverRun(resume_settings(dataset, root / "killed" / "trained_model"), kill_at_step=kill_step).start()
    crashed = DriverRun(resume_settings(dataset, root / "crashed" / "trained_model",
                                        checkpoint_dir=str(root / "crashed" / "checkpoints")),
                        crash_in_checkpoint=(CRASH_STEP, 1)).start()
    reference = root / "reference" / "trained_model"
    torch.manual_seed(12345)  # whatever state this process's RNG is in, the seed alone decides the run
    trainer.train_model(in_process_settings(resume_settings(dataset, reference)))
    killed_status, crashed_status = killed.wait(), crashed.wait()
    assert killed_status == -signal.SIGKILL, f"the run was to be killed at step {kill_step}: {killed.stderr[-2000:]}"
    assert crashed_status == -signal.SIGKILL, crashed.stderr[-2000:]
    survivors = sorted(p.name for p in (root / "crashed" / "checkpoints").iterdir())
    last_checkpoint = checkpoints.latest_checkpoint(root / "crashed" / "checkpoints")
    resumed = DriverRun(resume_settings(dataset, root / "killed" / "trained_model",
                                        resume_from=str(root / "killed" / "trained_model"))).start()
    torch.manual_seed(54321)
    trainer.train_model(in_process_settings(resume_settings(dataset, root / "crashed" / "trained_model",
                                                            checkpoint_dir=str(root / "crashed" / "checkpoints"),
                                                            resume_from=str(last_checkpoint))))
    assert resumed.wait() == 0, resumed.stderr[-3000:]
    return {"root": root, "reference": reference, "kill_step": kill_step, "killed": killed, "resumed": resumed,
            "crashed_survivors": survivors, "crashed_last": last_checkpoint}


def test_sigkill_between_checkpoints_then_resume_from_the_partial_output_gives_the_uninterrupted_weights(
        interrupted_and_reference):
    runs = interrupted_and_reference
    killed_dir = runs["root"] / "killed" / "trained_model"
    print(f"\nSIGKILL after step {runs['kill_step']} of {STEPS}; resumed from {killed_dir}")
    assert f"step {runs['kill_step']}" in runs["killed"].lines and "done" not in runs["killed"].lines
    resumed_from_step = int(runs["resumed"].lines[0].split()[1]) - 1
    assert resumed_from_step == KILL_STEP - KILL_STEP % CHECKPOINT_EVERY, runs["resumed"].lines
    assert_same_weights(weights(killed_dir), weights(runs["reference"]))


def test_a_crash_between_the_tensor_writes_of_a_checkpoint_leaves_no_wrong_checkpoint(interrupted_and_reference):
    runs = interrupted_and_reference
    survivors = [name for name in runs["crashed_survivors"] if not name.startswith(".")]
    assert survivors == [f"checkpoint-{CHECKPOINT_EVERY}"], runs["crashed_survivors"]
    reference_checkpoints = runs["reference"].with_name("trained_model-checkpoints")
    saved = checkpoints.load_checkpoint(runs["crashed_last"])
    expected = checkpoints.load_checkpoint(reference_checkpoints / f"checkpoint-{CHECKPOINT_EVERY}")
    assert saved.step == CHECKPOINT_EVERY
    assert_same_weights(saved.trainable, expected.trainable)
    assert_same_weights(saved.embeddings, expected.embeddings)
    assert_same_weights(weights(runs["root"] / "crashed" / "trained_model"), weights(runs["reference"]))


def test_the_resume_points_lie_in_the_warmup_and_in_the_cosine_decay(interrupted_and_reference):
    """The equal weights above mean the schedule went on across warmup and decay: the learning rate the reference
    run saved at each checkpoint rises through the warmup (checkpoint 2, where the crashed run resumed) and falls in
    the decay (checkpoint 4, where the killed run resumed, and 6)."""
    folder = interrupted_and_reference["reference"].with_name("trained_model-checkpoints")
    rates = {step: checkpoints.load_checkpoint(folder / f"checkpoint-{step}").scheduler_state["_last_lr"]
             for step in (2, 4, 6)}
    assert rates[2] < rates[4] and rates[4] > rates[6]
    assert interrupted_and_reference["crashed_last"].name == "checkpoint-2"


def test_resumed_run_trained_after_the_checkpoint(interrupted_and_reference):
    """The equality above is not the checkpoint passing through: the weights moved after the resume point."""
    runs = interrupted_and_reference
    checkpoint = checkpoints.load_checkpoint(runs["crashed_last"])
    final = weights(runs["root"] / "crashed" / "trained_model")

    def lora_b_norm(tensors: dict[str, torch.Tensor]) -> float:
        return sum(float(v.norm()) for k, v in tensors.items() if "lora_B" in k)

    assert lora_b_norm(final) != pytest.approx(lora_b_norm(checkpoint.trainable), rel=1e-3)
    saved = final["embeddings.safetensors:clip_l"]  # in the default save_precision, fp16
    assert not torch.allclose(saved, checkpoint.embeddings["clip_l"].to(saved.dtype))


def _checkpoint(step: int, value: float) -> checkpoints.Checkpoint:
    weight = torch.nn.Parameter(torch.full((4,), value))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(4)
    optimizer.step()
    return checkpoints.Checkpoint(step=step, trainable={"w": weight.detach()}, embeddings={"clip_l": torch.zeros(1, 2)},
                                  optimizer_state=optimizer.state_dict(), scheduler_state={}, rng=checkpoints.capture_rng(),
                                  loss_history=[value])


def test_a_crash_while_replacing_a_checkpoint_leaves_only_complete_ones(tmp_path, monkeypatch):
    """Saving a step that already has a checkpoint (after resuming from an earlier one) replaces it; dying while
    the old one is being deleted must not leave a half-deleted ``checkpoint-<step>`` for a resume to pick."""
    root = tmp_path / "checkpoints"
    checkpoints.save_checkpoint(root, _checkpoint(2, 2.0))
    checkpoints.save_checkpoint(root, _checkpoint(4, 4.0))
    rmtree = checkpoints.shutil.rmtree

    def die_half_way_through_the_first_delete(path, *args, **kwargs):
        monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
        next(Path(path).iterdir()).unlink()
        raise OSError("killed while deleting")

    monkeypatch.setattr(checkpoints.shutil, "rmtree", die_half_way_through_the_first_delete)
    with pytest.raises(OSError, match="killed while deleting"):
        checkpoints.save_checkpoint(root, _checkpoint(4, 5.0))
    for folder in root.glob("checkpoint-*"):
        checkpoints.load_checkpoint(folder)  # every checkpoint-<step> folder present is complete
    latest = checkpoints.load_checkpoint(checkpoints.find_resume_checkpoint(root))
    assert (latest.step, latest.loss_history) in ((4, [5.0]), (2, [2.0]))


def test_staging_left_by_a_killed_save_is_swept_by_the_next_save(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.save_checkpoint(root, _checkpoint(2, 2.0))
    stale = root / ".checkpoint-4.abc123"  # what a SIGKILL in the middle of a save leaves
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half")
    checkpoints.save_checkpoint(root, _checkpoint(4, 4.0))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-4"]


# ------------------------------------------------------------------------------------------ in-step faults


def test_a_huge_learning_rate_stops_the_run_at_the_first_non_finite_step(dataset, tmp_path):
    out = tmp_path / "trained_model"
    settings = in_process_settings(run_settings(dataset, out, lora_lr=1e30, ti_lr=1e30, max_train_steps=6,
                                                checkpointing_steps=0))
    with pytest.raises(failures.RunFailed) as error:
        trainer.train_model(settings)
    message = str(error.value)
    assert "\n" not in message
    assert "step" in message and "not finite" in message and "learning rate" in message and "lora_lr=1e+30" in message
    step = int(message.split("step ")[1].split(":")[0])
    assert step <= 3, message
    assert not any((out / name).exists() for name in WEIGHT_FILES), "no weights are written from a diverged run"


def test_nan_injected_into_a_batch_stops_the_run_naming_that_step(dataset, tmp_path, monkeypatch):
    batch = trainer.Trainer._batch

    def batch_with_nan_at_step_3(self, micro):
        drawn = batch(self, micro)
        if self.step == 2:
            drawn["latents"] = torch.full_like(drawn["latents"], float("nan"))
        return drawn

    monkeypatch.setattr(trainer.Trainer, "_batch", batch_with_nan_at_step_3)
    settings = in_process_settings(run_settings(dataset, tmp_path / "out", precision="bf16", max_train_steps=5,
                                                checkpointing_steps=0))
    with pytest.raises(failures.RunFailed, match=r"^training stopped at step 3: .*float32 \(precision fp32\)$"):
        trainer.train_model(settings)


# ------------------------------------------------------------------------------------------ through train()


@pytest.fixture
def photos_zip(tmp_path) -> Path:
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(2):
            buffer = io.BytesIO()
            concept_image(index).save(buffer, format="PNG")
            archive.writestr(f"photo{index}.png", buffer.getvalue())
    return path


TRAIN_ARGS = {"resolution": 64, "max_train_steps": 2, "train_batch_size": 1, "lora_rank": 4, "seed": 1,
              "validation_prompts": "", "captioning_model": "", "verbose": False, "checkpointing_steps": 1}


@pytest.fixture
def work_root(tmp_path, monkeypatch) -> Path:
    """train() makes its work folder with tempfile: keep it where the test can look."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(root))
    return root


def _train(photos_zip: Path, **overrides):
    return train.train(input_images=photos_zip, **{**TRAIN_ARGS, **overrides})


def test_out_of_gpu_memory_in_a_step_names_the_step_and_the_settings_to_lower(photos_zip, work_root, monkeypatch,
                                                                                caplog):
    losses = trainer.Trainer.denoising_losses
    calls = []

    def out_of_memory_on_step_2(self, *args, **kwargs):
        calls.append(self.step)
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 24.00 GiB total)")
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "denoising_losses", out_of_memory_on_step_2)
    with caplog.at_level(logging.ERROR), pytest.raises(failures.RunFailed) as error:
        _train(photos_zip)
    message = str(error.value)
    assert "\n" not in message and message.startswith("training step 2 ran out of GPU memory"), message
    for setting in ("train_batch_size", "resolution", "gradient_checkpointing"):
        assert setting in message
    assert "OutOfMemoryError" in caplog.text and "Traceback" in caplog.text, "the full trace goes to the log"
    assert list(work_root.iterdir()) == [], "a failed run leaves no work folder (dataset, checkpoints, tar)"


def test_out_of_disk_while_writing_the_tar_leaves_no_tar(photos_zip, work_root, monkeypatch, caplog):
    add = tarfile.TarFile.addfile
    added = []

    def disk_full_after_two_members(self, tarinfo, fileobj=None):
        if len(added) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        added.append(tarinfo.name)
        return add(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", disk_full_after_two_members)
    with caplog.at_level(logging.ERROR), pytest.raises(failures.RunFailed) as error:
        _train(photos_zip)
    message = str(error.value)
    assert "\n" not in message and "trained_model.tar" in message and "disk space" in message, message
    assert len(added) == 2, "the failure came half-way through the tar"
    assert not list(work_root.rglob("*.tar")) and not list(work_root.rglob(".trained_model.tar*"))
    assert "No space left on device" in caplog.text


def test_a_successful_run_still_returns_its_tar(photos_zip, work_root):
    tar_path = Path(_train(photos_zip).weights)
    with tarfile.open(tar_path) as tar:
        assert {"pytorch_lora_weights.safetensors", "embeddings.safetensors"} <= set(tar.getnames())
    assert sorted(p.name for p in tar_path.parent.iterdir()) == ["trained_model.tar"], "no leftovers beside it"


@pytest.mark.parametrize(("case", "inputs", "expected"), [
    ("corrupt archive", {"input_images": "@garbage"}, r"not a zip or tar"),
    ("no images", {"input_images": "@notes"}, r"no images"),
    ("rank zero", {"lora_rank": "0"}, r"lora_rank (must be at least 1|fails constraint >= 1)"),
    ("no LoRA targets", {"lora_target_modules": ","}, r"lora_target_modules is empty"),
    ("trigger absent", {"caption_prefix": "a photo of something"}, r"trigger word 'TOK' appears in no caption"),
    ("diverging", {"lora_lr": "1e30", "ti_lr": "1e30", "max_train_steps": "4"}, r"step \d: .*not finite"),
])
def test_every_failure_of_train_is_one_line_and_a_nonzero_status(photos_zip, work_root, tmp_path, capsys, case,
                                                                 inputs, expected):
    (tmp_path / "garbage.zip").write_bytes(b"definitely not an archive" * 40)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("notes.txt", "no photos here")
    values = {"input_images": f"@{photos_zip}", **{k: str(v) for k, v in TRAIN_ARGS.items()}, **inputs}
    values["input_images"] = values["input_images"].replace("@garbage", f"@{tmp_path / 'garbage.zip'}").replace(
        "@notes", f"@{tmp_path / 'notes.zip'}")
    argv = ["train", "-o", str(tmp_path / "out")] + [arg for k, v in values.items() for arg in ("-i", f"{k}={v}")]
    status = cog_local.main(argv)
    stderr_lines = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert stderr_lines[-1].startswith("error: ") and stderr_lines[-1].count("error:") == 1, stderr_lines[-3:]
    assert re.search(expected, stderr_lines[-1]), stderr_lines[-1]
    assert list(work_root.iterdir()) == [], "a failed run leaves no work folder"
