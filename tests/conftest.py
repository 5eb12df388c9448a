"""Test-wide settings: never touch the network, cache built tiny models inside the checkout."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("SDXL_MODEL", "tiny")
# Tests are local use: replicate_weights may name a local tar or folder (a hosted predictor refuses them; the Cog
# server tests turn this off to check that).
os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")
# One torch thread by default (PTI_TEST_THREADS=2 runs on two): the tiny models are too small to gain from more,
# and the subprocesses the tests start inherit the same count. Set before torch is imported anywhere.
# MKL_CBWR is deliberately left alone: no test relies on bit-identical renders (see tests/exactness.py), and the
# suite is run both with it unset and with MKL_CBWR=COMPATIBLE.
from threads import TORCH_THREADS  # noqa: E402

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(TORCH_THREADS)

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def pytest_configure(config):
    import torch
    from hypothesis import settings

    torch.set_num_threads(TORCH_THREADS)
    # The property and fuzz tests draw the same examples on every run, so CI is repeatable; explore further locally
    # with HYPOTHESIS_PROFILE=explore.
    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
