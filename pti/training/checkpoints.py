"""Training checkpoints: everything needed to resume a run, as safetensors + JSON (nothing pickled), written
atomically (a temp folder renamed into place, so a crash never leaves a half-written checkpoint).

Layout of ``checkpoint-<step>/``: ``trainable.safetensors`` (UNet parameters being trained, by name),
``embeddings.safetensors`` (new-token rows), ``optimizer.safetensors`` + ``state.json`` (optimizer scalars,
scheduler state, step, loss history), ``rng.safetensors`` (torch CPU/CUDA RNG states).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pti.training.optim import join_optimizer_state, split_optimizer_state

CHECKPOINT_PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, one line."""


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng: dict[str, torch.Tensor]
    loss_history: list[float]


def save_checkpoint(root: Path, checkpoint: Checkpoint) -> Path:
    """Write ``root/checkpoint-<step>`` atomically and return it."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{CHECKPOINT_PREFIX}*"):  # staging left behind by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{CHECKPOINT_PREFIX}{checkpoint.step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file(_contiguous(checkpoint.trainable), str(staging / "trainable.safetensors"))
        save_file(_contiguous(checkpoint.embeddings), str(staging / "embeddings.safetensors"))
        optimizer_tensors, optimizer_rest = split_optimizer_state(checkpoint.optimizer_state)
        save_file(optimizer_tensors, str(staging / "optimizer.safetensors"))
        save_file(_contiguous(checkpoint.rng), str(staging / "rng.safetensors"))
        state = {"step": checkpoint.step, "optimizer": optimizer_rest, "scheduler": checkpoint.scheduler_state,
                 "loss_history": checkpoint.loss_history}
        (staging / "state.json").write_text(json.dumps(state))
        _fsync_folder(staging, with_files=True)  # on disk before the rename publishes it (a preempted VM loses caches)
        retired = staging.with_name(staging.name + ".old")
        if final.exists():  # replaced by two renames: a crash between them leaves no half-deleted checkpoint
            os.rename(final, retired)
        os.rename(staging, final)
        _fsync_folder(root)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _fsync_folder(folder: Path, with_files: bool = False) -> None:
    for path in sorted(folder.iterdir()) if with_files else []:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    names = ("trainable.safetensors", "embeddings.safetensors", "optimizer.safetensors", "rng.safetensors",
             "state.json")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"resume_from {folder} is not a checkpoint folder (missing {', '.join(missing)})")
    state = json.loads((folder / "state.json").read_text())
    return Checkpoint(
        step=int(state["step"]),
        trainable=load_file(str(folder / "trainable.safetensors")),
        embeddings=load_file(str(folder / "embeddings.safetensors")),
        optimizer_state=join_optimizer_state(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]),
        scheduler_state=state["scheduler"],
        rng=load_file(str(folder / "rng.safetensors")),
        loss_history=list(state["loss_history"]),
    )


def find_resume_checkpoint(path: Path) -> Path:
    """``resume_from`` may name a checkpoint, a folder of checkpoints, or a run's output folder (whose checkpoints
    live in ``<output>-checkpoints``); the latest complete checkpoint found is used."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path, path.with_name(path.name + "-checkpoints")):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"resume_from {path}: no checkpoint in it or in {path.name}-checkpoints next to it")


def latest_checkpoint(root: Path) -> Path | None:
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def capture_rng() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{index}"] = state
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Restore the CPU state and the state of each GPU the checkpoint saw that this machine has (a resume on a
    machine with fewer GPUs, or none, restores what exists)."""
    torch.set_rng_state(states["torch_cpu"])
    saved = sum(k.startswith("torch_cuda_") for k in states)
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(min(saved, present)):
        torch.cuda.set_rng_state(states[f"torch_cuda_{index}"], index)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
