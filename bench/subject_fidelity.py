"""Does training teach the model a subject? The toy world's DreamBooth measures, through the public entry points.

A held-out shape (the base mini-world model has never drawn it), ~10 renders in one colour on a few backgrounds,
zipped with sidecar captions, goes through ``train()`` (zip in, tar out) for each configuration below with the same
step budget; the predictor (``SDXL_MODEL=mini-world``) then generates from each tar, and the toy world's evaluator
reads the images back:

* subject fidelity: "a photo of TOK" images read as the new shape;
* training captions: the training images' own captions, shape only (far above subject fidelity: the subject was
  learned but bound to the context it was shown in);
* prompt fidelity: "a photo of a <colour> TOK on a <background> background", colours and backgrounds never in the
  training images: shape, colour and background all as asked;
* prior: known-shape prompts read correctly, base model vs the trained weights loaded (the drop is the drift);
* leak: known-shape prompts read as the subject's shape (where the drift goes).

Every configuration trains with the product's defaults (1000 steps, 100 warmup steps, its learning rates) except
what a 64 px world needs (resolution 64, no captioning model, no salience crop).

    .venv/bin/python bench/subject_fidelity.py                    # every configuration, 1000 steps
    .venv/bin/python bench/subject_fidelity.py --steps 300 --only pivotal lora_rare_word
    .venv/bin/python bench/subject_fidelity.py --only pivotal --set lora_lr=3e-4 --set ti_lr=1e-3   # a variant
    .venv/bin/python bench/subject_fidelity.py --shape heart      # the other held-out shape
    .venv/bin/python bench/subject_fidelity.py --score /tmp/cog-sdxl-train-*/trained_model.tar --guidance 7.5  # re-read
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
os.environ["SDXL_MODEL"] = "mini-world"
os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")  # trained tars by path (local use)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pti.toyworld.evaluator import accuracy_on_renders, load_evaluator  # noqa: E402
from pti.toyworld.fidelity import (  # noqa: E402
    Subject,
    confused_shape,
    misses,
    passed_by,
    passed_share,
    prior_probes,
    prompt_probes,
    read_probes,
    shape_share,
    subject_probes,
    training_caption_probes,
    write_class_archive,
    write_training_archive,
)
from pti.toyworld.world import BACKGROUND_NAMES, HELD_OUT_SHAPES, KNOWN_SHAPES  # noqa: E402

# train() inputs shared by every configuration: the product's defaults, except what a 64 px toy world needs
COMMON = dict(resolution=64, train_batch_size=4, captioning_model="", crop_based_on_salience=False,
              validation_prompts="", verbose=False, checkpointing_steps=999999)
DEFAULT_STEPS = 1000  # train()'s max_train_steps default


CLASS_DRAWINGS = 40  # class images of pivotal_prior_drawn


@dataclass(frozen=True)
class Config:
    name: str
    what: str
    inputs: dict = field(default_factory=dict)
    # class_images drawn by the base model: "known" for assorted known-shape captions, "confused" for captions of one
    # known shape (the one it draws most for "a photo of TOK", or --class-shape)
    class_drawings: Literal["known", "confused"] | None = None


CONFIGS = (
    Config("pivotal", "pivotal tuning (default: new tokens train for the first half, LoRA throughout)"),
    Config("lora_rare_word", "LoRA only, rare existing token `z` (one frozen new row = its embedding)",
           dict(ti_frac=0.0, num_new_tokens=1, token_init_word="z")),
    Config("embeddings_only", "embeddings only (textual inversion: LoRA learning rate 0)",
           dict(lora_lr=0.0, ti_frac=1.0)),
    Config("pivotal_prior", "pivotal tuning + prior preservation (10 class images the base model drew for its "
           "class_prompt 'a photo of a red circle on a grey background')",
           dict(class_prompt="a photo of a red circle on a grey background", num_class_images=10)),
    Config("pivotal_prior_drawn", f"pivotal tuning + prior preservation ({CLASS_DRAWINGS} class images the base model "
           "drew for assorted known-shape captions, uploaded with those captions: the DreamBooth paper's recipe)",
           dict(class_prompt="a photo of a shape"), class_drawings="known"),
    Config("pivotal_prior_confused", f"pivotal tuning + prior preservation ({CLASS_DRAWINGS} class images the base "
           "model drew for captions of the known shape it draws most for 'a photo of TOK': the class the new token "
           "starts as, in assorted colours and backgrounds)", dict(class_prompt="a photo of a shape"),
           class_drawings="confused"),
    Config("pivotal_prodigy", "pivotal tuning, Prodigy optimizer (learning rates found automatically)",
           dict(optimizer="prodigy")),
    Config("pivotal_text_encoder", "pivotal tuning + text-encoder LoRA (train_text_encoder, its defaults)",
           dict(train_text_encoder=True)),
    Config("text_encoder_lora", "text-encoder LoRA instead of pivotal tuning (ti_frac=0, train_text_encoder)",
           dict(ti_frac=0.0, train_text_encoder=True)),
    Config("full_finetune", "full UNet fine-tune instead of the LoRA (is_lora=false, unet_learning_rate 1e-4): the "
           "most the UNet can take from the images", dict(is_lora=False, unet_learning_rate=1e-4)),
)


@dataclass(frozen=True)
class Sampling:
    steps: int = 20
    guidance: float = 5.0
    lora_scale: float = 1.0


def predictor_generator(predictor, weights: str | None, sampling: Sampling):
    """prompts, seed → images, one ``predict()`` call per prompt as a client would make it."""
    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        from predict import default_inputs

        images = []
        for index, prompt in enumerate(prompts):
            (path,) = predictor.predict(**{
                **default_inputs(), "prompt": prompt, "width": 64, "height": 64, "scheduler": "K_EULER",
                "num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance, "seed": seed + index,
                "apply_watermark": False, "lora_scale": sampling.lora_scale, "replicate_weights": weights,
                "disable_safety_checker": True, "output_format": "png"})
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images
    return generate


def train_input(assignment: str) -> tuple[str, object]:
    """``name=value`` → a train() input; the value is read as JSON (numbers, true/false) or else kept as text."""
    name, sep, text = assignment.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set takes name=value, got {assignment!r}")
    try:
        return name, json.loads(text)
    except json.JSONDecodeError:
        return name, text


def add_run_arguments(parser: argparse.ArgumentParser, steps: int = DEFAULT_STEPS) -> None:
    """The options every toy-world benchmark takes: step budget, which configurations, threads, extra train() inputs."""
    parser.add_argument("--steps", type=int, default=steps, help="training steps of every configuration")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core machine)")
    parser.add_argument("--set", type=train_input, action="append", default=[], metavar="NAME=VALUE",
                        help="a train() input for every configuration run (after the configuration's own)")


def settings_suffix(assignments: list[tuple[str, object]]) -> str:
    """``; name=value`` for each ``--set``, for the line above a table."""
    return "".join(f"; {name}={value}" for name, value in assignments)


TRAINING_ONLY_OPTIONS = ("steps", "only", "set", "name_only_captions", "colourless_captions")


def refuse_training_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--score reads tars already trained: an option that only shapes training would be silently ignored."""
    given = [name for name in TRAINING_ONLY_OPTIONS if getattr(args, name) != parser.get_default(name)]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"--score reads tars already trained; {options} only shape training, so leave them out")
    missing = [str(tar) for tar in args.score if not tar.is_file()]
    if missing:
        parser.error(f"--score: no such tar: {', '.join(missing)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--shape", choices=HELD_OUT_SHAPES, default=HELD_OUT_SHAPES[0],
                        help="the held-out shape to teach (trained in red on grey, beige and sky)")
    parser.add_argument("--base-model", type=Path, help="a mini-world folder built elsewhere (scripts/"
                        "build_mini_world.py --out, e.g. with --unet-channels) instead of the committed one")
    parser.add_argument("--class-shape", choices=KNOWN_SHAPES, help="the class of pivotal_prior_confused's class "
                        "images (default: the known shape the base model draws most for 'a photo of TOK')")
    parser.add_argument("--images", type=int, default=10, help="training images of the subject")
    parser.add_argument("--backgrounds", nargs="+", choices=BACKGROUND_NAMES, default=Subject.train_backgrounds,
                        metavar="BACKGROUND", help="the training images' backgrounds (default: %(default)s, all lighter "
                        "than the red subject); the prompt probes use the others. One of "
                        + ", ".join(BACKGROUND_NAMES))
    parser.add_argument("--name-only-captions", type=int, default=0, metavar="N", help="caption the first N "
                        "training images 'a photo of TOK' alone (DreamBooth's instance prompt); the others name colour "
                        "and background")
    parser.add_argument("--colourless-captions", type=int, default=0, metavar="N", help="caption the next N "
                        "training images without their colour ('a photo of a TOK on a grey background')")
    parser.add_argument("--lora-scale", type=float, default=Sampling.lora_scale, help="the predictor's lora_scale "
                        "(its own default is 0.6; bench/README.md compares)")
    parser.add_argument("--guidance", type=float, default=Sampling.guidance, help="the predictor's guidance_scale")
    parser.add_argument("--score", type=Path, nargs="+", metavar="TAR", help="read back these trained tars (from "
                        "earlier runs: each run's log names its tar) instead of training: other sampling settings "
                        "on the same weights")
    parser.add_argument("--probes", type=int, default=32, help="images per measure (subject, prompt, training)")
    parser.add_argument("--prior-probes", type=int, default=96, help="known-shape images per measure (drift and "
                        "leak: the drift goal is 5 points)")
    args = parser.parse_args()
    if set(args.backgrounds) >= set(BACKGROUND_NAMES):
        parser.error("--backgrounds: leave at least one background out for the prompt probes")
    if args.score:
        refuse_training_options(parser, args)
    torch.set_num_threads(args.threads)
    if args.base_model:
        os.environ["SDXL_MODEL"] = str(args.base_model.resolve())
        for helper in ("SDXL_REFINER_MODEL", "SAFETY_CHECKER_MODEL", "FEATURE_EXTRACTOR_MODEL"):
            os.environ.setdefault(helper, "tiny")  # as with mini-world: nothing here can download the real ones

    import train
    from predict import Predictor

    subject = Subject(shape=args.shape, train_backgrounds=tuple(dict.fromkeys(args.backgrounds)))
    evaluator = load_evaluator()
    renders = accuracy_on_renders(evaluator)
    probes = {"subject": subject_probes(subject, args.probes), "prompt": prompt_probes(subject, args.probes, seed=1),
              "prior": prior_probes(args.prior_probes, seed=2),
              "training": training_caption_probes(subject, args.probes, images=args.images)}
    predictor = Predictor()
    predictor.setup()
    sampling = Sampling(guidance=args.guidance, lora_scale=args.lora_scale)

    def read_all(weights: str | None) -> dict[str, list]:
        generate = predictor_generator(predictor, weights, sampling)
        return {name: read_probes(evaluator, generate, ps, seed=100 + k) for k, (name, ps) in enumerate(probes.items())}

    def rates(readings: dict[str, list]) -> dict[str, float]:
        return {**{name: passed_share(probes[name], r) for name, r in readings.items()},
                "leak": shape_share(readings["prior"], subject.shape)}

    base_readings = read_all(None)
    rows = [("base model", "base model (floor)", base_readings, 0.0)]
    class_shape = args.class_shape  # pivotal_prior_confused's class, read from the base model's drawings when asked
    for tar in args.score or ():
        rows.append((str(tar), f"scored: {tar}", read_all(str(tar.resolve())), 0.0))
    configs = [] if args.score else [c for c in CONFIGS if not args.only or c.name in args.only]
    if configs:
        work = Path(tempfile.mkdtemp(prefix="subject-fidelity-"))
        archive = write_training_archive(subject, work / "subject.zip", count=args.images,
                                         name_only=args.name_only_captions, colourless=args.colourless_captions)
    for config in configs:
        inputs = {**COMMON, **config.inputs, **dict(args.set)}
        if config.class_drawings == "confused":
            class_shape = class_shape or confused_shape(base_readings["subject"])
        if config.class_drawings:
            shapes = (class_shape,) if config.class_drawings == "confused" else KNOWN_SHAPES
            inputs["class_images"] = write_class_archive(predictor_generator(predictor, None, sampling),
                                                         work / f"class-{config.name}.zip", CLASS_DRAWINGS, seed=3,
                                                         shapes=shapes)
        started = time.perf_counter()
        tar = train.train(input_images=archive, seed=0, max_train_steps=args.steps,
                          token_string=subject.trigger, **inputs).weights
        seconds = time.perf_counter() - started
        rows.append((config.name, f"{config.name}: {config.what}", read_all(str(tar)), seconds))
        print(f"{config.name}: trained in {seconds:.0f} s, {tar}", flush=True)

    base_prior = rates(base_readings)["prior"]
    print(f"\nbase model: {os.environ['SDXL_MODEL']}")
    print(f"evaluator on 1000 fresh renders: shape {renders['shape']:.3f}, colour {renders['colour']:.3f}, "
          f"background {renders['background']:.3f}")
    captions = ("captions and steps as each tar was trained" if args.score else
                f"{args.name_only_captions} captioned 'a photo of {subject.trigger}' alone, "
                f"{args.colourless_captions} without their colour; {args.steps} steps")
    print(f"subject: {subject.shape} in {subject.colour} on {', '.join(subject.train_backgrounds)}; {args.images} "
          f"images ({captions}), "
          f"batch {COMMON['train_batch_size']}; {args.probes} images per measure, "
          f"{args.prior_probes} for prior and leak; "
          f"sampling {sampling.steps} Euler steps, guidance {sampling.guidance}, lora_scale {sampling.lora_scale}"
          + settings_suffix(args.set))
    if class_shape:
        drawn_as_class = shape_share(base_readings["subject"], class_shape)
        print(f"pivotal_prior_confused's class: {class_shape}" + (" (--class-shape)" if args.class_shape else "")
              + f"; the base model draws 'a photo of {subject.trigger}' as a {class_shape} in {drawn_as_class:.2f} "
              "of images")
    print()
    print("| configuration | subject fidelity | prompt fidelity | training captions | prior (known shapes) "
          f"| drift (points) | known shapes drawn as {subject.shape} | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _, name, readings, seconds in rows:
        row = rates(readings)
        drift = 100 * (base_prior - row["prior"])
        print(f"| {name} | {row['subject']:.2f} | {row['prompt']:.2f} | {row['training']:.2f} "
              f"| {row['prior']:.2f} | {drift:+.1f} | {row['leak']:.2f} | {seconds:.0f} |")
    print("\nWhere the subject and prompt probes miss, head by head (the shapes drawn instead):")
    for label, _, readings, _ in rows:
        print(f"- {label}: subject {misses(probes['subject'], readings['subject']).describe()}; "
              f"prompt {misses(probes['prompt'], readings['prompt']).describe()}")
        by = {attribute: ", ".join(f"{value} {passed}/{asked}" for value, (passed, asked)
                                   in passed_by(probes["prompt"], readings["prompt"], attribute).items())
              for attribute in ("colour", "background")}
        print(f"  prompt probes passed by asked colour: {by['colour']}; by background: {by['background']}")


if __name__ == "__main__":
    main()
