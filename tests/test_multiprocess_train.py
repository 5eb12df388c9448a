"""Issue 11, defects 1 and 2, on two gloo processes (torchrun) on the CPU: Cog's train() with prior preservation
and generated class images completes; both processes train from one shared work folder; the upload is preprocessed
once, by the main process; the class images are split between the processes; only the main process keeps a tar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training_fixtures import write_noise_photos

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "multiprocess_train_job.py"
NUM_CLASS_IMAGES = 3  # odd: the processes render 2 and 1


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess-train")
    photos = write_noise_photos(count=3, size=96, folder=base / "photos")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SDXL_DEVICE="cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
               str(photos), str(base / "probe"), str(NUM_CLASS_IMAGES)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return {rank: json.loads((base / "probe" / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def test_two_processes_with_prior_preservation_train_to_the_end(reports):
    for rank, report in reports.items():
        assert (report["rank"], report["num_processes"]) == (rank, 2)
        assert report["class_dataset_size"] == NUM_CLASS_IMAGES  # every process sees every class image


def test_both_processes_share_one_work_folder(reports):
    assert reports[0]["dataset_dir"] == reports[1]["dataset_dir"]
    assert reports[0]["class_data_dir"] == reports[1]["class_data_dir"]
    assert reports[0]["tar"] == reports[1]["tar"]


def test_the_upload_is_preprocessed_once_by_the_main_process_on_its_device(reports):
    (device,) = reports[0]["preprocess_devices"]  # accelerate's device of the main process ("cpu:0" here)
    assert device.split(":")[0] == "cpu"
    assert reports[1]["preprocess_devices"] == []


def test_class_images_are_split_between_the_processes(reports):
    shares = [reports[0]["class_indices"], reports[1]["class_indices"]]
    assert shares == [[0, 2], [1]]


def test_only_the_main_process_keeps_the_tar_and_nothing_else_is_left(reports):
    tar = Path(reports[0]["tar"])
    assert reports[0]["tar_exists"] and tar.is_file()
    assert sorted(p.name for p in tar.parent.iterdir()) == [tar.name]  # no dataset, markers or class images left
