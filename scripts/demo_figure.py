"""Draw the README's demo picture from a finished `make demo`: the training images, what the base mini-world model
draws for the demo prompt, and what it draws with the trained tar loaded (same seeds), each row read by the toy
world's evaluator.

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

PROMPT = "a photo of a blue TOK on a pink background"
SCALE = 3
LABEL_WIDTH = 260


def training_images(archive: Path, count: int) -> list[Image.Image]:
    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if n.endswith(".png"))[:count]
        return [Image.open(io.BytesIO(handle.read(n))).convert("RGB") for n in names]


def generate(predictor, weights: str | None, count: int) -> list[Image.Image]:
    from predict import default_inputs

    images = []
    for seed in range(count):
        (path,) = predictor.predict(**{
            **default_inputs(), "prompt": PROMPT, "width": 64, "height": 64, "scheduler": "K_EULER",
            "num_inference_steps": 20, "guidance_scale": 5.0, "seed": seed, "apply_watermark": False,
            "lora_scale": 1.0, "replicate_weights": weights, "disable_safety_checker": True, "output_format": "png"})
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def row(label: str, images: list[Image.Image], evaluator) -> Image.Image:
    side = 64 * SCALE
    readings = read(evaluator, images)
    out = Image.new("RGB", (LABEL_WIDTH + side * len(images), side + 18), "white")
    draw = ImageDraw.Draw(out)
    draw.multiline_text((6, 6), label, fill="black")
    for index, (image, reading) in enumerate(zip(images, readings)):
        x = LABEL_WIDTH + index * side
        out.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, 0))
        draw.text((x + 4, side + 3), f"{reading.colour} {reading.shape}", fill="black")
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
        row(f"base model:\n{PROMPT}", generate(predictor, None, args.count), evaluator),
        row(f"trained tar loaded:\n{PROMPT}", generate(predictor, tar, args.count), evaluator),
    ]
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for index, image in enumerate(rows):
        figure.paste(image, (0, sum(r.height for r in rows[:index])))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output)
    print(f"wrote {args.output} (labels under each image: what the evaluator reads)")


if __name__ == "__main__":
    main()
