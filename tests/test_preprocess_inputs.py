"""What users upload: hostile archives, broken and odd images. Refusals are clear and leave nothing behind."""

import io
import logging
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import PreprocessError, PreprocessSettings, preprocess
from pti.preprocessing.safe_archive import ArchiveError


def settings(**overrides) -> PreprocessSettings:
    base = dict(resolution=64, captioning_model=None, device="cpu")
    return PreprocessSettings(**{**base, **overrides})


def everything_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def reference_photo() -> Image.Image:
    """80x64, asymmetric (red block top-left, gradient rightwards): a wrong rotation or crop cannot look the same."""
    x = np.linspace(0, 255, 80)[None, :, None]
    pixels = np.broadcast_to(x, (64, 80, 3)).astype(np.uint8).copy()
    pixels[..., 2] = 90
    pixels[:24, :24] = (230, 20, 20)
    return Image.fromarray(pixels)


def image_bomb_png() -> bytes:
    """A tiny PNG whose header claims 30000x30000 pixels."""
    raw = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 30000, 30000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def refused(archive: Path, work: Path, error: type[Exception], match: str, **overrides) -> None:
    before = everything_under(work.parent)
    with pytest.raises(error, match=match) as caught:
        preprocess(archive, work / "dataset", settings(**overrides))
    assert "\n" not in str(caught.value)
    assert everything_under(work.parent) == before, "a refused upload must leave nothing behind"


def test_zip_slip_upload_is_refused(work: Path) -> None:
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.png", png_bytes(reference_photo()))
        zf.writestr("../../escaped.png", png_bytes(reference_photo()))
    refused(archive, work, ArchiveError, r"\.\./\.\./escaped.png: path escapes the destination")


def test_tar_symlink_upload_is_refused(work: Path) -> None:
    archive = work / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("photos")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    refused(archive, work, ArchiveError, "photos: symlinks are not allowed", input_images_filetype="tar")


def test_image_bomb_is_refused(work: Path) -> None:
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.png", png_bytes(reference_photo()))
        zf.writestr("bomb.png", image_bomb_png())
    refused(archive, work, PreprocessError, r"bomb.png: .*900000000 pixels.*decompression bomb")
    ordinary = work / "ordinary.zip"
    with zipfile.ZipFile(ordinary, "w") as zf:
        zf.writestr("ok.png", png_bytes(reference_photo()))
    refused(ordinary, work, PreprocessError, r"ok.png: 80x64 is 5120 pixels, more than the limit of 1000 ",
            max_image_pixels=1000)


def test_archive_without_images_is_refused(work: Path) -> None:
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "no photos here")
        zf.writestr("__MACOSX/._x.png", b"resource fork")
    refused(archive, work, PreprocessError, "photos.zip: no images found")


def test_only_broken_images_fail_before_any_model_loads(work: Path) -> None:
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cut.jpg", jpeg_bytes(reference_photo())[:300])
        zf.writestr("text.png", b"not a png at all")
    # A CLIPSeg model that does not exist: reaching the model would fail with a different error.
    refused(archive, work, PreprocessError, "none of the 2 images could be used: cut.jpg: cannot be decoded",
            mask_target_prompts="a face", clipseg_model=str(work / "no-such-model"))


def test_truncated_jpeg_and_junk_are_skipped_with_their_names(work: Path, caplog) -> None:
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.png", png_bytes(reference_photo()))
        zf.writestr("nested/also good.jpg", jpeg_bytes(reference_photo()))
        zf.writestr("cut.jpg", jpeg_bytes(reference_photo())[:400])
        zf.writestr("__MACOSX/nested/._also good.jpg", b"resource fork")
        zf.writestr(".DS_Store", b"finder")
        zf.writestr("readme.pdf", b"%PDF-1.4")
    caplog.set_level(logging.INFO)
    out = preprocess(archive, work / "dataset", settings())
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["0000-good.png", "0001-also_good.png"]
    assert "skipping cut.jpg: cannot be decoded" in caplog.text
    assert "skipping readme.pdf: not an image" in caplog.text
    assert "._also good.jpg" not in (out / "captions.csv").read_text()
    assert sorted(p.name for p in work.iterdir()) == ["dataset", "photos.zip"], "no temporary folder is left"


def exif_rotated_jpeg(photo: Image.Image) -> bytes:
    """Stored sideways with EXIF orientation 6 ("rotate 90° clockwise to display"), as phones do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(photo.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def rgba_png(photo: Image.Image) -> bytes:
    rgba = photo.convert("RGBA")
    alpha = np.full((64, 80), 255, np.uint8)
    alpha[40:, :] = 0  # the bottom becomes white
    rgba.putalpha(Image.fromarray(alpha))
    return png_bytes(rgba)


def sixteen_bit_grey_png(photo: Image.Image) -> bytes:
    grey = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    return png_bytes(Image.fromarray(grey))


def webp_bytes(photo: Image.Image) -> bytes:
    buffer = io.BytesIO()
    photo.save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def expected_rgb(photo: Image.Image, kind: str) -> np.ndarray:
    if kind == "rgba":
        pixels = np.asarray(photo).copy()
        pixels[40:, :] = 255
        photo = Image.fromarray(pixels)
    if kind in ("grey", "16bit"):
        photo = photo.convert("L").convert("RGB")
    # default settings: centre square crop of the 80x64 photo, at 64x64
    return np.asarray(photo.crop((8, 0, 72, 64))).astype(np.float64)


ODD_IMAGES = {
    "exif_rotated.jpg": (exif_rotated_jpeg, "plain"),
    "rgba.png": (rgba_png, "rgba"),
    "palette.png": (lambda p: png_bytes(p.quantize(256)), "plain"),
    "cmyk.jpg": (lambda p: jpeg_bytes(p.convert("CMYK")), "plain"),
    "grey.png": (lambda p: png_bytes(p.convert("L")), "grey"),
    "16bit.png": (sixteen_bit_grey_png, "16bit"),
    "photo.webp": (webp_bytes, "plain"),
}


def test_odd_images_become_upright_rgb_crops(work: Path) -> None:
    photo = reference_photo()
    upload = work / "upload"
    upload.mkdir()
    for name, (encode, _) in ODD_IMAGES.items():
        (upload / name).write_bytes(encode(photo))
    out = preprocess(upload, work / "dataset", settings())
    produced = {p.stem.split("-", 1)[1]: p for p in (out / "images").iterdir()}
    assert len(produced) == len(ODD_IMAGES)
    for name, (_, kind) in ODD_IMAGES.items():
        with Image.open(produced[Path(name).stem.replace(".", "_")]) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            got = np.asarray(image).astype(np.float64)
        error = np.abs(got - expected_rgb(photo, kind)).mean()
        assert error < 12, f"{name}: mean error {error:.1f} against the upright original"
    rows = (out / "captions.csv").read_text().splitlines()[1:]
    assert all(",80,64," in row for row in rows), "original size is the upright size, also for the EXIF-rotated one"
