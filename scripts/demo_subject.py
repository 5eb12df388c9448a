"""Write the demo's training upload: renders of a shape the mini-world base model has never drawn (a red star on
three backgrounds), each with a sidecar caption naming the trigger word TOK, zipped as a user would upload them.

    python scripts/demo_subject.py demo_out/subject.zip
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pti.toyworld.fidelity import Subject, write_training_archive  # noqa: E402
from pti.toyworld.world import HELD_OUT_SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("destination", type=Path)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--shape", choices=HELD_OUT_SHAPES, default=HELD_OUT_SHAPES[0])
    args = parser.parse_args()
    subject = Subject(shape=args.shape)
    partial = args.destination.with_name(args.destination.name + ".partial")
    write_training_archive(subject, partial, count=args.count)
    os.replace(partial, args.destination)
    print(f"{args.destination}: {args.count} images of a {subject.colour} {subject.shape} on "
          f"{', '.join(subject.train_backgrounds)} backgrounds, captioned with {subject.trigger}")


if __name__ == "__main__":
    main()
