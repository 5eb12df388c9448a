"""The Cog packaging stays true: cog.yaml, the committed OpenAPI schema, the GPU requirements, the local runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import demo_photos  # noqa: E402
import generate_openapi  # noqa: E402
import gpu_requirements  # noqa: E402

import cog_local  # noqa: E402
from cog_server import free_port  # noqa: E402

COG_YAML = yaml.safe_load((ROOT / "cog.yaml").read_text())


# ------------------------------------------------------------------------------------------------- cog.yaml


def test_cog_yaml_names_a_cuda12_python311_gpu_image_with_existing_entry_points():
    build = COG_YAML["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert build["cuda"].startswith("12.")
    assert (ROOT / build["python_requirements"]).is_file()
    for mode in ("predict", "train"):
        file_name, obj_name = COG_YAML[mode].split(":")
        assert f"def {obj_name}" in (ROOT / file_name).read_text() or f"class {obj_name}" in (ROOT / file_name).read_text()


def test_gpu_requirements_are_the_cpu_pins_with_the_cuda_build_of_the_same_torch():
    assert COG_YAML["build"]["python_requirements"] == "requirements-gpu.txt"
    gpu_text = (ROOT / "requirements-gpu.txt").read_text()
    assert gpu_text == gpu_requirements.gpu_requirements((ROOT / "requirements.txt").read_text()), (
        "requirements-gpu.txt is stale: run `python scripts/gpu_requirements.py`")
    cpu_pins = {line for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    gpu_pins = {line for line in gpu_text.splitlines() if "==" in line}
    cuda_tag = "cu" + COG_YAML["build"]["cuda"].replace(".", "")
    torch_pin = next(pin for pin in cpu_pins if pin.startswith("torch=="))
    assert gpu_pins == cpu_pins - {torch_pin} | {f"{torch_pin}+{cuda_tag}"} | set(gpu_requirements.GPU_ONLY_PINS)
    assert f"--extra-index-url https://download.pytorch.org/whl/{cuda_tag}" in gpu_text.splitlines()


def test_gpu_requirements_refuse_a_requirements_file_without_one_exact_torch_pin():
    with pytest.raises(ValueError, match="pin torch exactly once"):
        gpu_requirements.gpu_requirements("numpy==1.26.4\ntorch>=2\n")


# ------------------------------------------------------------------------------------------------- schema


def test_committed_schema_and_readme_tables_match_the_signatures():
    """Fails when train()/predict() change without `make schema` (the server validates with the committed file)."""
    schema = generate_openapi.build_schema(ROOT)
    committed = (ROOT / generate_openapi.SCHEMA_PATH).read_text()
    assert committed == generate_openapi.render_schema(schema), "stale .cog/openapi_schema.json: run `make schema`"
    readme = (ROOT / "README.md").read_text()
    tables = generate_openapi.markdown_tables(schema)
    assert generate_openapi.readme_with_tables(readme, tables) == readme, "stale README input tables: run `make schema`"


def test_schema_has_the_components_the_cog_server_validates_against():
    schema = json.loads((ROOT / generate_openapi.SCHEMA_PATH).read_text())
    components = schema["components"]["schemas"]
    for key in ("Input", "Output", "TrainingInput", "TrainingOutput", "PredictionRequest", "TrainingRequest"):
        assert key in components
    assert {"/predictions", "/trainings"} <= set(schema["paths"])
    assert components["TrainingOutput"]["properties"]["weights"] == {"type": "string", "format": "uri",
                                                                     "title": "Weights"}
    for key in ("Input", "TrainingInput"):
        for name, prop in components[key]["properties"].items():
            for ref in prop.get("allOf", []):  # choices live in a component named after the input
                assert ref["$ref"] == f"#/components/schemas/{name}"
                assert components[name]["enum"]


TOY_TRAIN = """
from cog import BaseModel, Input, Path

class TrainingOutput(BaseModel):
    weights: Path

def train(
    input_images: Path = Input(description="photos"),
    steps: int = Input(default={steps}, ge=1, le=100),
    precision: str = Input(default="fp32", choices=["fp32", "bf16"]),
    seed: int | None = Input(default=None),
) -> TrainingOutput:
    raise NotImplementedError
"""
TOY_PREDICT = """
from cog import BasePredictor, Input, Path

class Predictor(BasePredictor):
    def predict(self, prompt: str = Input(default="a photo of TOK"),
                weights: str = Input(default=None),
                precision: str = Input(default="fp32", choices=["fp32", "bf16"])) -> list[Path]:
        raise NotImplementedError
"""


def _toy_project(folder: Path, steps: int = 10) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "cog.yaml").write_text('predict: "predict.py:Predictor"\ntrain: "train.py:train"\n')
    (folder / "train.py").write_text(TOY_TRAIN.format(steps=steps))
    (folder / "predict.py").write_text(TOY_PREDICT)
    (folder / "README.md").write_text(f"# toy\n{generate_openapi.README_START}\n{generate_openapi.README_END}\n")
    return folder


def _generator(*args: str) -> subprocess.CompletedProcess:
    # A fresh interpreter per run: the toy's train/predict modules must not be cached from an earlier import.
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_openapi.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_schema_check_fails_after_a_signature_change_until_regenerated(tmp_path):
    project = _toy_project(tmp_path)
    assert _generator("--root", str(project)).returncode == 0
    assert _generator("--root", str(project), "--check").returncode == 0
    schema = json.loads((project / ".cog" / "openapi_schema.json").read_text())
    train_inputs = schema["components"]["schemas"]["TrainingInput"]
    assert train_inputs["required"] == ["input_images"]
    assert train_inputs["properties"]["steps"] == {"x-order": 1, "title": "Steps", "type": "integer", "default": 10,
                                                   "minimum": 1.0, "maximum": 100.0}
    assert train_inputs["properties"]["seed"]["nullable"] is True
    # Cog treats `str = Input(default=None)` as required: the schema must say so, or the server would accept it.
    assert schema["components"]["schemas"]["Input"]["required"] == ["weights"]

    _toy_project(tmp_path, steps=20)
    stale = _generator("--root", str(project), "--check")
    assert stale.returncode == 1 and "make schema" in stale.stderr
    assert _generator("--root", str(project)).returncode == 0
    assert _generator("--root", str(project), "--check").returncode == 0
    assert "| `steps` | int | `20` | 1 … 100 |" in (project / "README.md").read_text()


def test_schema_refuses_choices_that_differ_between_modes_under_one_name(tmp_path):
    project = _toy_project(tmp_path)
    (project / "predict.py").write_text(TOY_PREDICT.replace('["fp32", "bf16"]', '["fp32", "fp16"]'))
    result = _generator("--root", str(project), "--markdown")
    assert result.returncode != 0 and "'precision' differs between predict and train" in result.stderr


# ------------------------------------------------------------------------------------------------- local runner


@pytest.fixture(scope="module")
def train_fields():
    return cog_local.input_fields("train")


@pytest.fixture(scope="module")
def predict_fields():
    return cog_local.input_fields("predict")


def test_local_runner_reads_the_same_inputs_as_the_schema(train_fields, predict_fields):
    components = json.loads((ROOT / generate_openapi.SCHEMA_PATH).read_text())["components"]["schemas"]
    assert list(train_fields) == list(components["TrainingInput"]["properties"])
    assert list(predict_fields) == list(components["Input"]["properties"])


def test_local_runner_applies_the_declared_defaults(train_fields, tmp_path):
    photos = tmp_path / "photos.zip"
    photos.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: only its path matters here
    file_inputs = [name for name, field in train_fields.items() if field.type.primitive.name == "PATH"]
    kwargs = cog_local.validated_inputs({name: [f"@{photos}"] for name in file_inputs[:1]}, train_fields)
    for name, field in train_fields.items():
        if name not in file_inputs[:1] and field.default is not None:
            assert kwargs[name] == field.default
    assert Path(kwargs[file_inputs[0]]) == photos


def _bounded_int_input(fields: dict) -> tuple[str, object]:
    return next((name, field) for name, field in fields.items()
                if field.type.primitive.name == "INTEGER" and field.le is not None and not field.choices)


def _choice_input(fields: dict) -> str:
    return next(name for name, field in fields.items() if field.choices)


def test_local_runner_refuses_what_the_server_refuses(predict_fields):
    name, field = _bounded_int_input(predict_fields)
    cases = {
        f"{name} fails constraint <=": {name: [str(int(field.le) + 1)]},
        f"{name}: invalid literal": {name: ["many"]},
        "does not match choices": {_choice_input(predict_fields): ["NO_SUCH_CHOICE"]},
        "unknown input no_such_input": {"no_such_input": ["1"]},
        f"{name}: given 2 times": {name: ["1", "2"]},
    }
    for message, raw in cases.items():
        with pytest.raises(cog_local.InputError, match=message):
            cog_local.validated_inputs(raw, predict_fields)


def test_local_runner_wants_an_at_sign_or_url_for_files(train_fields, tmp_path):
    name = next(name for name, field in train_fields.items() if field.type.primitive.name == "PATH")
    with pytest.raises(cog_local.InputError, match="give a local file as @path"):
        cog_local.validated_inputs({name: ["photos.zip"]}, train_fields)
    with pytest.raises(cog_local.InputError, match="no such file"):
        cog_local.validated_inputs({name: [f"@{tmp_path / 'missing.zip'}"]}, train_fields)
    with pytest.raises(cog_local.InputError, match="expected name=value"):
        cog_local.parse_assignments(["oops"])


def test_local_runner_cli_saves_outputs_and_reports_bad_input_in_one_line(tmp_path):
    project = _toy_project(tmp_path / "toy")
    (project / "train.py").write_text(textwrap.dedent("""
        import shutil
        from cog import BaseModel, Input, Path

        class TrainingOutput(BaseModel):
            weights: Path

        def train(input_images: Path = Input(description="photos"),
                  steps: int = Input(default=3, ge=1, le=10),
                  fast: bool = Input(default=False)) -> TrainingOutput:
            out = Path("trained_model.tar")
            out.write_bytes(input_images.read_bytes() + f" steps={steps} fast={fast}".encode())
            return TrainingOutput(weights=out)
    """))
    photos = tmp_path / "photos.zip"
    photos.write_bytes(b"photos")
    runner = [sys.executable, str(ROOT / "cog_local.py"), "train", "--project", str(project)]
    ok = subprocess.run([*runner, "-i", f"input_images=@{photos}", "-i", "steps=7", "-i", "fast=yes",
                         "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    saved = tmp_path / "out" / "trained_model.tar"
    assert ok.stdout.strip() == f"weights: {saved}"
    assert saved.read_bytes() == b"photos steps=7 fast=True"

    bad = subprocess.run([*runner, "-i", f"input_images=@{photos}", "-i", "steps=11"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: steps fails constraint <= 10"


def test_local_runner_trains_data_parallel_and_saves_one_tar(tmp_path):
    """The README's multi-GPU command, on CPU: two processes (torchrun, what `accelerate launch` runs) train one
    model; only the main process saves and prints the tar."""
    photos = demo_photos.write_photo_zip(tmp_path / "photos.zip")
    env = {**os.environ, "SDXL_MODEL": "tiny", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "cog_local.py"), "train", "-i", f"input_images=@{photos}", "-i", "resolution=64",
         "-i", "train_batch_size=1", "-i", "max_train_steps=2", "-i", "validation_prompts=", "-i", "captioning_model=",
         "-i", "verbose=false", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    tar_path = tmp_path / "out" / "trained_model.tar"
    assert result.stdout.strip() == f"weights: {tar_path}"
    with tarfile.open(tar_path) as tar:
        config = json.load(tar.extractfile("training_config.json"))
    assert config["num_processes"] == 2
