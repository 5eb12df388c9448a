"""Class (prior-preservation) images as users have them: a zip with kohya subfolders (``1_person/``) and captions,
through train(); generated images only top the upload up to num_class_images."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pti.training.failures import RunFailed
from pti.training.trainer import Trainer
from test_concepts import write_upload, zip_folder

CLASS_PROMPT = "a photo of a person"
UPLOAD = {
    "1_person/a.png": 20, "1_person/a.txt": "a person in a red hat",
    "2_person/b.png": 21,
}


def train_with_class_images(work: Path, num_class_images: int) -> dict:
    """One short train() with the UPLOAD class zip; returns the class captions seen and training_config.json."""
    import train

    photos = zip_folder(write_upload(work / "photos", {"TOK/p0.png": 0, "TOK/p1.png": 1}), work / "photos.zip")
    classes = zip_folder(write_upload(work / "classes", UPLOAD), work / "classes.zip")
    class_captions: list[str] = []
    real_loss = Trainer._loss

    def recording_loss(self, batch):
        class_captions.extend(batch["class"]["captions"])
        return real_loss(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_loss", recording_loss)
        output = train.train(input_images=photos, class_images=classes, class_prompt=CLASS_PROMPT,
                             num_class_images=num_class_images, seed=0, resolution=64, train_batch_size=1,
                             max_train_steps=4, lr_warmup_steps=0, lora_rank=2, captioning_model="",
                             crop_based_on_salience=False, verbose=False, validation_prompts="",
                             validation_num_inference_steps=1)
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(work / "unpacked", filter="data")
    return {"captions": class_captions,
            "config": json.loads((work / "unpacked" / "training_config.json").read_text())}


def test_class_images_in_subfolders_are_used_with_num_class_images_0(tmp_path):
    run = train_with_class_images(tmp_path, num_class_images=0)
    assert run["config"]["class_images"] == {"uploaded": 2, "generated": 0}
    assert set(run["captions"]) <= {"a person in a red hat", CLASS_PROMPT}
    assert "a person in a red hat" in run["captions"], "the uploaded caption is the class image's caption"


def test_generated_class_images_add_to_the_upload(tmp_path):
    run = train_with_class_images(tmp_path, num_class_images=3)
    assert run["config"]["class_images"] == {"uploaded": 2, "generated": 1}


def test_class_images_without_images_is_a_one_line_error(tmp_path):
    import train

    photos = zip_folder(write_upload(tmp_path / "photos", {"p0.png": 0}), tmp_path / "photos.zip")
    classes = zip_folder(write_upload(tmp_path / "classes", {"1_person/notes.txt": "x"}), tmp_path / "classes.zip")
    with pytest.raises(RunFailed, match=r"class_images: classes.zip: no images found") as caught:
        train.train(input_images=photos, class_images=classes, class_prompt=CLASS_PROMPT, resolution=64,
                    captioning_model="", crop_based_on_salience=False, verbose=False)
    assert "\n" not in str(caught.value)


def test_class_images_without_class_prompt_is_refused(tmp_path):
    import train

    photos = zip_folder(write_upload(tmp_path / "photos", {"p0.png": 0}), tmp_path / "photos.zip")
    with pytest.raises(RunFailed, match="class_images needs class_prompt"):
        train.train(input_images=photos, class_images=photos, resolution=64, captioning_model="", verbose=False)
