"""Draw the README's demo picture from a finished `make demo`: the training images, what the base mini-world model
draws for the demo prompt, and what it draws with the trained tar loaded (same seeds); then the same pair for
prompts of the shapes the base model knows (the first of bench/subject_fidelity.py's known-shape prompts, one per
image): what the trained heart does to them (the benchmark's drift and leak columns). The toy world's evaluator reads
every image.

    python scripts/demo_figure.py demo_out docs/demo.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ["SDXL_MODEL"] = "mini-world"
os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")  # trained tars by path (local use)

from PIL import Image, ImageDraw  # noqa: E402

from pti.toyworld.evaluator import load_evaluator, read  # noqa: E402
from pti.toyworld.fidelity import prior_probes  # noqa: E402

PROMPT = "a photo of a blue TOK on a pink background"
PRIOR_SEED = 2  # bench/subject_fidelity.py's known-shape prompts
KNOWN_SHAPES_LABEL = "known shapes, one prompt each\n(a photo of a <colour> <shape>\non a <background> background)"
SCALE = 3
LABEL_WIDTH = 260


def training_images(archive: Path, count: int) -> list[Image.Image]:
    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if n.endswith(".png"))[:count]
        return [Image.open(io.BytesIO(handle.read(n))).convert("RGB") for n in names]


def generate(predictor, prompts: list[str], weights: str | None) -> list[Image.Image]:
    from predict import default_inputs

    images = []
    for seed, prompt in enumerate(prompts):
        (path,) = predictor.predict(**{
            **default_inputs(), "prompt": prompt, "width": 64, "height": 64, "scheduler": "K_EULER",
            "num_inference_steps": 20, "guidance_scale": 5.0, "seed": seed, "apply_watermark": False,
            "lora_scale": 1.0, "replicate_weights": weights, "disable_safety_checker": True, "output_format": "png"})
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def row(label: str, images: list[Image.Image], evaluator, asked: list[str] | None = None) -> Image.Image:
    """The images side by side, each with what the evaluator reads under it (and what was asked, when given)."""
    side = 64 * SCALE
    readings = read(evaluator, images)
    out = Image.new("RGB", (LABEL_WIDTH + side * len(images), side + (32 if asked else 18)), "white")
    draw = ImageDraw.Draw(out)
    draw.multiline_text((6, 6), label, fill="black")
    for index, (image, reading) in enumerate(zip(images, readings)):
        x = LABEL_WIDTH + index * side
        out.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, 0))
        draw.text((x + 4, side + 3), f"{reading.colour} {reading.shape}", fill="black")
        if asked:
            draw.text((x + 4, side + 17), f"(asked: {asked[index]})", fill="grey")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args()
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    evaluator = load_evaluator()
    tar = str(args.demo_dir / "train" / "trained_model.tar")
    rows = [
        row("training images\n(a red TOK)", training_images(args.demo_dir / "subject.zip", args.count), evaluator),
    ]
    for weights, name in ((None, "base model"), (tar, "trained tar loaded")):
        rows.append(row(f"{name}:\n{PROMPT}", generate(predictor, [PROMPT] * args.count, weights), evaluator))
    known = prior_probes(args.count, seed=PRIOR_SEED)
    asked = [f"{p.expected.colour} {p.expected.shape}" for p in known]
    for weights, name in ((None, "base model"), (tar, "trained tar loaded")):
        rows.append(row(f"{name}:\n{KNOWN_SHAPES_LABEL}", generate(predictor, [p.prompt for p in known], weights),
                        evaluator, asked))
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for index, image in enumerate(rows):
        figure.paste(image, (0, sum(r.height for r in rows[:index])))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output)
    print(f"wrote {args.output} (labels under each image: what the evaluator reads)")


if __name__ == "__main__":
    main()
