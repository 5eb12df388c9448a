"""GPU check: the whole product on one GPU, offline, in minutes; one table; exit status 1 on any failure.

    python bench/gpu_check.py                                  # on a CUDA machine: full-size SDXL, random weights
    python bench/gpu_check.py --device cuda:1                  # another GPU of the machine
    .venv/bin/python bench/gpu_check.py --device cpu --model tiny   # the same checks at tiny sizes (the test suite)

What it does, with no network (``HF_HUB_OFFLINE=1``) and no download:

1. builds the full-size SDXL architecture with random weights directly on the device (``--model full``; ``tiny``:
   the tiny SDXL of the tests) and saves it as the base model folder;
2. runs Cog's ``train()`` end to end on synthetic photos (full: 1024², batch 4, LoRA rank 32, 40 steps, pivot at
   half) and reports s/step before and after the pivot, the time to the first step, peak GPU memory, and whether
   gradient checkpointing was switched on;
3. runs a 2-process data-parallel ``train()`` under ``torchrun`` when the machine has 2 GPUs (skipped otherwise);
4. runs a short ``train_text_encoder`` ``train()`` (LoRA on both text encoders, float32 adapters beside the
   device-dtype encoders) and checks that its LoRA file carries the encoders' keys;
5. sets up the predictor, loads the trained tar, and reports the first-load and switch times, the 30-step 1024²
   latency, whether A→B→A gives bit-identical images, and whether the text-encoder-LoRA tar changes the image and
   unloads to the bit-identical base image.

The device comes from ``--device`` alone (exported as ``SDXL_DEVICE`` for every component); CUDA-only calls
(synchronize, peak memory) go through :mod:`pti.models.base_model`, which skips them off CUDA. Images are noise
(random weights): shapes, memory and speed are real. The safety checker is the tiny stand-in (no download) and is
switched off in the timed predictions.

Reference for the s/step rows: the SDXL UNet forward at 1024² is ≈6.8 TFLOP per image and a frozen-base LoRA
step ≈2.1× the forward, so a batch-4 1024² step is ≈57 TFLOP: ≈72 ms at ≈790 TFLOP/s (bf16, H100/H200).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNET_TFLOP_PER_1024_IMAGE = 6.8
LORA_STEP_OVER_FORWARD = 2.1
PEAK_TFLOPS_BF16 = 790.0
GIB = 1024**3


@dataclass(frozen=True)
class CheckSettings:
    device: str  # the one place the device is named
    model: str  # "full" (random-weight SDXL built on the device) or "tiny"
    resolution: int
    batch_size: int
    rank: int
    steps: int
    ti_frac: float
    num_images: int
    predict_size: int
    predict_steps: int
    exact_steps: int  # steps of the A→B→A renders
    switches: int
    ddp_steps: int
    text_encoder_steps: int  # steps of the train_text_encoder run
    work: Path

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


PRESETS = {  # the sizes for the full model; the smallest that exercise the same code for tiny
    "full": dict(resolution=1024, batch_size=4, rank=32, steps=40, ti_frac=0.5, num_images=8, predict_size=1024,
                 predict_steps=30, exact_steps=4, switches=6, ddp_steps=10, text_encoder_steps=10),
    "tiny": dict(resolution=64, batch_size=2, rank=4, steps=4, ti_frac=0.5, num_images=4, predict_size=64,
                 predict_steps=2, exact_steps=2, switches=4, ddp_steps=2, text_encoder_steps=2),
}


@dataclass
class Row:
    check: str
    value: str
    status: str  # ok | FAIL | skip
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, value: str, status: str = "ok", note: str = "") -> None:
        self.rows.append(Row(check, value, status, note))

    @property
    def failed(self) -> bool:
        return any(row.status == "FAIL" for row in self.rows)

    def table(self) -> str:
        widths = [max(len(getattr(r, name)) for r in self.rows + [Row("check", "value", "status", "note")])
                  for name in ("check", "value", "status")]
        lines = [f"| {'check':{widths[0]}} | {'value':>{widths[1]}} | {'status':{widths[2]}} | note",
                 f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|------"]
        lines += [f"| {r.check:{widths[0]}} | {r.value:>{widths[1]}} | {r.status:{widths[2]}} | {r.note}"
                  for r in self.rows]
        return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[CheckSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--model", choices=sorted(PRESETS), default="full")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--ddp-worker", nargs=2, metavar=("PHOTOS_ZIP", "REPORT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    return CheckSettings(device=args.device, model=args.model, work=work, **PRESETS[args.model]), args


def configure_environment(settings: CheckSettings, base_model_dir: str) -> None:
    """Every component reads its device and models from here: no network, nothing from the hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))
    os.environ["SDXL_DEVICE"] = settings.device
    os.environ["SDXL_MODEL"] = base_model_dir
    for name in ("SDXL_REFINER_MODEL", "SAFETY_CHECKER_MODEL", "FEATURE_EXTRACTOR_MODEL"):
        os.environ[name] = "tiny"  # the refiner loads only if asked for; the tiny safety checker needs no download
    os.environ["WEIGHTS_CACHE_DIR"] = str(settings.work / "weights-cache")
    os.environ["WEIGHTS_ALLOW_LOCAL_PATHS"] = "1"  # the check loads its tars by path
    os.environ.pop("COG_SDXL_CHECKPOINT_DIR", None)


def check_device(settings: CheckSettings) -> None:
    import torch

    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {settings.device}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"--device {settings.device}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)  # a stray plain "cuda" means this GPU too
    elif device.type != "cpu":
        raise RuntimeError(f"--device {settings.device}: use cuda, cuda:N or cpu")


def device_name(settings: CheckSettings) -> str:
    import torch

    if settings.is_cuda:
        return torch.cuda.get_device_name(torch.device(settings.device))
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ------------------------------------------------------------------------------------------------- model


def build_base_model(settings: CheckSettings, report: Report) -> str:
    if settings.model == "tiny":
        from pti.models.base_model import resolve_model_dir

        started = time.perf_counter()
        folder = resolve_model_dir("tiny")
        report.add("base model", f"{time.perf_counter() - started:.1f} s", note=f"tiny SDXL ({folder})")
        return "tiny"
    import torch

    from pti.models.base_model import release_cached_memory
    from pti.models.full_random_model import build_random_full_sdxl

    folder = settings.work / "random-full-sdxl"
    started = time.perf_counter()
    build_random_full_sdxl(folder, seed=0, dtype=torch.bfloat16, device=torch.device(settings.device))
    release_cached_memory(torch.device(settings.device))  # the built copy is gone; train() loads the saved one
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    report.add("build SDXL on the device + save", f"{time.perf_counter() - started:.1f} s",
               note=f"random weights, bf16, {size / GIB:.1f} GiB on disk")
    return str(folder)


# ---------------------------------------------------------------------------------------------- training


def write_photos(folder: Path, count: int, size: int) -> Path:
    """Synthetic photos (noise-textured colour fields) zipped like an upload."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    archive = folder / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for index in range(count):
            coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            path = folder / f"photo{index}.png"
            image.save(path)
            handle.write(path, path.name)
    return archive


class StepClock:
    """Step hooks: wall time at the end of every optimizer step (after the device finished)."""

    def __init__(self, device):
        self.device = device
        self.ends: list[float] = []
        self.pivoted: list[bool] = []

    def phase(self, name: str):
        from contextlib import nullcontext

        return nullcontext()

    def step_done(self, step: int, pivoted: bool) -> None:
        from pti.models.base_model import synchronize

        synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.pivoted.append(pivoted)


@dataclass
class TrainProbe:
    """What the wrapped Trainer.create saw of the run train() started."""

    clock: StepClock | None = None
    trainer: object | None = None


def probing_trainer_create(probe: TrainProbe) -> Callable[[], None]:
    """Attach a StepClock to the trainer train() creates; returns the function that undoes it."""
    from pti.training import trainer as trainer_module

    original = trainer_module.Trainer.__dict__["create"]

    def create(cls, settings):
        trainer = original.__func__(cls, settings)
        probe.clock = StepClock(trainer.runtime.device)
        probe.trainer = trainer
        trainer.step_hooks = probe.clock
        return trainer

    trainer_module.Trainer.create = classmethod(create)
    return lambda: setattr(trainer_module.Trainer, "create", original)


def train_inputs(settings: CheckSettings, photos: Path, steps: int) -> dict:
    return dict(input_images=photos, seed=0, resolution=settings.resolution, train_batch_size=settings.batch_size,
                max_train_steps=steps, lora_rank=settings.rank, ti_frac=settings.ti_frac, lr_warmup_steps=0,
                token_string="TOK", caption_prefix="a photo of TOK, ", captioning_model="", validation_prompts="",
                checkpointing_steps=999999, verbose=False)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def step_seconds(clock: StepClock, started: float) -> tuple[float, list[float], list[float]]:
    """(time to the first step, s/step before the pivot, s/step after it); the first step and the pivot step
    (caption caching) are left out of the medians."""
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    before = [d for d, pivoted in zip(durations, clock.pivoted[1:]) if not pivoted]
    after = [d for d, pivoted, previous in zip(durations, clock.pivoted[1:], clock.pivoted) if pivoted and previous]
    return clock.ends[0] - started, before, after


def floor_note(settings: CheckSettings) -> str:
    if not settings.is_cuda:
        return ""
    tflop = UNET_TFLOP_PER_1024_IMAGE * (settings.resolution / 1024) ** 2 * LORA_STEP_OVER_FORWARD * settings.batch_size
    return f"floor ≈{tflop / PEAK_TFLOPS_BF16 * 1000:.0f} ms at {PEAK_TFLOPS_BF16:.0f} TFLOP/s"


def run_training(settings: CheckSettings, photos: Path, report: Report) -> Path | None:
    import train
    from pti.models import base_model

    device = base_model.pick_runtime().device
    probe = TrainProbe()
    undo = probing_trainer_create(probe)
    base_model.reset_peak_memory(device)
    started = time.perf_counter()
    try:
        output = train.train(**train_inputs(settings, photos, settings.steps))
    finally:
        undo()
    total = time.perf_counter() - started
    tar = settings.work / "trained_A.tar"
    shutil.move(str(output.weights), tar)
    trainer, clock = probe.trainer, probe.clock
    first, before, after = step_seconds(clock, started)
    pivot = trainer.plan.pivot_step
    report.add("train(): total", f"{total:.1f} s", note=f"{settings.resolution}², batch {settings.batch_size}, rank "
               f"{settings.rank}, {settings.steps} steps, pivot at {pivot}, dtype {trainer.runtime.dtype}")
    report.add("train(): time to first step", f"{first:.1f} s", note="preprocess, load, cache latents, first step")
    for label, values in (("before", before), ("after", after)):
        value = median_or_none(values)
        report.add(f"train(): s/step {label} pivot", "n/a" if value is None else f"{value:.3f} s",
                   note=f"median of {len(values)}; {floor_note(settings)}".rstrip("; "))
    peak = base_model.peak_memory_bytes(device)
    report.add("train(): peak GPU memory", "n/a" if peak is None else f"{peak / GIB:.1f} GiB",
               "ok" if peak is not None or not settings.is_cuda else "FAIL", "max_memory_allocated" if peak else "CPU")
    report.add("train(): gradient checkpointing", "on" if trainer.unet.is_gradient_checkpointing else "off",
               note="chosen by the memory probe (gradient_checkpointing unset)")
    losses = trainer.loss_history
    finite = len(losses) == settings.steps and all(math.isfinite(v) for v in losses)
    report.add("train(): losses finite", f"{len(losses)} steps", "ok" if finite else "FAIL",
               f"last loss {losses[-1]:.4f}" if losses else "no steps")
    report.add("train(): trained tar", f"{tar.stat().st_size / 1024**2:.1f} MiB", "ok" if tar.is_file() else "FAIL")
    return tar


def run_text_encoder_training(settings: CheckSettings, photos: Path, report: Report) -> Path | None:
    """A short ``train_text_encoder`` run (LoRA on both text encoders for its first half, beside the embeddings): it
    trains on the device's dtype with float32 adapters, and its LoRA files carry the encoders' keys."""
    import train
    from safetensors import safe_open

    from pti.formats.export import DIFFUSERS_LORA_FILE

    steps = settings.text_encoder_steps
    started = time.perf_counter()
    output = train.train(**{**train_inputs(settings, photos, steps), "train_text_encoder": True,
                            "text_encoder_frac": 0.5})
    seconds = time.perf_counter() - started
    tar = settings.work / "trained_text_encoder.tar"
    shutil.move(str(output.weights), tar)
    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if Path(m.name).name == DIFFUSERS_LORA_FILE)
        archive.extract(member, settings.work / "te_files", filter="data")
    with safe_open(str(settings.work / "te_files" / member.name), "pt") as lora:
        prefixes = {key.split(".")[0] for key in lora.keys()}
    carried = {"text_encoder", "text_encoder_2"} <= prefixes
    report.add("train(): text-encoder LoRA", f"{seconds:.1f} s", "ok" if carried else "FAIL",
               f"{steps} steps, encoders' adapters for the first half; LoRA file prefixes: {', '.join(sorted(prefixes))}")
    return tar


def ddp_worker(settings: CheckSettings, photos: Path, report_json: Path) -> None:
    """One process of the 2-process check (run by torchrun): train(), then rank 0 writes what it saw."""
    import torch

    import train
    from accelerate import PartialState

    output = train.train(**train_inputs(settings, photos, settings.ddp_steps))
    state = PartialState()
    if state.is_main_process:
        tar = Path(output.weights)
        report_json.write_text(json.dumps({"processes": state.num_processes, "tar": tar.is_file(),
                                           "backend": str(torch.distributed.get_backend())}))
        tar.unlink(missing_ok=True)


def run_ddp_training(settings: CheckSettings, photos: Path, report: Report) -> None:
    import torch

    if not settings.is_cuda or torch.cuda.device_count() < 2:
        report.add("train(): 2-process data parallel", "-", "skip",
                   f"needs 2 GPUs; this machine has {torch.cuda.device_count() if settings.is_cuda else 0}")
        return
    report_json = settings.work / "ddp.json"
    env = {k: v for k, v in os.environ.items() if k != "SDXL_DEVICE"}  # each process takes cuda:LOCAL_RANK
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "--device", "cuda", "--model", settings.model, "--work",
               str(settings.work), "--ddp-worker", str(photos), str(report_json)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    seen = json.loads(report_json.read_text()) if report_json.is_file() else {}
    ok = result.returncode == 0 and seen.get("processes") == 2 and seen.get("tar")
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
    report.add("train(): 2-process data parallel", f"{seconds:.1f} s", "ok" if ok else "FAIL",
               f"{settings.ddp_steps} steps, {seen.get('backend', '?')}" if ok else f"rc={result.returncode}: {tail[0]}")


# ----------------------------------------------------------------------------------------------- predictor


def predict_defaults(predictor_class) -> dict:
    return {name: parameter.default.default for name, parameter in
            inspect.signature(predictor_class.predict).parameters.items() if name != "self"}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def render(predictor, inputs: dict):
    import numpy as np
    from PIL import Image

    (path,) = predictor.predict(**inputs)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def run_predictor(settings: CheckSettings, tar_a: Path, report: Report, tar_text_encoder: Path | None = None) -> None:
    import numpy as np

    from pti.models.base_model import synchronize
    from predict import Predictor

    spec = importlib.util.spec_from_file_location("bench_predict", ROOT / "bench" / "predict.py")
    bench_predict = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_predict  # dataclasses look their module up while the class is built
    spec.loader.exec_module(bench_predict)

    predictor = Predictor()
    report.add("predictor: setup()", f"{timed(predictor.setup):.1f} s", note="base + img2img/inpaint + safety "
               "checker; refiner on first use")
    device = predictor.models.runtime.device
    tar_b = bench_predict.write_tar(settings.work, predictor.models.txt2img, settings.rank, seed=2)
    first = timed(lambda: predictor.weights.use(str(tar_a), 0.6))
    report.add("predictor: first load of the trained tar", f"{first:.2f} s", note="extract, read, inject adapter")
    predictor.weights.use(str(tar_b), 0.6)
    switches = [timed(lambda t=(tar_a, tar_b)[i % 2]: predictor.weights.use(str(t), 0.6))
                for i in range(settings.switches)]
    report.add("predictor: switch A↔B", f"{statistics.median(switches) * 1000:.1f} ms",
               note=f"median of {settings.switches}")
    base = {**predict_defaults(Predictor), "prompt": "a photo of TOK", "width": settings.predict_size,
            "height": settings.predict_size, "seed": 0, "output_format": "png", "disable_safety_checker": True}
    render(predictor, {**base, "replicate_weights": str(tar_a), "num_inference_steps": settings.exact_steps})  # warm
    synchronize(device)
    latency = timed(lambda: render(predictor, {**base, "replicate_weights": str(tar_a),
                                               "num_inference_steps": settings.predict_steps}))
    report.add(f"predictor: {settings.predict_steps}-step {settings.predict_size}² image", f"{latency:.2f} s",
               note="trained weights active, watermark on, safety checker off (only its tiny stand-in is offline)")
    quick = {**base, "num_inference_steps": settings.exact_steps}
    a1 = render(predictor, {**quick, "replicate_weights": str(tar_a)})
    b = render(predictor, {**quick, "replicate_weights": str(tar_b)})
    a2 = render(predictor, {**quick, "replicate_weights": str(tar_a)})
    exact, differs = np.array_equal(a1, a2), not np.array_equal(a1, b)
    report.add("predictor: A→B→A exact", "yes" if exact else "no", "ok" if exact and differs else "FAIL",
               "B differs from A" if differs else "B renders the same as A: the switch did nothing")
    if tar_text_encoder is not None:
        before = render(predictor, {**quick, "replicate_weights": None})
        with_encoders = render(predictor, {**quick, "replicate_weights": str(tar_text_encoder)})
        after = render(predictor, {**quick, "replicate_weights": None})
        restored, changed = np.array_equal(before, after), not np.array_equal(before, with_encoders)
        report.add("predictor: text-encoder LoRA on, then off", "exact" if restored else "not exact",
                   "ok" if restored and changed else "FAIL",
                   "base → text-encoder-LoRA tar → base; the tar changes the image" if changed
                   else "the text-encoder-LoRA tar renders the base image")


# ---------------------------------------------------------------------------------------------------- main


def attempt(report: Report, check: str, action: Callable[[], object]):
    """Run one part; a failure becomes a FAIL row (one line) and the trace goes to stderr."""
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - the check reports every failure and goes on where it can
        traceback.print_exc()
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        report.add(check, "-", "FAIL", f"{type(error).__name__}: {message}"[:200])
        return None


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    if args.ddp_worker:
        configure_environment(settings, os.environ.get("SDXL_MODEL", "tiny"))
        ddp_worker(settings, Path(args.ddp_worker[0]), Path(args.ddp_worker[1]))
        return 0
    keep = args.work is not None
    settings.work.mkdir(parents=True, exist_ok=True)
    report = Report()
    started = time.perf_counter()
    try:
        attempt(report, "device", lambda: check_device(settings))
        if report.failed:
            return finish(report, settings, started)
        configure_environment(settings, "tiny")
        base = attempt(report, "base model", lambda: build_base_model(settings, report))
        if base is None:
            return finish(report, settings, started)
        configure_environment(settings, base)
        photos = write_photos(settings.work / "photos", settings.num_images, max(settings.resolution, 256))
        tar = attempt(report, "train()", lambda: run_training(settings, photos, report))
        attempt(report, "train(): 2-process data parallel", lambda: run_ddp_training(settings, photos, report))
        tar_text_encoder = attempt(report, "train(): text-encoder LoRA",
                                   lambda: run_text_encoder_training(settings, photos, report))
        if tar is None:
            report.add("predictor", "-", "FAIL", "not run: no trained tar")
        else:
            attempt(report, "predictor", lambda: run_predictor(settings, tar, report, tar_text_encoder))
        return finish(report, settings, started)
    finally:
        if not keep:
            shutil.rmtree(settings.work, ignore_errors=True)


def finish(report: Report, settings: CheckSettings, started: float) -> int:
    name = attempt(report, "device name", lambda: device_name(settings)) or settings.device
    report.add("whole check", f"{time.perf_counter() - started:.0f} s", "FAIL" if report.failed else "ok",
               "some check failed" if report.failed else "every check passed")
    print(f"GPU check: device={settings.device} ({name}), model={settings.model}")
    print(report.table(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
