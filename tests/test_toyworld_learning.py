"""The product teaches a subject: on the toy world's pretrained mini SDXL, a short pivotal-tuning run through
``train()`` (zip in, tar out) on renders of a shape the base model has never drawn, then the predictor with that
tar, makes "a photo of TOK" draw that shape, and unloading the tar gives back the base model's answers.

Measured on this machine (AMD EPYC, torch 2.13 CPU; ``pytest tests/test_toyworld_learning.py -s`` prints them):
24 "a photo of TOK" images, 3 of them read as a star by the base model (it draws assorted shapes for a word it never
saw, and the evaluator reads a few as stars), 9 after 300 steps (the evaluator reads the star on 100 % of fresh
renders). The thresholds (at most 5 before, at least 6 after and 3 more than before) leave 2-3 images of margin for
other CPUs' float noise; bench/subject_fidelity.py measures the rest (prompt fidelity, drift, other configurations).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from exactness import assert_images_close

from pti.toyworld.evaluator import load_evaluator, read
from pti.toyworld.fidelity import Subject, pass_rate, prior_probes, subject_probes, write_training_archive

STEPS = 300
PROBES = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SDXL_MODEL", "mini-world")
        import train
        from predict import Predictor

        subject = Subject()
        archive = write_training_archive(subject, tmp_path_factory.mktemp("subject") / "subject.zip", count=10)
        tar = train.train(input_images=archive, seed=0, max_train_steps=STEPS, token_string=subject.trigger,
                          resolution=64, train_batch_size=4, captioning_model="", crop_based_on_salience=False,
                          validation_prompts="", verbose=False, lr_warmup_steps=0).weights
        predictor = Predictor()
        predictor.setup()
        yield subject, str(tar), predictor


def generator(predictor, weights):
    def generate(prompts, seed):
        from predict import default_inputs

        images = []
        for index, prompt in enumerate(prompts):
            (path,) = predictor.predict(**{
                **default_inputs(), "prompt": prompt, "width": 64, "height": 64, "scheduler": "K_EULER",
                "num_inference_steps": 20, "guidance_scale": 5.0, "seed": seed + index, "apply_watermark": False,
                "lora_scale": 1.0, "replicate_weights": weights, "disable_safety_checker": True,
                "output_format": "png"})
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images
    return generate


def test_the_trigger_word_brings_the_new_shape(world):
    subject, tar, predictor = world
    evaluator = load_evaluator()
    probes = subject_probes(subject, PROBES)
    base = pass_rate(evaluator, generator(predictor, None), probes, seed=100)
    trained = pass_rate(evaluator, generator(predictor, tar), probes, seed=100)
    print(f"subject fidelity: base {base:.2f}, after {STEPS} steps {trained:.2f}")
    assert base <= 5 / PROBES
    assert trained >= 6 / PROBES and trained >= base + 3 / PROBES


def test_unloading_the_weights_gives_back_the_base_models_answers(world):
    subject, tar, predictor = world
    evaluator = load_evaluator()
    prompts = [p.prompt for p in prior_probes(8, seed=3)]
    before = generator(predictor, None)(prompts, 7)
    generator(predictor, tar)(prompts, 7)
    after = generator(predictor, None)(prompts, 7)
    assert [_labels(r) for r in read(evaluator, before)] == [_labels(r) for r in read(evaluator, after)]
    for a, b in zip(before, after):
        assert_images_close(np.asarray(a), np.asarray(b), "base image after unloading the tar")


def _labels(reading):
    return (reading.shape, reading.colour, reading.background)
