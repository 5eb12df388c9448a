"""Run this model's `train()` and `predict()` without Docker, with Cog's own `-i name=value` input syntax.

    python cog_local.py train -i input_images=@photos.zip -i token_string=TOK -i max_train_steps=500
    python cog_local.py predict -i prompt="a photo of TOK" -i replicate_weights=@out/trained_model.tar

`@path` names a local file (for a text input such as `replicate_weights`, its path is passed on); http(s) and
data: URLs of file inputs are fetched as the Cog server would fetch them. Inputs are typed, defaulted and checked
by Cog's own inspector (`cog._inspector`), the same code and the same `Input(...)` declarations the server's schema
is generated from, so the rules cannot drift apart. Output files are copied into `--output-dir` (default
`out/`) and their paths printed, one per line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pathlib
import shutil
import sys
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from cog import Path as CogPath
from cog import _inspector
from cog._adt import InputField, PrimitiveType, Repetition
from cog.types import URLPath

ROOT = Path(__file__).resolve().parent
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class InputError(ValueError):
    """An `-i` argument that is malformed, unknown, or rejected by the input's declared type or constraints."""


def entry_point(mode: str, root: Path = ROOT) -> tuple[str, str]:
    """(module, attribute) that cog.yaml names for `predict` or `train`."""
    ref = yaml.safe_load((root / "cog.yaml").read_text())[mode]
    file_name, obj_name = ref.split(":", 1)
    return file_name.removesuffix(".py").replace("/", "."), obj_name


def parse_assignments(pairs: list[str]) -> dict[str, list[str]]:
    """`["a=1", "b=@x.zip", "a=2"]` → `{"a": ["1", "2"], "b": ["@x.zip"]}` (repeating a name makes a list)."""
    raw: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InputError(f"-i {pair!r}: expected name=value")
        raw.setdefault(name.strip(), []).append(value)
    return raw


def _file_value(name: str, text: str) -> Any:
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise InputError(f"{name}: no such file {path}")
        return CogPath(path.resolve())
    if text.split(":", 1)[0] in ("http", "https", "data"):
        return text  # Cog's Path.validate fetches it, as the server does
    raise InputError(f"{name}: give a local file as @path, or an http(s)/data URL; got {text!r}")


def _scalar_value(name: str, primitive: PrimitiveType, text: str) -> Any:
    if primitive in (PrimitiveType.PATH, PrimitiveType.FILE):
        return _file_value(name, text)
    if primitive is PrimitiveType.BOOL:
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise InputError(f"{name}: expected true or false, got {text!r}")
        return lowered in _TRUE
    if primitive in (PrimitiveType.ANY, PrimitiveType.CUSTOM):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}: expected JSON, got {text!r} ({exc.msg})") from None
    if primitive is PrimitiveType.STRING and text.startswith("@"):
        return str(_file_value(name, text))  # a text input naming a location (replicate_weights): the local path
    return text  # str, int, float, Secret: Cog's normalisation converts and checks the text


def _union_value(name: str, variants: list, texts: list[str]) -> Any:
    """A `str | list[str]` or `float | list[float]` input: one `-i` gives the single value, repeated `-i` the list."""
    def repeated(variant) -> bool:
        return variant.repetition in (Repetition.REPEATED, Repetition.OPTIONAL_REPEATED)

    single = next((v for v in variants if not repeated(v)), None)
    listed = next((v for v in variants if repeated(v)), None)
    if len(texts) > 1 or single is None:
        if listed is None:
            raise InputError(f"{name}: given {len(texts)} times but takes one value")
        return [_union_member(name, listed.primitive, text) for text in texts]
    return _union_member(name, single.primitive, texts[0])


def _union_member(name: str, primitive: PrimitiveType, text: str) -> Any:
    """A union member's value, typed here (Cog's union normalisation does not convert text to numbers)."""
    if primitive in (PrimitiveType.FLOAT, PrimitiveType.INTEGER):
        try:
            return float(text) if primitive is PrimitiveType.FLOAT else int(text)
        except ValueError:
            raise InputError(f"{name}: expected a number, got {text!r}") from None
    return _scalar_value(name, primitive, text)


def typed_values(raw: dict[str, list[str]], inputs: dict[str, InputField]) -> dict[str, Any]:
    """Turn command-line strings into the JSON-like values a request body would carry."""
    unknown = sorted(set(raw) - set(inputs))
    if unknown:
        raise InputError(f"unknown input {', '.join(unknown)}; this model takes: {', '.join(inputs)}")
    values: dict[str, Any] = {}
    for name, texts in raw.items():
        field_type = inputs[name].type
        if field_type.union_variants is not None:
            values[name] = _union_value(name, field_type.union_variants, texts)
            continue
        is_list = field_type.repetition in (Repetition.REPEATED, Repetition.OPTIONAL_REPEATED)
        if len(texts) > 1 and not is_list:
            raise InputError(f"{name}: given {len(texts)} times but takes one value")
        converted = [_scalar_value(name, field_type.primitive, text) for text in texts]
        values[name] = converted if is_list else converted[0]
    return values


def _localise(value: Any) -> Any:
    """Download URL inputs (Cog's URLPath) to local files, as the server does before calling the model."""
    if isinstance(value, URLPath):
        return value.convert()
    if isinstance(value, list):
        return [_localise(item) for item in value]
    return value


def validated_inputs(raw: dict[str, list[str]], inputs: dict[str, InputField]) -> dict[str, Any]:
    """Cog's own check: types, defaults, required inputs, ge/le, lengths, regex and choices."""
    try:
        checked = _inspector.check_input(inputs, typed_values(raw, inputs))
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return {name: _localise(value) for name, value in checked.items()}


def input_fields(mode: str, root: Path = ROOT) -> dict[str, InputField]:
    """The inputs of the entry point cog.yaml names for `mode`, as Cog's inspector sees them."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return _inspector.create_predictor(*entry_point(mode, root)).inputs


def load_callable(mode: str, root: Path = ROOT) -> Callable[..., Any]:
    """The train function, or the predict/run method of a Predictor after its setup()."""
    module_name, obj_name = entry_point(mode, root)
    target = getattr(importlib.import_module(module_name), obj_name)
    if not inspect.isclass(target):
        return target
    method_name, _ = _inspector._selected_predict_method(target, f"{module_name}.{obj_name}")
    predictor = target()
    predictor.setup()
    return getattr(predictor, method_name)


def _copy_into(source: Path, out_dir: Path, taken: set[str]) -> Path:
    name = source.name
    stem, suffix = source.stem, source.suffix
    counter = 1
    while name in taken:
        name = f"{stem}-{counter}{suffix}"
        counter += 1
    taken.add(name)
    destination = out_dir / name
    tmp = out_dir / f".{name}.partial"
    shutil.copyfile(source, tmp)
    tmp.replace(destination)
    return destination


def save_outputs(result: Any, out_dir: Path) -> list[str]:
    """Copy every file in the result into `out_dir`; return one printable line per output value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    lines: list[str] = []

    def visit(value: Any, label: str) -> None:
        if isinstance(value, pathlib.Path):
            lines.append(f"{label}{_copy_into(Path(value), out_dir, taken)}")
        elif is_dataclass(value):
            for field in fields(value):
                visit(getattr(value, field.name), f"{field.name}: ")
        elif isinstance(value, (list, tuple)) or inspect.isgenerator(value):
            for item in value:
                visit(item, label)
        else:
            lines.append(f"{label}{json.dumps(value)}")

    visit(result, "")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["predict", "train"])
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                        help="an input, as for `cog predict`/`cog train`; @path for a local file")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("out"), help="where output files go")
    parser.add_argument("--project", type=Path, default=ROOT, help="folder holding cog.yaml (default: this one)")
    args = parser.parse_args(argv)
    # Cog 0.23 asks models to move from BasePredictor.predict() to BaseRunner.run(); that is the model's business.
    warnings.filterwarnings("ignore", message=".* is deprecated; use ", category=DeprecationWarning)

    # Local use: a text input naming a local file (`-i replicate_weights=@out/trained_model.tar`) passes its path.
    os.environ.setdefault("WEIGHTS_ALLOW_LOCAL_PATHS", "1")
    try:
        kwargs = validated_inputs(parse_assignments(args.input), input_fields(args.mode, args.project))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = load_callable(args.mode, args.project)(**kwargs)
    except ValueError as exc:  # the model's own one-line refusal of bad input (archive, weights, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0  # under `accelerate launch` only the main process saves and reports the outputs
    for line in save_outputs(result, args.output_dir):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
