"""A training run in its own process, for the fault-injection tests (tests/test_reliability_training.py).

    python tests/training_driver.py SETTINGS_JSON [--crash-in-checkpoint STEP FILE_INDEX]

SETTINGS_JSON holds :class:`trainer.TrainingSettings` fields (paths as strings). The run prints ``step N`` after each
optimizer step, so a test can SIGKILL it at a chosen step. ``--crash-in-checkpoint STEP FILE_INDEX`` kills the
process with SIGKILL from inside the checkpoint save of step STEP, right after its FILE_INDEX-th tensor file
(0-based) was written: a crash between the tensor writes of one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("SDXL_MODEL", "tiny")

import torch  # noqa: E402

from pti.training import checkpoints  # noqa: E402
from pti.training import trainer  # noqa: E402

PATH_FIELDS = ("dataset_dir", "output_dir", "checkpoint_dir", "resume_from", "class_data_dir")


def settings_from_json(text: str) -> trainer.TrainingSettings:
    values = json.loads(text)
    for name in PATH_FIELDS:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return trainer.TrainingSettings(**values)


def report_steps(kill_at_step: int | None) -> None:
    """Print ``step N`` after each optimizer step; SIGKILL this process right after step ``kill_at_step``, before
    anything else of that step (its checkpoint) runs."""
    step_once = trainer.Trainer._optimizer_step

    def step_and_report(self) -> float:
        loss = step_once(self)
        print(f"step {self.step + 1}", flush=True)
        if self.step + 1 == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    trainer.Trainer._optimizer_step = step_and_report


def crash_in_checkpoint(step: int, file_index: int) -> None:
    write = checkpoints.save_file
    written: dict[int, int] = {}

    def write_then_maybe_crash(tensors, filename, *args, **kwargs):
        write(tensors, filename, *args, **kwargs)
        match = re.match(rf"\.{checkpoints.CHECKPOINT_PREFIX}(\d+)\.", Path(filename).parent.name)
        if match and int(match.group(1)) == step:
            count = written.get(step, 0)
            written[step] = count + 1
            if count == file_index:
                print(f"crashing after {Path(filename).name} of checkpoint {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save_file = write_then_maybe_crash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings_json")
    parser.add_argument("--crash-in-checkpoint", nargs=2, type=int, metavar=("STEP", "FILE_INDEX"))
    parser.add_argument("--kill-at-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # the test process's count (tests/threads.py)
    report_steps(args.kill_at_step)
    if args.crash_in_checkpoint:
        crash_in_checkpoint(*args.crash_in_checkpoint)
    trainer.train_model(settings_from_json(args.settings_json))
    print("done", flush=True)


if __name__ == "__main__":
    main()
