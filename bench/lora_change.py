"""How far trained weights move the model: per model part, the LoRA's weight changes, and with a text-encoder LoRA,
how much the text encoders' outputs change for prompts that never named the trigger.

For each trained tar (``train()``'s output) it prints one table row per model part of its kohya file
(``trained_model_kohya.safetensors``): modules, median and largest ``|alpha / rank · up @ down|``, and the largest
module's name. With ``--text`` it also loads the tar into the predictor as ``replicate_weights`` would (lora_scale 1)
and encodes ``--prompt``s with and without it: *text change* is the relative change of the two encoders' hidden
states ``|after - before| / |before|``, *pooled cos* the lowest cosine between the pooled embeddings (1: unchanged).

    .venv/bin/python bench/lora_change.py /tmp/cog-sdxl-train-*/trained_model.tar
    .venv/bin/python bench/lora_change.py --text TAR                         # the mini-world base model
    .venv/bin/python bench/lora_change.py --text --base-model /work/wide-world TAR
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402

from pti.formats.lora_change import change_by_part  # noqa: E402

KOHYA_FILE = "trained_model_kohya.safetensors"
# known-shape prompts of the toy world: none names the trigger, so any change is drift in the text encoders
KNOWN_PROMPTS = ("a photo of a blue square on a pink background", "a photo of a green circle on a grey background",
                 "a photo of a yellow cross on a sky background", "a photo of a red triangle on a beige background")


def kohya_state(tar: Path) -> dict:
    """The tar's kohya LoRA file, read without unpacking anything else."""
    with tarfile.open(tar) as archive, tempfile.TemporaryDirectory() as folder:
        try:
            archive.extract(KOHYA_FILE, folder, filter="data")
        except KeyError:
            raise SystemExit(f"{tar}: no {KOHYA_FILE} in the tar (not a train() output?)") from None
        return load_file(Path(folder) / KOHYA_FILE)


def text_change(predictor, tar: Path, prompts: list[str]) -> tuple[float, float]:
    """(relative change of the hidden states, lowest pooled cosine) for ``prompts`` with the tar loaded at scale 1."""
    import torch

    from weights_manager import WeightsChoice

    pipe = predictor.models.txt2img

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return hidden, pooled

    predictor.weights.use_all([])
    before, pooled_before = encode()
    predictor.weights.use_all([WeightsChoice(str(tar.resolve()), 1.0, "bench/lora_change", trusted=True)])
    try:
        after, pooled_after = encode()
    finally:
        predictor.weights.use_all([])
    relative = float((after - before).norm() / before.norm())
    lowest_cos = float(torch.nn.functional.cosine_similarity(pooled_after, pooled_before, dim=-1).min())
    return relative, lowest_cos


def load_predictor(base_model: Path | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
    os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")
    os.environ["SDXL_MODEL"] = str(base_model.resolve()) if base_model else "mini-world"
    for helper in ("SDXL_REFINER_MODEL", "SAFETY_CHECKER_MODEL", "FEATURE_EXTRACTOR_MODEL"):
        os.environ.setdefault(helper, "tiny")  # nothing here can download the real ones
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tars", type=Path, nargs="+", metavar="TAR", help="trained tars (train()'s output)")
    parser.add_argument("--text", action="store_true", help="also measure the text encoders' output change")
    parser.add_argument("--base-model", type=Path, help="the base model folder the tars were trained on (default: "
                        "the committed mini-world)")
    parser.add_argument("--prompt", action="append", help="a prompt for --text (repeatable; default: four "
                        "known-shape prompts of the toy world)")
    args = parser.parse_args()
    missing = [str(tar) for tar in args.tars if not tar.is_file()]
    if missing:
        parser.error(f"no such tar: {', '.join(missing)}")
    if (args.base_model or args.prompt) and not args.text:
        parser.error("--base-model and --prompt are for --text")

    predictor = load_predictor(args.base_model) if args.text else None
    prompts = args.prompt or list(KNOWN_PROMPTS)
    print("| tar | part | modules | median change | largest change | largest module |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for tar in args.tars:
        for part in change_by_part(kohya_state(tar)):
            print(f"| {tar} | {part.part} | {part.modules} | {part.median:.3f} | {part.largest:.3f} "
                  f"| {part.largest_layer} |")
    if predictor is None:
        return
    print(f"\ntext encoders on {len(prompts)} prompts, lora_scale 1:\n")
    print("| tar | text change | pooled cos |")
    print("| --- | ---: | ---: |")
    for tar in args.tars:
        relative, lowest_cos = text_change(predictor, tar, prompts)
        print(f"| {tar} | {relative:.3f} | {lowest_cos:.3f} |")


if __name__ == "__main__":
    main()
