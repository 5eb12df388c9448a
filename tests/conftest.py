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

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
