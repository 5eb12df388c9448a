"""Several concepts in one upload: kohya folders (``10_TOK person/``) and plain ``<trigger>/`` folders give each
image its trigger, class word and repeats; one train() run trains both triggers from their own images."""

from __future__ import annotations

import csv
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from pti.preprocessing.concepts import (
    TOP_LEVEL,
    Concept,
    ConceptFolderError,
    assign_concepts,
    concept_prefix,
    parse_concept_folder,
    with_trigger,
)
from pti.training.trainer import Trainer
from training_fixtures import concept_image

TRIGGERS = ("TOK", "STY")


def write_upload(folder: Path, files: dict[str, str | int]) -> Path:
    """``files``: relative path → caption text (a .txt/.csv) or an image index (a 64x64 png)."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            concept_image(content, 96).save(path)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(folder).as_posix())
    return archive


def read_rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "captions.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------- folder names

@pytest.mark.parametrize(("folder", "expected"), [
    ("10_TOK person", Concept("10_TOK person", "TOK", "person", 10)),
    ("up/3_sty  oil painting", Concept("up/3_sty  oil painting", "STY", "oil painting", 3)),
    ("STY", Concept("STY", "STY", "", 1)),
    ("photos", None),
    ("2_STY", Concept("2_STY", "STY", "", 2)),
])
def test_kohya_and_trigger_folders_name_their_concept(folder, expected):
    assert parse_concept_folder(folder, TRIGGERS, with_trigger=True) == expected


@pytest.mark.parametrize(("folder", "message"), [
    ("10_ohwx man", "'ohwx' is not a trigger word of token_string (TOK,STY)"),
    ("0_TOK person", "repeats must be at least 1, got 0"),
])
def test_a_wrong_concept_folder_is_a_one_line_error(folder, message):
    with pytest.raises(ConceptFolderError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_concept_folder(folder, TRIGGERS, with_trigger=True)
    assert "\n" not in str(caught.value)


def test_class_folders_give_repeats_and_class_word_without_a_trigger():
    assert parse_concept_folder("1_person", (), with_trigger=False) == Concept("1_person", None, "person", 1)
    assert parse_concept_folder("TOK", TRIGGERS, with_trigger=False) is None


def test_images_belong_to_their_nearest_concept_folder_and_nested_concepts_are_refused(tmp_path):
    images = [tmp_path / "wrap" / "10_TOK person" / "sub" / "a.png", tmp_path / "b.png", tmp_path / "STY" / "c.png"]
    concepts = assign_concepts(tmp_path, images, TRIGGERS, with_trigger=True)
    assert [concepts[i].trigger for i in images] == ["TOK", None, "STY"]
    assert concepts[images[1]] is TOP_LEVEL
    with pytest.raises(ConceptFolderError, match="inside the concept folder '10_TOK person'"):
        assign_concepts(tmp_path, [tmp_path / "10_TOK person" / "2_STY style" / "d.png"], TRIGGERS, True)


def test_prefix_and_given_captions_get_the_concepts_trigger_in_its_case():
    sty = Concept("2_STY style", "STY", "style", 2)
    assert concept_prefix("a photo of TOK, ", "TOK", sty) == "a photo of STY style, "
    assert concept_prefix("", "TOK", sty) == "STY style, "
    assert concept_prefix("a photo of TOK, ", "TOK", TOP_LEVEL) == "a photo of TOK, "
    assert with_trigger("a sty painting of a boat", sty) == "a STY painting of a boat"
    assert with_trigger("a painting of a boat", sty) == "STY, a painting of a boat"
    assert with_trigger("<STY> stays", sty) == "STY, <STY> stays"


# ------------------------------------------------------------------------------------------- preprocessing

def test_preprocessing_captions_each_concept_folder(tmp_path):
    import preprocess

    upload = write_upload(tmp_path / "upload", {
        "10_TOK person/a.png": 0, "10_TOK person/a.txt": "tok standing in a field",
        "10_TOK person/b.png": 1,
        "2_sty style/c.png": 2, "2_sty style/d.png": 3,
        "2_sty style/caption.csv": "image_file,caption\nc.png,a sty painting of a boat\nd.png,a painting of a cat\n",
        "top.png": 4,
    })
    dataset = preprocess.preprocess(upload, tmp_path / "dataset", preprocess.PreprocessSettings(
        resolution=64, token_string="TOK", trigger_words=("STY",), caption_prefix="a photo of TOK, ",
        captioning_model=None, crop_based_on_salience=False, device="cpu"))
    rows = {row["image_file"].split("-", 1)[1]: row for row in read_rows(dataset)}
    assert {name: row["caption"] for name, row in rows.items()} == {
        "a.png": "TOK standing in a field",  # sidecar caption: the trigger's case restored
        "b.png": "a photo of TOK person",  # no caption: the prefix names the folder's trigger and class
        "c.png": "a STY painting of a boat",  # caption.csv inside the folder, trigger case restored
        "d.png": "STY, a painting of a cat",  # a given caption without the trigger gets it in front
        "top.png": "a photo of TOK",  # top-level images: today's behaviour
    }
    assert {name: (row["repeats"], row["concept"]) for name, row in rows.items()} == {
        "a.png": ("10", "TOK"), "b.png": ("10", "TOK"), "c.png": ("2", "STY"), "d.png": ("2", "STY"),
        "top.png": ("1", "")}


def test_a_concept_folder_for_an_unknown_trigger_names_the_folder(tmp_path):
    import preprocess

    upload = write_upload(tmp_path / "upload", {"10_ohwx man/a.png": 0})
    with pytest.raises(preprocess.PreprocessError, match="folder '10_ohwx man': 'ohwx' is not a trigger word"):
        preprocess.preprocess(upload, tmp_path / "dataset", preprocess.PreprocessSettings(
            resolution=64, captioning_model=None, crop_based_on_salience=False, device="cpu"))
    assert not (tmp_path / "dataset").exists()


# ------------------------------------------------------------------------------------------ through train()

TOK_IMAGES, STY_IMAGES = 2, 5
TOK_REPEATS, STY_REPEATS, GLOBAL_REPEATS = 10, 2, 2
BATCH = 2


@pytest.fixture(scope="module")
def two_concept_run(tmp_path_factory):
    """train() on a zip with ``10_TOK person/`` (2 images) and ``2_STY style/`` (5 images, captions in a sidecar
    file each), one new token per trigger, the embeddings training every step (seed 2: the first step draws only
    TOK images); records each step's captions and the new rows before and after it."""
    import train

    work = tmp_path_factory.mktemp("concepts")
    files: dict[str, str | int] = {f"10_TOK person/t{i}.png": i for i in range(TOK_IMAGES)}
    files.update({f"2_STY style/s{i}.png": 10 + i for i in range(STY_IMAGES)})
    files.update({f"2_STY style/s{i}.txt": f"a sty drawing, number {i}" for i in range(STY_IMAGES)})
    archive = zip_folder(write_upload(work / "upload", files), work / "upload.zip")
    steps: list[dict] = []
    real_step, real_batch = Trainer._optimizer_step, Trainer._batch

    def recording_batch(self, micro):
        batch = real_batch(self, micro)
        steps[-1]["captions"] += batch["captions"]
        return batch

    def recording_step(self):
        steps.append({"captions": [], "before": [rows.detach().clone() for rows in self.embeddings.rows]})
        loss = real_step(self)
        steps[-1]["after"] = [rows.detach().clone() for rows in self.embeddings.rows]
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", recording_step)
        patch.setattr(Trainer, "_batch", recording_batch)
        output = train.train(input_images=archive, token_string="TOK:1,STY:1", repeats=GLOBAL_REPEATS, seed=2,
                             resolution=64, train_batch_size=BATCH, max_train_steps=6, ti_frac=1.0, ti_lr=1e-2,
                             lr_warmup_steps=0, lora_rank=2, captioning_model="", crop_based_on_salience=False,
                             verbose=False, validation_prompts="", caption_prefix="a photo of TOK, ")
    folder = work / "unpacked"
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(folder, filter="data")
    return {"folder": folder, "steps": steps,
            "config": json.loads((folder / "training_config.json").read_text()),
            "special_params": json.loads((folder / "special_params.json").read_text())}


def test_both_triggers_get_their_own_tokens(two_concept_run):
    assert two_concept_run["special_params"] == {"TOK": "<s0>", "STY": "<s1>"}


def test_each_folders_images_train_with_their_trigger_and_class(two_concept_run):
    seen = {caption for step in two_concept_run["steps"] for caption in step["captions"]}
    allowed = {"a photo of <s0> person"} | {f"a <s1> drawing, number {i}" for i in range(STY_IMAGES)}
    assert seen <= allowed and "a photo of <s0> person" in seen and seen & (allowed - {"a photo of <s0> person"})


def test_repeats_set_the_epoch_length(two_concept_run):
    config = two_concept_run["config"]
    samples = (TOK_IMAGES * TOK_REPEATS + STY_IMAGES * STY_REPEATS) * GLOBAL_REPEATS
    assert config["samples_per_epoch"] == samples == 60
    assert config["steps_per_epoch"] == samples // BATCH
    assert config["concepts"] == {
        "TOK": {"images": TOK_IMAGES, "samples_per_epoch": TOK_IMAGES * TOK_REPEATS * GLOBAL_REPEATS},
        "STY": {"images": STY_IMAGES, "samples_per_epoch": STY_IMAGES * STY_REPEATS * GLOBAL_REPEATS}}
    assert config["settings"]["repeats"] == GLOBAL_REPEATS


def only_rescaled(before: torch.Tensor, after: torch.Tensor) -> bool:
    """``after`` is ``before`` times a scalar: retract_embeddings rescales all new rows of an encoder together,
    so a row without a gradient keeps its direction. Tolerance: float32 rounding of one multiply (~1e-7)."""
    scale = float((after * before).sum() / (before * before).sum())
    return torch.allclose(after, scale * before, rtol=0, atol=1e-5 * float(before.abs().max()))


def test_each_trigger_moves_from_its_own_images(two_concept_run):
    steps = two_concept_run["steps"]
    rows = {"TOK": 0, "STY": 1}
    tokens = {"TOK": "<s0>", "STY": "<s1>"}
    firsts = {word: next(i for i, step in enumerate(steps) if any(tokens[word] in c for c in step["captions"]))
              for word in tokens}
    assert max(firsts.values()) > 0, f"a step before one trigger's first image, where its rows stay put: {firsts}"
    for word, row in rows.items():
        first = firsts[word]
        for encoder in range(2):
            for step in steps[:first]:  # not yet drawn: no gradient, no Adam moment, only the common rescale
                assert only_rescaled(step["before"][encoder][row], step["after"][encoder][row]), (word, encoder)
            assert not only_rescaled(steps[first]["before"][encoder][row], steps[first]["after"][encoder][row])
            assert not torch.equal(steps[0]["before"][encoder][row], steps[-1]["after"][encoder][row])
