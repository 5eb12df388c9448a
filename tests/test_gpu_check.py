"""bench/gpu_check.py cannot rot: the same script the GPU machine runs, here on the CPU with the tiny model, prints
one table in which every check passed (the 2-process row skipped: no GPUs), and exits non-zero when a check fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
EXPECTED_ROWS = ("train(): total", "train(): time to first step", "train(): s/step before pivot",
                 "train(): s/step after pivot", "train(): peak GPU memory", "train(): gradient checkpointing",
                 "train(): losses finite", "train(): 2-process data parallel", "predictor: setup()",
                 "predictor: first load of the trained tar", "predictor: switch A↔B", "predictor: A→B→A exact",
                 "train(): text-encoder LoRA", "predictor: text-encoder LoRA on, then off", "whole check")


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 3 and cells[0] != "check":
            rows[cells[0]] = cells[1:]
    return rows


def test_the_gpu_check_passes_on_the_cpu_with_the_tiny_model(tmp_path):
    result = run_check("--device", "cpu", "--model", "tiny", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    for name in EXPECTED_ROWS:
        assert name in rows, (name, result.stdout)
    statuses = {name: cells[1] for name, cells in rows.items()}
    assert statuses.pop("train(): 2-process data parallel") == "skip"
    assert set(statuses.values()) == {"ok"}, result.stdout
    assert rows["predictor: A→B→A exact"][0] == "yes"
    assert result.stdout.count("| check ") == 1  # one table


def test_the_gpu_check_fails_with_one_line_and_a_non_zero_exit_for_a_missing_device(tmp_path):
    result = run_check("--device", "cuda:99", "--model", "tiny", "--work", str(tmp_path / "work"))
    assert result.returncode == 1
    rows = table_rows(result.stdout)
    assert rows["device"][1] == "FAIL" and "cuda:99" in rows["device"][2]
    assert rows["whole check"][1] == "FAIL"
