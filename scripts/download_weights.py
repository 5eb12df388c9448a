"""Download the half-precision weights of every model the image uses into ``weights/`` (Cog's
``script/download-weights`` convention): ``cog build`` copies the folder into the image (``/src/weights``), and the
code reads a model from there first (``pti.models.base_model.resolve_source``), never touching the network for it.

    HF_HUB_OFFLINE=0 python scripts/download_weights.py               # everything, into ./weights
    HF_HUB_OFFLINE=0 python scripts/download_weights.py --only base   # just the SDXL base (names: see --help)
    python scripts/download_weights.py --list                         # what would be fetched, and its size class

Each repo lands in ``weights/<org>--<name>/`` with only the files the code loads (the ``fp16`` variant where the repo
has one); a ``.complete`` marker is written last, so an interrupted download is never mistaken for a copy (the
code ignores a folder without it, and this script fetches it again).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / "weights"
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class WeightsItem:
    name: str  # for --only
    repo_id: str
    allow_patterns: tuple[str, ...]
    purpose: str
    approx_gb: float


def _pipeline_patterns(weight_folders: tuple[str, ...], config_folders: tuple[str, ...]) -> tuple[str, ...]:
    """model_index.json, every listed folder's configs/tokenizer files, and the fp16 weights of ``weight_folders``
    (the folders only listed in ``config_folders`` are passed in from the base pipeline at load time)."""
    patterns = ["model_index.json"]
    for folder in weight_folders + config_folders:
        patterns += [f"{folder}/*.json", f"{folder}/*.txt"]
    patterns += [f"{folder}/*.fp16.safetensors" for folder in weight_folders]
    return tuple(patterns)


ITEMS = (
    WeightsItem("base", "stabilityai/stable-diffusion-xl-base-1.0",
                _pipeline_patterns(("text_encoder", "text_encoder_2", "unet", "vae"),
                                   ("scheduler", "tokenizer", "tokenizer_2")),
                "SDXL base (train and predict)", 7.0),
    WeightsItem("refiner", "stabilityai/stable-diffusion-xl-refiner-1.0",
                _pipeline_patterns(("unet",), ("scheduler", "text_encoder_2", "tokenizer_2", "vae")),
                "refiner UNet (predict, refine modes; shares the base's VAE and second text encoder)", 4.5),
    WeightsItem("vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", ("config.json", "diffusion_pytorch_model.safetensors"),
                "fp16-safe VAE (precision fp16: GPUs without bf16)", 0.2),
    WeightsItem("safety-checker", "CompVis/stable-diffusion-safety-checker", ("config.json", "model.safetensors"),
                "safety checker (predict)", 1.2),
    WeightsItem("feature-extractor", "openai/clip-vit-base-patch32", ("preprocessor_config.json",),
                "safety checker's image preprocessing (predict)", 0.0),
    WeightsItem("captioner", "Salesforce/blip-image-captioning-large",
                ("*.json", "*.txt", "model.safetensors"), "BLIP captions (train, images without captions)", 1.9),
    WeightsItem("clipseg", "CIDAS/clipseg-rd64-refined", ("*.json", "*.txt", "model.safetensors"),
                "CLIPSeg masks (train, mask_target_prompts)", 0.6),
)


class DownloadError(RuntimeError):
    """A download that cannot run or did not bring what the code loads; one line."""


def item_folder(dest: Path, repo_id: str) -> Path:
    return dest / repo_id.replace("/", "--")  # the layout pti.models.base_model.weights_copy_dir reads


def selected(only: str | None) -> list[WeightsItem]:
    if not only:
        return list(ITEMS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = {item.name: item for item in ITEMS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DownloadError(f"--only {unknown[0]!r} is not one of {', '.join(known)}")
    return [known[name] for name in names]


def hub_snapshot(repo_id: str, allow_patterns: tuple[str, ...], local_dir: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, allow_patterns=list(allow_patterns), local_dir=str(local_dir))


def check_download(item: WeightsItem, folder: Path) -> None:
    """The files the code needs arrived: every weights pattern matched at least one file."""
    for pattern in item.allow_patterns:
        if pattern.endswith((".safetensors", "preprocessor_config.json", "model_index.json")) and not any(
                folder.glob(pattern)):
            raise DownloadError(f"{item.repo_id}: nothing matched {pattern} (the repo's layout changed?)")


def download(item: WeightsItem, dest: Path, fetch: Callable[[str, tuple[str, ...], Path], None] = hub_snapshot,
             force: bool = False) -> Path:
    """Fetch one item into ``dest``; ``.complete`` is written only once everything it needs is there."""
    folder = item_folder(dest, item.repo_id)
    marker = folder / COMPLETE_MARKER
    if marker.is_file() and not force:
        print(f"{item.repo_id}: already in {folder}")
        return folder
    marker.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{item.repo_id}: downloading (≈{item.approx_gb:g} GB) into {folder}", flush=True)
    fetch(item.repo_id, item.allow_patterns, folder)
    check_download(item, folder)
    marker.write_text(item.repo_id + "\n")
    return folder


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="weights folder (default ./weights)")
    parser.add_argument("--only", default=None, help="comma-separated names: " + ", ".join(i.name for i in ITEMS))
    parser.add_argument("--force", action="store_true", help="download again even when marked complete")
    parser.add_argument("--list", action="store_true", help="print what would be downloaded and exit")
    args = parser.parse_args(argv)
    try:
        items = selected(args.only)
        if args.list:
            for item in items:
                print(f"{item.name:18} ≈{item.approx_gb:4.1f} GB  {item.repo_id:45} {item.purpose}")
            return 0
        if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
            raise DownloadError("HF_HUB_OFFLINE is set: run with HF_HUB_OFFLINE=0 to download")
        total = 0
        for item in items:
            total += folder_size(download(item, args.dest, force=args.force))
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(items)} model(s), {total / 1024**3:.1f} GiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
