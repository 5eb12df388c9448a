"""preprocess(): real photos through real face detection, captions by precedence, masks, crops, buckets, preview."""

import csv
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pti.preprocessing.captioning import restore_trigger_words
from conftest import SHARED_DATASETS
from preprocess import PreprocessError, PreprocessSettings, preprocess
from pti.models.tiny_vision_models import ensure_tiny_blip, ensure_tiny_clipseg, ensure_tiny_swin2sr

# The astronaut's face in skimage's 512x512 photo (left, top, right, bottom), read off the image by eye.
ASTRONAUT_FACE = (180, 70, 275, 175)


def settings(**overrides) -> PreprocessSettings:
    base = dict(resolution=64, captioning_model=None, device="cpu")
    return PreprocessSettings(**{**base, **overrides})


def read_rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "captions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.float64)


@pytest.fixture(scope="module")
def astronaut_on_wide_canvas(tmp_path_factory) -> tuple[Path, Image.Image]:
    """The astronaut on the right of a 1200x512 grey canvas: a centre crop would miss her face."""
    folder = tmp_path_factory.mktemp("astronaut")
    canvas = Image.new("RGB", (1200, 512), (128, 128, 128))
    canvas.paste(Image.fromarray(data.astronaut()), (688, 0))
    canvas.save(folder / "astronaut.png")
    return folder, canvas


def test_face_is_found_cropped_around_and_masked(astronaut_on_wide_canvas, tmp_path: Path, caplog) -> None:
    folder, canvas = astronaut_on_wide_canvas
    caplog.set_level(logging.INFO)
    out = preprocess(folder, tmp_path / "ds", settings(resolution=256, use_face_detection_instead=True))
    [row] = read_rows(out)
    assert (int(row["original_width"]), int(row["original_height"])) == (1200, 512)
    assert "[face]" in caplog.text
    scale = 256 / 512
    crop_left, crop_top = int(row["crop_left"]), int(row["crop_top"])
    face = [(ASTRONAUT_FACE[0] + 688) * scale - crop_left, ASTRONAUT_FACE[1] * scale - crop_top,
            (ASTRONAUT_FACE[2] + 688) * scale - crop_left, ASTRONAUT_FACE[3] * scale - crop_top]
    assert 0 <= face[0] and face[2] <= 256 and 0 <= face[1] and face[3] <= 256, "the crop must contain the face"
    got = pixels(out / row["image_file"])
    # crop offsets are whole pixels at the training scale, so the photo's crop is known to within 1/scale pixels
    errors = [np.abs(got - np.asarray(canvas.crop((left, 0, left + 512, 512)).resize((256, 256), Image.LANCZOS))).mean()
              for left in range(round(crop_left / scale) - 2, round(crop_left / scale) + 3)]
    assert min(errors) < 1.5, "the recorded crop offset must match the crop"
    mask = pixels(out / row["mask_file"])
    inner = [round(v) for v in (face[0] + 10, face[1] + 10, face[2] - 10, face[3] - 10)]
    assert mask[inner[1]:inner[3], inner[0]:inner[2]].mean() > 200, "the mask must cover the face"
    assert mask[200:, :40].mean() == pytest.approx(0.1 * 255, abs=2), "away from the face only the floor remains"
    assert (out / "preview.png").is_file()


@pytest.mark.skipif(not (SHARED_DATASETS / "kiriko").is_dir(), reason="needs ../shared/datasets/kiriko")
def test_kiriko_zip_faces_are_found(tmp_path: Path, caplog) -> None:
    archive = tmp_path / "kiriko.upload"  # no extension: the content says zip
    with zipfile.ZipFile(archive, "w") as zf:
        for photo in sorted((SHARED_DATASETS / "kiriko").glob("*.jpg")):
            zf.write(photo, f"kiriko/{photo.name}")
    caplog.set_level(logging.INFO)
    out = preprocess(archive, tmp_path / "ds", settings(use_face_detection_instead=True))
    rows = read_rows(out)
    assert len(rows) == 13
    assert "no face found" not in caplog.text, "every render has a face, side views and bowed heads included"
    masks = [pixels(out / row["mask_file"]) for row in rows]
    with_face = [m for m in masks if m.min() < 255]
    assert len(with_face) == 13
    for mask in with_face:
        assert mask.max() > 240 and mask.min() == pytest.approx(0.1 * 255, abs=2)


@pytest.mark.skipif(not (SHARED_DATASETS / "monster").is_dir(), reason="needs ../shared/datasets/monster")
def test_monster_has_no_face_full_masks_and_its_caption_csv(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    out = preprocess(SHARED_DATASETS / "monster", tmp_path / "ds", settings(use_face_detection_instead=True))
    rows = read_rows(out)
    for index in range(1, 6):
        assert f"monstertoy ({index}).jpg: no face found" in caplog.text
    for row in rows:
        assert pixels(out / row["mask_file"]).min() == 255, "no face: the whole image counts"
        assert (int(row["original_width"]), int(row["original_height"])) == (1440, 1440)
    with (SHARED_DATASETS / "monster" / "caption.csv").open() as handle:
        expected = {r["image_file"]: r["caption"] for r in csv.DictReader(handle)}
    assert sorted(row["caption"] for row in rows) == sorted(expected.values())
    assert rows[0]["caption"] == expected["monstertoy (1).jpg"]


def save_colour(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (80, 64)) -> None:
    Image.new("RGB", size, colour).save(path)


def test_caption_precedence_and_mismatches_reported_by_name(tmp_path: Path, caplog) -> None:
    upload = tmp_path / "upload"
    (upload / "sub").mkdir(parents=True)
    for name, colour in [("a.png", (255, 0, 0)), ("b.jpg", (0, 255, 0)), ("sub/c.png", (0, 0, 255)),
                         ("d.png", (9, 9, 9))]:
        save_colour(upload / name, colour)
    (upload / "a.txt").write_text("TOK in red, from the sidecar\n")
    (upload / "b.caption").write_text("TOK   in green")
    (upload / "caption.csv").write_text("caption,image_file\nfrom the table,a.png\nTOK in blue,sub/c.png\n"
                                        "lost,ghost.png\n")
    caplog.set_level(logging.WARNING)
    out = preprocess(upload, tmp_path / "ds", settings(caption_prefix="a photo of TOK, "))
    captions = {Path(row["image_file"]).stem.split("-", 1)[1]: row["caption"] for row in read_rows(out)}
    assert captions == {"a": "TOK in red, from the sidecar", "b": "TOK in green", "c": "TOK in blue",
                        "d": "a photo of TOK"}
    assert "caption.csv: caption for ghost.png, but there is no such image" in caplog.text
    assert "d.png has no caption in caption.csv" in caplog.text
    assert "no captioning model configured" in caplog.text


def test_tiny_blip_captions_keep_the_trigger_word(tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    save_colour(upload / "x.png", (200, 120, 40))
    Image.fromarray(data.astronaut()).resize((96, 96)).save(upload / "y.jpg")
    prefix = "a photo of TOK, "
    out = preprocess(upload, tmp_path / "ds", settings(captioning_model=str(ensure_tiny_blip()),
                                                       caption_prefix=prefix, caption_max_tokens=12))
    for row in read_rows(out):
        assert row["caption"].startswith(prefix)
        generated = row["caption"][len(prefix):]
        assert generated and generated == generated.strip()
        assert "tok" not in generated.split(), "BLIP's lower-cased trigger word must be restored"
    assert restore_trigger_words("a tok with tok-like ears, not a token or <tok>", ("TOK",)) == \
        "a TOK with TOK-like ears, not a token or <tok>"


def test_unavailable_captioner_falls_back_to_the_prefix(tmp_path: Path, caplog) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    save_colour(upload / "x.png", (1, 2, 3))
    caplog.set_level(logging.WARNING)
    out = preprocess(upload, tmp_path / "ds", settings(captioning_model=str(tmp_path / "no-such-model")))
    assert [row["caption"] for row in read_rows(out)] == ["a photo of TOK"]
    assert "no-such-model is not available" in caplog.text


def test_clipseg_prompt_masks_on_tiny_model(tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    Image.fromarray(data.astronaut()).resize((128, 96)).save(upload / "astronaut.png")
    model = str(ensure_tiny_clipseg())
    masks = []
    for temperature in (1.0, 0.05):
        out = preprocess(upload, tmp_path / f"ds-{temperature}",
                         settings(mask_target_prompts="a photo of a face", clipseg_model=model,
                                  clipseg_temperature=temperature))
        [row] = read_rows(out)
        with Image.open(out / row["mask_file"]) as mask:
            assert mask.mode == "L" and mask.size == (64, 64)
            masks.append(np.asarray(mask).astype(np.float64))
    for mask in masks:
        assert mask.max() > 200 and mask.min() >= 0.1 * 255 - 1
    assert np.abs(masks[0] - masks[1]).mean() > 1, "the temperature must change the mask"


def test_buckets_keep_aspect_ratio_and_small_photos_are_upscaled(tmp_path: Path, caplog) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    save_colour(upload / "wide.png", (10, 20, 30), (600, 360))
    save_colour(upload / "tall.png", (30, 20, 10), (360, 600))
    save_colour(upload / "small.png", (50, 50, 50), (100, 100))
    caplog.set_level(logging.INFO)
    out = preprocess(upload, tmp_path / "ds", settings(resolution=256, use_bucketing=True))
    sizes = {Path(r["image_file"]).stem.split("-", 1)[1]: (int(r["width"]), int(r["height"])) for r in read_rows(out)}
    assert sizes == {"wide": (320, 192), "tall": (192, 320), "small": (256, 256)}
    for row in read_rows(out):
        with Image.open(out / row["image_file"]) as image:
            assert image.size == (int(row["width"]), int(row["height"]))
    assert "wide.png: 600x360" in caplog.text and "bucket 320x192" in caplog.text
    assert "small.png: 100x100, crop 100x100 at (0, 0) -> 256x256 [bucket 256x256, upscaled from 100x100 (Lanczos)]" \
        in caplog.text


def test_small_photos_can_be_upscaled_by_a_super_resolution_model(tmp_path: Path, caplog) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    Image.fromarray(data.astronaut()).resize((48, 40)).save(upload / "small.png")
    Image.fromarray(data.astronaut()).resize((96, 80)).save(upload / "large.png")
    caplog.set_level(logging.INFO)
    out = preprocess(upload, tmp_path / "ds", settings(upscaler_model=str(ensure_tiny_swin2sr())))
    assert "small.png: 48x40, crop 40x40 at (4, 0) -> 64x64 [upscaled from 40x40 (super-resolution)]" in caplog.text
    [large_line] = [message for message in caplog.messages if message.startswith("large.png:")]
    assert "upscaled" not in large_line, "photos at least as large as the target are only downscaled"
    lanczos = preprocess(upload, tmp_path / "ds-lanczos", settings())
    rows, plain_rows = read_rows(out), read_rows(lanczos)
    assert [r["crop_left"] for r in rows] == [r["crop_left"] for r in plain_rows]
    small = [r["image_file"] for r in rows if "small" in r["image_file"]][0]
    with Image.open(out / small) as image:
        assert image.size == (64, 64)
    # the tiny model's weights are random: its output differs from a plain Lanczos resize
    assert np.abs(pixels(out / small) - pixels(lanczos / small)).mean() > 5


def test_output_folder_must_be_new_and_settings_are_checked(tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    save_colour(upload / "x.png", (1, 2, 3))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(PreprocessError, match="not empty"):
        preprocess(upload, tmp_path / "taken", settings())
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    with pytest.raises(PreprocessError, match="resolution must be a positive multiple of 64, got 100"):
        settings(resolution=100)
    with pytest.raises(PreprocessError, match="input_images_filetype must be one of infer, zip, tar, got 'rar'"):
        settings(input_images_filetype="rar")
    with pytest.raises(PreprocessError, match="no such file or folder"):
        preprocess(tmp_path / "missing.zip", tmp_path / "ds", settings())
    shutil.rmtree(upload)
