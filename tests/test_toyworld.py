"""The toy world: deterministic renders and captions, an evaluator that reads them, and a mini SDXL that draws them."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from pti.toyworld.evaluator import EVALUATOR_PATH, accuracy_on_renders, load_evaluator  # noqa: E402
from pti.toyworld.paths import MINI_WORLD_DIR  # noqa: E402
from pti.toyworld.pretrain import load_pipeline  # noqa: E402
from pti.toyworld.sample import generate, score  # noqa: E402
from pti.toyworld.world import (BACKGROUND_NAMES, COLOUR_NAMES, HELD_OUT_SHAPES, KNOWN_SHAPES, SHAPES,  # noqa: E402
                                VOCABULARY, Scene, caption, compatible, render, sample_scene, scenes)


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()  # float32: the committed files are float16


def test_renders_are_deterministic_and_seeds_differ():
    first = list(scenes(7, 20, shapes=SHAPES))
    assert first == list(scenes(7, 20, shapes=SHAPES))
    assert first != list(scenes(8, 20, shapes=SHAPES))
    assert all(render(s).tobytes() == render(s).tobytes() for s in first[:5])
    assert render(first[0]).size == (64, 64) and render(first[0]).mode == "RGB"


def test_caption_says_what_the_scene_holds():
    for scene in scenes(3, 50, shapes=SHAPES):
        assert caption(scene) == f"a photo of a {scene.colour} {scene.shape} on a {scene.background} background"
        assert caption(scene, shape_word="<s0><s1>").count("<s0><s1>") == 1
        words = caption(scene, layout=True).split()
        assert {scene.shape, scene.colour, scene.background} <= set(words)
        assert ("small" in words) != ("large" in words)
        assert caption(scene, colour=False) == f"a photo of a {scene.shape} on a {scene.background} background"
    with pytest.raises(ValueError, match="no layout form"):
        caption(scene, layout=True, colour=False)


def test_render_paints_the_named_colours():
    scene = Scene(shape="square", colour="red", background="sky", x=0.5, y=0.5, radius=0.3)
    image = render(scene)
    assert image.getpixel((32, 32)) == (215, 35, 35)
    assert image.getpixel((1, 1)) == (140, 190, 235)


def test_sampling_respects_word_lists_and_never_hides_the_object():
    rng = random.Random(0)
    drawn = [sample_scene(rng) for _ in range(500)]
    assert {s.shape for s in drawn} == set(KNOWN_SHAPES)
    assert not set(HELD_OUT_SHAPES) & {s.shape for s in drawn}
    assert all(compatible(s.colour, s.background) for s in drawn)
    assert {s.colour for s in drawn} == set(COLOUR_NAMES) and {s.background for s in drawn} == set(BACKGROUND_NAMES)
    with pytest.raises(ValueError):
        sample_scene(rng, colours=["white"], backgrounds=["pink"])


def test_evaluator_reads_fresh_renders(evaluator):
    assert EVALUATOR_PATH.stat().st_size < 1_000_000
    accuracy = accuracy_on_renders(evaluator, count=300)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_the_committed_tokenizers_are_what_the_build_writes(tmp_path):
    """The rebuild script reproduces the committed vocabulary and tokenization of every world word."""
    from transformers import CLIPTokenizer

    from pti.toyworld.pretrain import write_tokenizers

    write_tokenizers(tmp_path)
    for name in ("tokenizer", "tokenizer_2"):
        written = CLIPTokenizer.from_pretrained(tmp_path / name)
        committed = CLIPTokenizer.from_pretrained(MINI_WORLD_DIR / name)
        assert written.get_vocab() == committed.get_vocab()
        for word in VOCABULARY:
            assert written(word).input_ids == committed(word).input_ids


def test_mini_world_draws_what_the_caption_says(pipe, evaluator):
    """Measured on the committed weights (torch 2.13 CPU, AMD EPYC): shape 14/16, colour 16/16, background 16/16 read
    back as asked (chance: 2/16, 2/16, 3/16). Thresholds leave 3 images of margin for other CPUs' float noise."""
    expected = [Scene(shape=shape, colour=colour, background=background)
                for shape, colour, background in (("square", "red", "grey"), ("circle", "yellow", "teal"),
                                                  ("triangle", "blue", "beige"), ("cross", "white", "brown"))] * 4
    images = generate(pipe, [caption(s) for s in expected], seed=0, steps=20, guidance=3.0)
    result = score(evaluator, images, expected)
    assert all(image.size == (64, 64) for image in images)
    assert result.accuracy["background"] >= 13 / 16, result
    assert result.accuracy["colour"] >= 13 / 16, result
    assert result.accuracy["shape"] >= 11 / 16, result


def test_build_record_is_committed():
    record = json.loads((MINI_WORLD_DIR / "BUILD.json").read_text())
    known = record["generation_accuracy"]["known"]
    assert known["count"] > 0 and all(0.0 <= known[head] <= 1.0 for head in ("shape", "colour", "background"))
    assert record["torch"] and record["seed"] == 0 and record["threads"] == 1
    assert 0 < record["build_seconds"] <= 60 * 60, "the committed weights come from one run of the build script"
    assert set(record["generation_accuracy"]) == {"known", "known_empty_negative", "known_name_only", "held_out"}


@pytest.mark.parametrize("negative_prompt", [None, ""], ids=["zeros", "encoded-empty"])
def test_an_unseen_word_keeps_the_asked_colour_and_background(pipe, evaluator, negative_prompt):
    """The pretraining puts random unseen words in the noun slot of some captions and drops captions to both forms of
    the unconditional branch, so a trigger word the model never saw ("TOK", before any training) still gets the
    colour and background the prompt asks for, whatever the client sends as the empty negative prompt. The first
    mini-world model lost the colour here (0.66 of 32 images with the encoded empty prompt). Measured on the committed
    weights: 8/8 colour and 8/8 background in both modes."""
    expected = [Scene(shape="star", colour=colour, background=background)
                for colour, background in (("blue", "pink"), ("yellow", "teal"), ("white", "brown"), ("green", "beige"))] * 2
    images = generate(pipe, [caption(s, shape_word="TOK") for s in expected], seed=0, steps=20, guidance=5.0,
                      negative_prompt=negative_prompt)
    result = score(evaluator, images, expected)
    assert result.accuracy["colour"] >= 6 / 8, result
    assert result.accuracy["background"] >= 6 / 8, result


def test_pretraining_captions_hold_unknown_nouns_and_both_dropped_forms():
    from pti.toyworld.pretrain import DiffusionSettings, training_caption

    rng = random.Random(0)
    scene = Scene("square", "red", "grey")
    captions = [training_caption(scene, rng, DiffusionSettings()) for _ in range(4000)]
    dropped_zero, dropped_empty = captions.count(None), captions.count("")
    nouns = [c.split(" on ")[0].split()[-1] for c in captions if c]
    unknown = [n for n in nouns if n not in VOCABULARY]
    assert 150 <= dropped_zero <= 250 and 150 <= dropped_empty <= 250  # 10 % dropped, half each: 200 expected
    assert 0.07 <= len(unknown) / len(nouns) <= 0.13 and len(set(unknown)) > 100  # 10 % unknown, many different
    assert all(n == "square" for n in nouns if n in VOCABULARY)


def test_name_only_captions_come_at_their_share_and_never_in_the_committed_recipe():
    """``name_only_caption`` (the subject probe's form, "a photo of (a) square"): off by default, so the committed
    recipe's caption stream is unchanged; at 0.15 that share of captions names the shape alone, half with "a"."""
    from pti.toyworld.pretrain import DiffusionSettings, default_stages, training_caption

    scene = Scene("square", "red", "grey")
    name_only = {"a photo of a square", "a photo of square"}
    rng = random.Random(0)
    default = [training_caption(scene, rng, DiffusionSettings()) for _ in range(4000)]
    assert not name_only & set(default)
    assert all(stage.settings.name_only_caption == 0 for stage in default_stages())
    rng = random.Random(0)
    captions = [training_caption(scene, rng, DiffusionSettings(name_only_caption=0.15)) for _ in range(4000)]
    with_a, without_a = captions.count("a photo of a square"), captions.count("a photo of square")
    assert 0.12 <= (with_a + without_a) / 4000 <= 0.18 and abs(with_a - without_a) < 100  # 600 expected, 300 each


def test_a_two_concept_upload_gives_each_render_its_folders_trigger_and_repeats(tmp_path):
    """bench/two_concepts.py's upload, read by the product's preprocessing: star renders train as TOK once per
    epoch, heart renders as HRT three times, each caption naming its own trigger."""
    import csv

    import preprocess
    from pti.toyworld.fidelity import ConceptUpload, Subject, write_concepts_archive

    star, heart = Subject("star", "red", trigger="TOK"), Subject("heart", "blue", trigger="HRT")
    archive = write_concepts_archive((ConceptUpload(star, 2, "star"), ConceptUpload(heart, 2, "heart", repeats=3)),
                                     tmp_path / "two.zip")
    dataset = preprocess.preprocess(archive, tmp_path / "dataset", preprocess.PreprocessSettings(
        resolution=64, token_string="TOK", trigger_words=("HRT",), caption_prefix="a photo of TOK, ",
        captioning_model=None, crop_based_on_salience=False, device="cpu"))
    with (dataset / "captions.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    seen = sorted((row["concept"], row["repeats"], " ".join(row["caption"].split()[4:6])) for row in rows)
    assert seen == [("HRT", "3", "blue HRT")] * 2 + [("TOK", "1", "red TOK")] * 2


def test_training_caption_probes_ask_for_exactly_the_uploaded_captions(tmp_path):
    """bench/subject_fidelity.py's 'training captions' column prompts with the captions of the uploaded images, in
    turn, and checks only the shape."""
    import zipfile

    from pti.toyworld.fidelity import Subject, training_caption_probes, write_training_archive

    subject = Subject()
    with zipfile.ZipFile(write_training_archive(subject, tmp_path / "subject.zip", count=4)) as archive:
        uploaded = [archive.read(name).decode() for name in sorted(archive.namelist()) if name.endswith(".txt")]
    probes = training_caption_probes(subject, 6, images=4)
    assert [p.prompt for p in probes] == uploaded + uploaded[:2]
    assert all(p.checks == ("shape",) and p.expected.shape == subject.shape for p in probes)


def test_caption_forms_of_the_training_archive_and_out_of_range_writes_nothing(tmp_path):
    """bench/subject_fidelity.py --name-only-captions N --colourless-captions M: the first N images are captioned
    with the trigger alone (the subject probe's form), the next M without their colour, the rest name colour and
    background; the images are the same renders either way."""
    import zipfile

    from pti.toyworld.fidelity import Subject, write_training_archive

    subject = Subject()

    def uploaded(path):
        with zipfile.ZipFile(path) as archive:
            names = sorted(archive.namelist())
            return ([archive.read(n).decode() for n in names if n.endswith(".txt")],
                    [archive.read(n) for n in names if n.endswith(".png")])

    full_captions, full_images = uploaded(write_training_archive(subject, tmp_path / "full.zip", count=4))
    captions, images = uploaded(write_training_archive(subject, tmp_path / "mixed.zip", count=4, name_only=2,
                                                       colourless=1))
    assert captions[:2] == ["a photo of TOK"] * 2
    assert captions[2] == full_captions[2].replace(f"{subject.colour} ", "")
    assert captions[2].startswith("a photo of a TOK on a ") and subject.colour not in captions[2]
    assert captions[3] == full_captions[3]
    assert all(subject.colour in text and "background" in text for text in full_captions)
    assert images == full_images
    for name_only, colourless in ((5, 0), (2, 3), (-1, 0)):
        with pytest.raises(ValueError, match="must fit in the 4 images"):
            write_training_archive(subject, tmp_path / "bad.zip", count=4, name_only=name_only, colourless=colourless)
    assert not (tmp_path / "bad.zip").exists()


def test_drawn_class_images_keep_their_own_captions_through_class_preprocessing(tmp_path, pipe):
    """Prior preservation's class upload (bench/subject_fidelity.py's pivotal_prior_drawn): the base model's own
    drawings of known-shape captions, each trained with its caption rather than class_prompt."""
    import csv
    import zipfile

    import preprocess
    from pti.toyworld.fidelity import write_class_archive

    drawn = []

    def draw(prompts, seed):
        drawn.extend(prompts)
        return generate(pipe, prompts, seed, steps=2)

    archive = write_class_archive(draw, tmp_path / "class.zip", count=3, seed=5)
    with zipfile.ZipFile(archive) as opened:
        assert sorted(n.rsplit(".", 1)[1] for n in opened.namelist()) == ["png"] * 3 + ["txt"] * 3
    assert all(caption_shape in KNOWN_SHAPES for caption_shape in (p.split()[5] for p in drawn))
    dataset = preprocess.preprocess(archive, tmp_path / "class", preprocess.PreprocessSettings(
        resolution=64, token_string="", class_images=True, caption_prefix="a photo of a shape",
        captioning_model=None, crop_based_on_salience=False, device="cpu"))
    with (dataset / "captions.csv").open(newline="", encoding="utf-8") as handle:
        assert sorted(row["caption"] for row in csv.DictReader(handle)) == sorted(drawn)


def test_leak_counts_known_shape_prompts_drawn_as_the_subject(evaluator):
    """bench/subject_fidelity.py's leak column: known-shape prompts whose image shows the subject's shape instead.
    A generator that draws every third prompt as a heart fails those probes and leaks exactly them (the evaluator
    reads fresh renders right, test_evaluator_reads_fresh_renders)."""
    from pti.toyworld.fidelity import passed_share, prior_probes, read_probes, shape_share

    probes = prior_probes(9, seed=4)

    def draw(prompts, seed):
        return [render(Scene("heart" if k % 3 == 0 else p.expected.shape, p.expected.colour, p.expected.background))
                for k, p in enumerate(probes)]

    readings = read_probes(evaluator, draw, probes, seed=0)
    assert shape_share(readings, "heart") == pytest.approx(3 / 9)
    assert passed_share(probes, readings) == pytest.approx(6 / 9)
    assert shape_share(readings, "star") == 0


def test_confused_shape_is_the_known_shape_read_most_often(evaluator):
    """bench/subject_fidelity.py's pivotal_prior_confused: the class of its class images is the known shape the base
    model draws most for "a photo of TOK". Held-out shapes never count (their drawings are the subject, not a class
    to preserve); a tie goes to the first name in sorted order, so the choice is the same on every machine."""
    from pti.toyworld.evaluator import read
    from pti.toyworld.fidelity import confused_shape

    def drawings(*shapes):
        return read(evaluator, [render(Scene(shape, "blue", "grey")) for shape in shapes])

    assert confused_shape(drawings("cross", "heart", "heart", "heart", "circle", "cross")) == "cross"
    assert confused_shape(drawings("square", "circle", "heart")) == "circle"
    with pytest.raises(ValueError, match="no known shape"):
        confused_shape(drawings("heart", "star"))


def test_class_archive_draws_only_the_asked_known_shapes(tmp_path):
    """Class images of one class (the confused shape) in assorted colours and backgrounds; a held-out shape is refused
    before anything is drawn or written."""
    import zipfile

    from pti.toyworld.fidelity import write_class_archive

    asked = []

    def draw(prompts, seed):
        asked.extend(prompts)
        return [render(Scene("cross", "red", "grey")) for _ in prompts]

    archive = write_class_archive(draw, tmp_path / "class.zip", count=12, seed=1, shapes=("cross",))
    assert all(" cross " in prompt for prompt in asked) and len(asked) == 12
    assert len({prompt for prompt in asked}) > 3, "colours and backgrounds vary"
    with zipfile.ZipFile(archive) as opened:
        assert len(opened.namelist()) == 24
    asked.clear()
    with pytest.raises(ValueError, match="known shapes"):
        write_class_archive(draw, tmp_path / "held_out.zip", count=2, shapes=("heart",))
    assert not asked and not (tmp_path / "held_out.zip").exists()


def test_a_rebuilt_world_of_another_width_loads_as_a_base_model_folder(tmp_path):
    """scripts/build_mini_world.py --unet-channels --out: a few steps of the real recipe at another UNet width, saved
    as the committed folder is, load through the product's own base-model code (SDXL_MODEL=<folder>) with that width,
    and draw a 64-pixel image. What the wider model learns is measured in bench/README.md, not here."""
    import math

    from pti.models.base_model import load_sdxl_pipeline, pick_runtime
    from pti.toyworld.pretrain import (BuildSettings, DiffusionSettings, DiffusionStage, VaeSettings, pretrain,
                                       save_pipeline)

    settings = BuildSettings(vae=VaeSettings(steps=2, batch_size=2, train_images=8),
                             stages=(DiffusionStage(DiffusionSettings(steps=2, batch_size=2, warmup_steps=1,
                                                                      train_images=8), seed=0),),
                             unet_channels=(32, 64))
    pipe, losses = pretrain(settings, progress=False)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    save_pipeline(pipe, tmp_path / "narrow", half=True)
    loaded = load_sdxl_pipeline(str(tmp_path / "narrow"), pick_runtime("fp32", "cpu"))
    assert tuple(loaded.unet.config.block_out_channels) == (32, 64)
    images = generate(loaded, ["a photo of a red square on a grey background"], seed=0, steps=2)
    assert images[0].size == (64, 64)



def run_subject_fidelity(*arguments: str):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "subject_fidelity.py"
    return subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, named", [(["--steps", "5"], "--steps"), (["--only", "pivotal"], "--only"),
                                          (["--set", "rank=4", "--name-only-captions", "3"],
                                           "--set, --name-only-captions"),
                                          (["--colourless-captions", "2"], "--colourless-captions")])
def test_score_refuses_options_that_only_shape_training(tmp_path, extra, named):
    """bench/subject_fidelity.py --score re-reads trained tars: an option it would silently ignore is refused in one
    line naming it, before any model is loaded."""
    tar = tmp_path / "trained_model.tar"
    tar.write_bytes(b"")
    result = run_subject_fidelity("--score", str(tar), *extra)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"error: --score reads tars already trained; {named} only shape training, so leave them out")


def test_score_refuses_a_missing_tar(tmp_path):
    result = run_subject_fidelity("--score", str(tmp_path / "gone.tar"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"error: --score: no such tar: {tmp_path / 'gone.tar'}")


def test_misses_count_each_wrong_head_and_the_shapes_drawn_instead():
    """bench/subject_fidelity.py's head-by-head line: which check a failed probe missed, and what shape came back."""
    from pti.toyworld.evaluator import Reading
    from pti.toyworld.fidelity import Subject, misses, prompt_probes

    probes = prompt_probes(Subject(), 4, seed=0)

    def reading(probe, **wrong):
        asked = {head: getattr(probe.expected, head) for head in ("shape", "colour", "background")}
        return Reading(**{**asked, **wrong}, confidence={})

    readings = [reading(probes[0]), reading(probes[1], shape="circle"),
                reading(probes[2], shape="circle", colour="red"), reading(probes[3], shape="square")]
    found = misses(probes, readings)
    assert found.by_head == {"shape": 3, "colour": 1, "background": 0}
    assert found.shapes_instead == {"circle": 2, "square": 1}
    assert found.describe() == "missed shape 3 (circle 2, square 1), colour 1, background 0 of 4"
    assert [p.passed(r) for p, r in zip(probes, readings)] == [True, False, False, False]


def test_passed_by_tallies_prompt_probes_per_asked_colour_and_background():
    from pti.toyworld.evaluator import Reading
    from pti.toyworld.fidelity import Probe, passed_by

    def probe(colour, background):
        return Probe(f"a photo of a {colour} TOK on a {background} background", Scene("heart", colour, background),
                     ("shape", "colour", "background"))

    probes = [probe("white", "teal"), probe("black", "pink"), probe("white", "pink")]
    readings = [Reading("circle", "white", "teal", {}), Reading("heart", "black", "pink", {}),
                Reading("heart", "white", "pink", {})]
    assert passed_by(probes, readings, "colour") == {"white": (1, 2), "black": (1, 1)}
    assert list(passed_by(probes, readings, "background").items()) == [("pink", (2, 2)), ("teal", (0, 1))]


def test_backgrounds_must_leave_one_for_the_prompt_probes():
    result = run_subject_fidelity("--backgrounds", *BACKGROUND_NAMES)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: --backgrounds: leave at least one background out for the prompt probes")
