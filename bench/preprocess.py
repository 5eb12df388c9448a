"""Benchmark: preprocess a folder of large photos (4000x3000 JPEGs, like a phone's) with face detection.

    .venv/bin/python bench/preprocess.py [--count 20] [--resolution 1024]

Each configuration runs in its own process so its peak RSS is its own. Prints a table of images/second and peak
memory (wall-clock figures depend on how busy the machine is; CPU seconds per image much less). The photos are real
ones (scikit-image's astronaut and ../shared/datasets when present) upscaled to 12 MP.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHOTO_SIZE = (4000, 3000)
CONFIGS = {
    "face detection, square crops": dict(use_face_detection_instead=True),
    "face detection, buckets": dict(use_face_detection_instead=True, use_bucketing=True),
    "no masks, square crops": dict(),
}


def source_photos() -> list[Path]:
    shared = ROOT.parent / "shared" / "datasets"
    return sorted(shared.glob("*/*.jpg")) if shared.is_dir() else []


def make_large_photos(folder: Path, count: int) -> None:
    from PIL import Image, ImageOps
    from skimage import data

    sources: list[Image.Image | Path] = [Image.fromarray(data.astronaut()), *source_photos()]
    for index, source in zip(range(count), itertools.cycle(sources)):
        image = source if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
        large = ImageOps.fit(image, PHOTO_SIZE, Image.Resampling.BICUBIC)
        large.save(folder / f"photo_{index:02d}.jpg", quality=90)


def run_one(photos: Path, name: str, resolution: int) -> dict:
    from preprocess import PreprocessSettings, preprocess

    logging.disable(logging.WARNING)
    settings = PreprocessSettings(resolution=resolution, captioning_model=None, device="cpu", **CONFIGS[name])
    with tempfile.TemporaryDirectory() as out:
        start, cpu_start = time.perf_counter(), time.process_time()
        preprocess(photos, Path(out) / "dataset", settings)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images = len(list(photos.glob("*.jpg")))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"config": name, "images": images, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20, help="number of 4000x3000 photos")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(args.photos, args.run_one, args.resolution)))
        return
    with tempfile.TemporaryDirectory() as folder:
        photos = Path(folder)
        make_large_photos(photos, args.count)
        rows = []
        for name in CONFIGS:
            result = subprocess.run([sys.executable, __file__, "--run-one", name, "--photos", str(photos),
                                     "--resolution", str(args.resolution)],
                                    check=True, capture_output=True, text=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"\n{args.count} photos of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} -> {args.resolution}px, "
          f"{os.cpu_count()} CPUs, captioning off")
    print(f"| {'configuration':<30} | images | seconds | images/s | CPU s/image | peak RSS (MiB) |")
    print(f"| {'-' * 30} | -----: | ------: | -------: | ----------: | -------------: |")
    for row in rows:
        print(f"| {row['config']:<30} | {row['images']:>6} | {row['seconds']:>7.1f} | "
              f"{row['images'] / row['seconds']:>8.2f} | {row['cpu_seconds'] / row['images']:>11.2f} | "
              f"{row['peak_rss_mib']:>14.0f} |")


if __name__ == "__main__":
    main()
