"""A tiny training job for tests/test_multiprocess.py, run under ``torchrun`` (or alone, as the single-process
reference). Each process writes ``<probe_dir>/rank<N>.json`` with

* ``digests``: after every optimizer step, a SHA-256 of its trainable state (new-token rows and LoRA weights);
* ``writes``: every file-system write it made under the artifact and checkpoint folders, caught by a Python
  audit hook (``open`` for writing, ``os.mkdir``, ``os.rename``/``os.replace``, ``tempfile.mkdtemp`` …);
* ``loss_history``: the loss of every optimizer step (averaged over the processes);

and ``<probe_dir>/initial-rank<N>.safetensors`` and ``final-rank<N>.safetensors``: its trainable state before
the first step and after the last.

    torchrun --standalone --nproc_per_node 2 tests/multiprocess_job.py DATASET CLASS_IMAGES OUTPUT_DIR PROBE_DIR \
        BATCH_SIZE

Every per-sample random draw is switched on (flips, caption dropout, offset and pyramid noise, and prior
preservation with the class images given), so that the two process layouts of test_multiprocess.py agree only if
each draw is keyed by the sample, not by the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pti.training.step_hooks import StepHooks  # noqa: E402
from pti.training.trainer import Trainer, TrainingSettings  # noqa: E402

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                "shutil.rmtree", "shutil.move", "tempfile.mkdtemp", "tempfile.mkstemp"}


class WriteRecorder:
    """Audit hook that remembers writes under ``roots``."""

    def __init__(self, roots: list[Path]):
        self.roots = [str(root.resolve()) for root in roots]
        self.writes: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                self._note(event, path)
        elif event in WRITE_EVENTS and args:
            self._note(event, args[0])

    def _note(self, event: str, path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            resolved = os.path.abspath(os.fsdecode(path))
            if any(resolved == root or resolved.startswith(root + os.sep) for root in self.roots):
                self.writes.append(f"{event} {resolved}")


class DigestAfterEachStep(StepHooks):
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.digests: list[str] = []

    def step_done(self, step: int, pivoted: bool) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(trainable_state(self.trainer).items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        self.digests.append(digest.hexdigest())


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The new-token rows (``embeddings.<encoder>``) and the LoRA weights (``unet.<parameter>``), on the CPU."""
    state = {f"embeddings.{name}": tensor.detach().cpu().clone()
             for name, tensor in trainer.embeddings.embeddings().items()}
    state.update({f"unet.{name}": param.detach().float().cpu().clone()
                  for name, param in trainer.unet.named_parameters() if "lora_" in name})
    return state


def main(dataset: Path, class_images: Path, output_dir: Path, probe_dir: Path, batch_size: int) -> None:
    checkpoint_dir = output_dir.with_name(output_dir.name + "-checkpoints")
    recorder = WriteRecorder([output_dir, checkpoint_dir])
    sys.addaudithook(recorder)
    settings = TrainingSettings(
        dataset_dir=dataset, output_dir=output_dir, checkpoint_dir=checkpoint_dir, base_model="tiny",
        precision="fp32", device="cpu", resolution=64, train_batch_size=batch_size, max_train_steps=4, ti_frac=0.5,
        lora_rank=4, ti_lr=1e-2, lora_lr=1e-2, lr_warmup_steps=0, checkpointing_steps=2, flip_augmentation=True,
        caption_dropout=0.25, noise_offset=0.05, pyramid_noise_iterations=1, class_data_dir=class_images,
        class_prompt="a photo of a thing",
        validation_num_inference_steps=2, caption_prefix="a photo of TOK", show_progress=False,
        seed=7 + int(os.environ.get("RANK", "0")),  # differs per process, as train.py's random default seed would
    )
    trainer = Trainer.create(settings)
    probe_dir.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(trainer), str(probe_dir / f"initial-rank{trainer.accelerator.process_index}.safetensors"))
    hooks = DigestAfterEachStep(trainer)
    trainer.step_hooks = hooks
    trainer.run()
    rank = trainer.accelerator.process_index
    save_file(trainable_state(trainer), str(probe_dir / f"final-rank{rank}.safetensors"))
    trainer.export()
    report = {"rank": rank, "num_processes": trainer.accelerator.num_processes,
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "digests": hooks.digests, "writes": recorder.writes, "loss_history": trainer.loss_history}
    (probe_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:5]), int(sys.argv[5]))
