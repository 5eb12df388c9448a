"""Where the toy world's committed weights live."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
EVALUATOR_PATH = WEIGHTS_DIR / "evaluator.safetensors"
MINI_WORLD_DIR = WEIGHTS_DIR / "mini-world"
