"""Write a zip of real photos that scikit-image ships (no download), as training input for `make demo`.

    python scripts/demo_photos.py demo_out/photos.zip
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

# Files inside skimage/data: real camera photos, PNG and JPEG, portrait and landscape.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def write_photo_zip(destination: Path, names: tuple[str, ...] = PHOTOS) -> Path:
    """Zip the named photos (atomically: a temp file renamed into place); return the zip's path."""
    source = skimage_data_dir()
    missing = [name for name in names if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image does not ship {', '.join(missing)} in {source}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".partial")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name in names:
            archive.write(source / name, arcname=name)
    tmp.replace(destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("destination", type=Path)
    args = parser.parse_args(argv)
    path = write_photo_zip(args.destination)
    print(f"{path}: {len(PHOTOS)} photos ({', '.join(PHOTOS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
