"""Training on two processes (torchrun, two gloo ranks that accelerate picks up) on the tiny model: it completes,
the ranks hold identical trainable weights after every step, only the main process writes, and the result is the
same artifact set as a single-process run and loads the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pti.models.base_model import load_sdxl_pipeline, pick_runtime

from training_fixtures import write_noise_photos

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "multiprocess_job.py"
STEPS = 4  # max_train_steps in multiprocess_job.py


def run_job(command: list[str], output: Path, probe: Path, dataset: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([*command, str(JOB), str(dataset), str(output), str(probe)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    dataset = write_noise_photos(count=4, size=64, folder=base / "images")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_job(torchrun, base / "two" / "out", base / "two" / "probe", dataset)
    run_job([sys.executable], base / "one" / "out", base / "one" / "probe", dataset)
    reports = {name: {r: json.loads((base / name / "probe" / f"rank{r}.json").read_text())
                      for r in ((0, 1) if name == "two" else (0,))} for name in ("two", "one")}
    return base, reports


def test_two_gloo_ranks_train_to_the_end(runs):
    _, reports = runs
    for rank, report in reports["two"].items():
        assert (report["rank"], report["num_processes"], report["backend"]) == (rank, 2, "gloo")
        assert len(report["digests"]) == STEPS
    assert reports["one"][0]["num_processes"] == 1


def test_trainable_weights_are_identical_on_both_ranks_after_every_step(runs):
    _, reports = runs
    rank0, rank1 = reports["two"][0]["digests"], reports["two"][1]["digests"]
    assert rank0 == rank1
    assert len(set(rank0)) == STEPS  # every step changed the weights: the equality is not vacuous


def test_only_the_main_process_writes(runs):
    base, reports = runs
    assert reports["two"][1]["writes"] == []
    main_writes = " ".join(reports["two"][0]["writes"])
    for produced in ("samples", "logs", "checkpoint-2", "embeddings.safetensors"):
        assert produced in main_writes  # the recorder does see the main process's writes
    assert len(list((base / "two" / "out" / "logs").iterdir())) == 1  # one TensorBoard event file


def relative_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder).parent if p.parent.name == "logs" else p.relative_to(folder))
            for p in folder.rglob("*") if p.is_file()}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def test_result_matches_a_single_process_run_and_loads(runs):
    base, _ = runs
    two, one = base / "two" / "out", base / "one" / "out"
    assert relative_files(two) == relative_files(one)
    for weights in two.glob("*.safetensors"):
        assert tensor_shapes(weights) == tensor_shapes(one / weights.name)
    assert json.loads((two / "training_config.json").read_text())["num_processes"] == 2

    pipe = load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))
    special = json.loads((two / "special_params.json").read_text())
    tokens = special["TOK"].replace("><", "> <").split()

    def render():
        return pipe(f"a photo of {special['TOK']}", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    pipe.load_lora_weights(str(two))
    with safe_open(str(two / "embeddings.safetensors"), framework="pt") as handle:
        for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
            pipe.load_textual_inversion(handle.get_tensor(key), token=tokens, text_encoder=encoder,
                                        tokenizer=tokenizer)
    trained = render()
    pipe.unload_lora_weights()
    assert np.isfinite(trained).all()
    assert np.abs(trained - render()).max() > 1e-3  # the LoRA changes the image
