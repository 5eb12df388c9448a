"""Benchmark of the predictor: cold ``setup()``, first load of a trained tar, switching between two adapters already
loaded, returning to the base model, and one prediction; prints a table and the switch / first-load ratio.

    .venv/bin/python bench/predict.py                                   # tiny model, CPU
    .venv/bin/python bench/predict.py --threads 1 --size 256 --steps 10
    SDXL_MODEL=stabilityai/stable-diffusion-xl-base-1.0 python bench/predict.py --size 1024 --steps 30   # on a GPU

The trained tars are written by ``export.write_weight_files`` + ``pack_tar`` with random LoRA tensors (rank
``--rank``) on every attention projection of the loaded UNet and two new tokens, so they fit any base model.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("SDXL_MODEL", "tiny")
os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")  # the benchmark loads its tars by path

import torch  # noqa: E402

from pti.formats import export  # noqa: E402
from pti.formats.lora_formats import UNetLayout  # noqa: E402

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class BenchSettings:
    size: int
    steps: int
    rank: int
    switches: int
    predictions: int
    threads: int | None


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per prediction")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the benchmark tars")
    parser.add_argument("--switches", type=int, default=20, help="A/B switches timed")
    parser.add_argument("--predictions", type=int, default=3, help="predictions timed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    return BenchSettings(args.size, args.steps, args.rank, args.switches, args.predictions, args.threads)


def random_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA tensors for every attention projection of ``unet`` (shapes read from the live modules)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for projection in ATTENTION_PROJECTIONS:
                layer = module.get_submodule(projection)
                key = f"{name}.{projection}"
                state[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.01
                state[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.01
    return state


def write_tar(folder: Path, pipe, rank: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    embeddings = {key: torch.randn(2, encoder.get_input_embeddings().weight.shape[1], generator=generator)
                  for key, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2))}
    out = folder / f"run{seed}"
    export.write_weight_files(out, unet_lora_state=random_lora(pipe.unet, rank, seed), lora_alpha=float(rank),
                              embeddings=embeddings, special_params={"TOK": "<s0><s1>"},
                              training_config={"bench": True}, unet_layout=UNetLayout.from_unet_config(pipe.unet.config))
    return export.pack_tar(out, folder / f"trained_{seed}.tar")


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    os.environ["WEIGHTS_CACHE_DIR"] = str(work / "cache")
    from predict import Predictor

    predictor = Predictor()
    cold_setup = timed(predictor.setup)
    tars = [write_tar(work, predictor.models.txt2img, settings.rank, seed) for seed in (1, 2)]
    first_loads = [timed(lambda t=t: predictor.weights.use(str(t), 0.6)) for t in tars]
    switches = [timed(lambda t=tars[i % 2]: predictor.weights.use(str(t), 0.6)) for i in range(settings.switches)]
    to_base = []
    for _ in range(5):
        predictor.weights.use(str(tars[0]), 0.6)
        to_base.append(timed(lambda: predictor.weights.use(None, 0.6)))
    defaults = {k: p.default.default for k, p in inspect.signature(Predictor.predict).parameters.items() if k != "self"}
    inputs = {**defaults, "prompt": "a photo of TOK", "width": settings.size, "height": settings.size,
              "num_inference_steps": settings.steps, "seed": 0, "replicate_weights": str(tars[0])}
    predictions = [timed(lambda: predictor.predict(**inputs)) for _ in range(settings.predictions)]

    switch = statistics.median(switches)
    first = statistics.median(first_loads)
    rows = [
        ("cold setup()", cold_setup, "base + img2img/inpaint + refiner + safety checker"),
        ("first load of a trained tar", first, "extract to cache, read, inject adapter (median of 2)"),
        ("switch between cached adapters", switch, f"median of {settings.switches}"),
        ("switch from weights to base", statistics.median(to_base), "median of 5"),
        ("one prediction", statistics.median(predictions),
         f"{settings.size}x{settings.size}, {settings.steps} steps, weights active (median of {settings.predictions})"),
    ]
    print(f"model={os.environ['SDXL_MODEL']} device={predictor.models.runtime.device} "
          f"dtype={predictor.models.runtime.dtype} torch_threads={torch.get_num_threads()} rank={settings.rank}")
    print(f"| {'step':32} | {'seconds':>9} | notes")
    print(f"|{'-' * 34}|{'-' * 11}|------")
    for name, seconds, note in rows:
        print(f"| {name:32} | {seconds:9.4f} | {note}")
    print(f"switch / first load = {switch / first:.3f}   switch / cold setup = {switch / cold_setup:.4f}")


if __name__ == "__main__":
    main()
