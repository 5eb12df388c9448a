"""train() inputs whose meaning the README states: an empty seed, an empty lora_alpha, '|'-separated validation
prompts and a class_images upload, on one short run of the tiny model."""

from __future__ import annotations

import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from exactness import images_differ
from pti.training.trainer import Trainer
from training_fixtures import write_plain_folder

RANK = 4
PROMPTS = "a photo of TOK | TOK on a beach"


def zipped(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for photo in sorted(folder.iterdir()):
            handle.write(photo, photo.name)
    return archive


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One train() with seed and lora_alpha left empty, two validation prompts and two uploaded class images;
    records whether each loss saw a class batch."""
    import train

    work = tmp_path_factory.mktemp("train-inputs")
    photos = zipped(write_plain_folder(work / "photos", 3, size=96), work / "photos.zip")
    class_photos = zipped(write_plain_folder(work / "class", 2, size=80), work / "class.zip")
    class_batches = []
    real_loss = Trainer._loss

    def recording_loss(self, batch):
        class_batches.append(batch["class"]["latents"].shape[0] if "class" in batch else 0)
        return real_loss(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_loss", recording_loss)
        output = train.train(input_images=photos, seed=None, lora_alpha=None, lora_rank=RANK, resolution=64,
                             train_batch_size=1, max_train_steps=2, lr_warmup_steps=0, captioning_model="",
                             crop_based_on_salience=False, verbose=False, validation_prompts=PROMPTS,
                             validation_num_inference_steps=1, class_images=class_photos,
                             class_prompt="a photo of a dog", num_class_images=0)
    folder = work / "unpacked"
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(folder, filter="data")
    return {"folder": folder, "class_batches": class_batches,
            "config": json.loads((folder / "training_config.json").read_text())}


def test_empty_seed_draws_a_seed_and_records_it(run):
    import train

    seed = run["config"]["settings"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**16
    assert run["config"]["settings"]["inputs"]["seed"] is None
    drawn = {train._training_settings({**train_defaults(), "seed": None}, Path("w")).seed for _ in range(3)}
    assert len(drawn) > 1, "three empty seeds are not all the same"


def train_defaults() -> dict:
    import inspect

    import train

    return {name: param.default.default for name, param in inspect.signature(train.train).parameters.items()}


def test_empty_lora_alpha_means_alpha_equals_rank(run):
    with safe_open(run["folder"] / "pytorch_lora_weights.safetensors", "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    adapter = {key.removeprefix("unet."): value for key, value in metadata.items()}
    assert adapter["r"] == RANK and adapter["lora_alpha"] == RANK and not adapter.get("alpha_pattern")
    with safe_open(run["folder"] / "trained_model.safetensors", "pt") as handle:
        assert handle.metadata()["ss_network_alpha"] == f"{float(RANK)}"
        alphas = {handle.get_tensor(k).item() for k in handle.keys() if k.endswith(".alpha")}
    assert alphas == {float(RANK)}


def test_validation_prompts_split_on_the_bar(run):
    samples = sorted((run["folder"] / "samples").iterdir())
    by_tag = Counter(p.stem.rsplit("-", 1)[0] for p in samples)
    assert by_tag and set(by_tag.values()) == {2}, [p.name for p in samples]
    tag = next(iter(by_tag))
    first, second = (np.asarray(Image.open(run["folder"] / "samples" / f"{tag}-{i}.png")) for i in (0, 1))
    assert images_differ(first, second), "the two prompts are rendered, not one twice"


def test_class_images_upload_turns_on_prior_preservation(run):
    assert run["class_batches"] and all(n == 1 for n in run["class_batches"]), run["class_batches"]
    assert run["config"]["settings"]["class_prompt"] == "a photo of a dog"
