"""Two concepts in one run: does each trigger bring its own subject, and do repeats fix an imbalance?

The toy world's two held-out shapes (the mini-world base model has drawn neither) go into one zip as two kohya
concept folders, ``<repeats>_TOK star/`` (renders of a red star) and ``<repeats>_HRT heart/`` (renders of a blue
heart), each with sidecar captions naming its trigger ("a photo of a red TOK on a grey background"). Each
configuration runs ``train()`` (zip in, tar out, ``token_string="TOK,HRT"``) with the inputs of
``bench/subject_fidelity.py``, but 300 steps without warmup (as its table in bench/README.md was measured); the
predictor (``SDXL_MODEL=mini-world``) then generates "a photo of TOK" and "a photo of HRT" from each tar, and the toy
world's evaluator reads the shapes back:

* subject fidelity per trigger: TOK images read as a star, HRT images read as a heart;
* cross-talk: TOK images read as a heart, HRT images read as a star.

    .venv/bin/python bench/two_concepts.py                     # three configurations, 300 steps, 24 probes
    .venv/bin/python bench/two_concepts.py --only balanced --probes 8
    .venv/bin/python bench/two_concepts.py --set lora_lr=3e-4 --set ti_lr=1e-3   # other train() inputs for every run
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.subject_fidelity import (COMMON, Sampling, add_run_arguments, predictor_generator,  # noqa: E402
                                    settings_suffix)  # (importing it sets SDXL_MODEL etc.)

import torch  # noqa: E402

from pti.formats.export import TRAINING_CONFIG_FILE  # noqa: E402
from pti.toyworld.evaluator import load_evaluator, read  # noqa: E402
from pti.toyworld.fidelity import ConceptUpload, Subject, write_concepts_archive  # noqa: E402
from pti.toyworld.world import name_caption  # noqa: E402

STEPS = 300  # the budget its bench/README.md table was measured with
NO_WARMUP = {"lr_warmup_steps": 0}

STAR = Subject(shape="star", colour="red", trigger="TOK")
HEART = Subject(shape="heart", colour="blue", trigger="HRT")
TOKEN_STRING = f"{STAR.trigger},{HEART.trigger}"


@dataclass(frozen=True)
class Config:
    name: str
    star: ConceptUpload
    heart: ConceptUpload

    @property
    def what(self) -> str:
        return f"`{self.star.folder}/` x{self.star.count}, `{self.heart.folder}/` x{self.heart.count}"


CONFIGS = (
    Config("balanced", ConceptUpload(STAR, 10, "star"), ConceptUpload(HEART, 10, "heart")),
    Config("imbalanced", ConceptUpload(STAR, 10, "star"), ConceptUpload(HEART, 3, "heart")),
    Config("imbalanced_repeats", ConceptUpload(STAR, 10, "star"), ConceptUpload(HEART, 3, "heart", repeats=3)),
)


@dataclass(frozen=True)
class Readout:
    """Shares of one trigger's images the evaluator reads as each subject shape."""

    star: float
    heart: float


def shape_shares(evaluator, generate, trigger: str, count: int, seed: int) -> Readout:
    images = generate([name_caption(trigger)] * count, seed)
    shapes = [reading.shape for reading in read(evaluator, images)]
    return Readout(star=shapes.count(STAR.shape) / count, heart=shapes.count(HEART.shape) / count)


def samples_per_epoch(tar: Path) -> str:
    """``star:heart`` samples per epoch, as the run recorded them in its training_config.json."""
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if Path(m.name).name == TRAINING_CONFIG_FILE)
        config = json.load(archive.extractfile(member))
    concepts = config["concepts"]
    return ":".join(str(concepts[trigger]["samples_per_epoch"]) for trigger in (STAR.trigger, HEART.trigger))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=STEPS)
    parser.add_argument("--probes", type=int, default=24, help="images per trigger and model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import train
    from predict import Predictor

    evaluator = load_evaluator()
    predictor = Predictor()
    predictor.setup()
    sampling = Sampling()

    def measure(weights: str | None) -> tuple[Readout, Readout]:
        generate = predictor_generator(predictor, weights, sampling)
        return (shape_shares(evaluator, generate, STAR.trigger, args.probes, seed=100),
                shape_shares(evaluator, generate, HEART.trigger, args.probes, seed=200))

    rows = [("base model (floor)", "", "", measure(None), 0.0)]
    work = Path(tempfile.mkdtemp(prefix="two-concepts-"))
    for config in CONFIGS:
        if args.only and config.name not in args.only:
            continue
        archive = write_concepts_archive((config.star, config.heart), work / f"{config.name}.zip")
        started = time.perf_counter()
        tar = train.train(input_images=archive, seed=0, max_train_steps=args.steps, token_string=TOKEN_STRING,
                          **{**COMMON, **NO_WARMUP, **dict(args.set)}).weights
        seconds = time.perf_counter() - started
        print(f"{config.name}: trained in {seconds:.0f} s", flush=True)
        rows.append((config.name, config.what, samples_per_epoch(Path(tar)), measure(str(tar)), seconds))

    print(f"\nstar in {STAR.colour}, heart in {HEART.colour}, both on {', '.join(STAR.train_backgrounds)}; "
          f"token_string={TOKEN_STRING}; {args.steps} steps, batch {COMMON['train_batch_size']}; {args.probes} images "
          f"per trigger; sampling {sampling.steps} Euler steps, guidance {sampling.guidance}, "
          f"lora_scale {sampling.lora_scale}" + settings_suffix(args.set) + "\n")
    print("| configuration | upload | samples/epoch TOK:HRT | TOK → star | HRT → heart | TOK → heart (cross-talk) "
          "| HRT → star (cross-talk) | train s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, what, samples, (tok, hrt), seconds in rows:
        print(f"| {name} | {what} | {samples} | {tok.star:.2f} | {hrt.heart:.2f} | {tok.heart:.2f} "
              f"| {hrt.star:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
