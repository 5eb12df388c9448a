"""Test-wide settings: never touch the network, cache built tiny models inside the checkout."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("SDXL_MODEL", "tiny")
# One torch thread: the tiny models are too small to gain from two, and a fixed count keeps results bit-identical
# between the test process and the subprocesses it compares against. Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def pytest_configure(config):
    import torch
    from hypothesis import settings

    torch.set_num_threads(1)
    # The property and fuzz tests draw the same examples on every run, so CI is repeatable; explore further locally
    # with HYPOTHESIS_PROFILE=explore.
    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
