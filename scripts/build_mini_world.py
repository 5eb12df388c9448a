"""Build the toy world's committed weights: the evaluator (when asked or missing) and the pretrained mini SDXL.

    HF_HUB_OFFLINE=1 python scripts/build_mini_world.py                      # mini world → pti/toyworld/weights/mini-world
    HF_HUB_OFFLINE=1 python scripts/build_mini_world.py --train-evaluator    # also refit the evaluator first
    HF_HUB_OFFLINE=1 python scripts/build_mini_world.py --measure-only       # re-measure the committed folder

Everything runs on the CPU and is deterministic from --seed for a given torch build and thread count. The script
prints the accuracy table of images the pipeline draws from captions (read back by the evaluator) and writes
``BUILD.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pti.toyworld.evaluator import (EvaluatorSettings, accuracy_on_renders, load_evaluator, save_evaluator,  # noqa: E402
                                    train_evaluator)
from pti.toyworld.paths import EVALUATOR_PATH, MINI_WORLD_DIR  # noqa: E402
from pti.toyworld.pretrain import (BuildSettings, DiffusionSettings, DiffusionStage, load_pipeline,  # noqa: E402
                                   name_only_stage, pretrain, save_pipeline)
from pti.toyworld.sample import SamplingSettings, Score, measure  # noqa: E402
from pti.toyworld.world import HELD_OUT_SHAPES, KNOWN_SHAPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: with any other load on a 2-core machine, 2 threads ran 20x slower)")
    parser.add_argument("--out", type=Path, default=MINI_WORLD_DIR)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--diffusion-steps", type=int, default=None, help="one stage of this many steps instead of "
                        "the committed recipe's three")
    parser.add_argument("--name-only-stage", action="store_true", help="append a stage with name-only captions "
                        "('a photo of square'); see bench/README.md")
    parser.add_argument("--unet-channels", type=int, nargs=2, metavar=("LEVEL1", "LEVEL2"), help="the UNet's "
                        "widths (committed: 64 128); with --out elsewhere, for bench/subject_fidelity.py --base-model")
    parser.add_argument("--train-evaluator", action="store_true")
    parser.add_argument("--measure-only", action="store_true")
    parser.add_argument("--count", type=int, default=192, help="known-shape captions to generate and read back")
    parser.add_argument("--held-out-count", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=SamplingSettings.guidance)
    return parser.parse_args()


def settings_from(args: argparse.Namespace) -> BuildSettings:
    settings = BuildSettings(seed=args.seed)
    if args.vae_steps is not None:
        settings = replace(settings, vae=replace(settings.vae, steps=args.vae_steps))
    if args.diffusion_steps is not None:
        settings = replace(settings, stages=(DiffusionStage(DiffusionSettings(steps=args.diffusion_steps), seed=0),))
    if args.unet_channels is not None:
        settings = replace(settings, unet_channels=tuple(args.unet_channels))
    if args.name_only_stage:
        settings = replace(settings, stages=settings.stages + (name_only_stage(),))
    return settings


def ensure_evaluator(retrain: bool, seed: int) -> dict[str, float] | None:
    if not retrain and EVALUATOR_PATH.exists():
        return None
    started = time.time()
    settings = EvaluatorSettings(seed=seed)
    save_evaluator(train_evaluator(settings), settings=settings)
    accuracy = accuracy_on_renders(load_evaluator())
    print(f"evaluator: {time.time() - started:.0f} s, fresh renders {accuracy}")
    return accuracy


def print_table(results: dict[str, Score]) -> None:
    print(f"known shapes: {', '.join(KNOWN_SHAPES)}; held out: {', '.join(HELD_OUT_SHAPES)}")
    print(f"\n{'prompts':<22}{'n':>5}{'shape':>8}{'colour':>8}{'background':>12}   shapes the evaluator read")
    for name, result in results.items():
        a = result.accuracy
        read = ", ".join(f"{k} {v}" for k, v in sorted(result.shapes_read.items(), key=lambda kv: -kv[1]))
        print(f"{name:<22}{result.count:>5}{a['shape']:>8.3f}{a['colour']:>8.3f}{a['background']:>12.3f}   {read}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    evaluator_accuracy = ensure_evaluator(args.train_evaluator, args.seed)
    build_seconds = None
    record_path = args.out / "BUILD.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}
    if not args.measure_only:
        started = time.time()
        pipe, losses = pretrain(settings)
        build_seconds = round(time.time() - started, 1)
        save_pipeline(pipe, args.out, half=True)
        print(f"pretrained in {build_seconds:.0f} s; final loss (mean of last 200 steps) "
              f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    sampling = SamplingSettings(guidance=args.guidance)
    results = measure(load_pipeline(args.out), load_evaluator(), args.count, args.held_out_count, args.seed, sampling)
    print_table(results)
    record = {
        "seed": args.seed,
        "settings": previous.get("settings") if args.measure_only else asdict(settings),
        "threads": previous.get("threads") if args.measure_only else args.threads,
        "build_seconds": build_seconds if build_seconds is not None else previous.get("build_seconds"),
        "sampling": asdict(sampling),
        "generation_accuracy": {k: {"count": v.count, **v.accuracy, "shapes_read": v.shapes_read}
                                for k, v in results.items()},
        "evaluator_fresh_render_accuracy": evaluator_accuracy or previous.get("evaluator_fresh_render_accuracy")
        or accuracy_on_renders(load_evaluator()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {record_path}")


if __name__ == "__main__":
    main()
