"""Benchmark of the real trainer: seconds per training step before and after the pivot, split by phase, peak
memory, and the throughput of a whole short job including start-up.

    .venv/bin/python bench/train_step.py --model tiny --steps 8
    .venv/bin/python bench/train_step.py --model random-full --resolution 256 --steps 4 --precision bf16
    python bench/train_step.py --model random-full --device cuda --resolution 1024 --steps 20   # on a GPU

It drives :class:`trainer.Trainer` exactly as ``train_model`` does (create → run → export → tar), with a
:class:`step_hooks.PhaseTimer` attached, on a synthetic dataset of noise-textured images (or ``--dataset``).
Phases: ``data`` (batch assembly), ``text_encoders`` (prompt encoding, or the cache lookup after the pivot),
``unet_forward``, ``backward``, ``optimizer`` (clipping, step, zero_grad, embedding retraction); ``other`` is the
rest of the step (noise draws, loss maths, scheduler).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COG_SDXL_CACHE", str(ROOT / ".cache"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pti.training.step_hooks import PHASES, PhaseTimer, StepRecord  # noqa: E402


@dataclass(frozen=True)
class BenchSettings:
    model: str
    device: str | None
    precision: str
    resolution: int
    steps: int
    batch_size: int
    rank: int
    num_new_tokens: int
    ti_frac: float
    num_images: int
    sample_steps: int
    gradient_checkpointing: str
    compile_unet: bool
    dataset: Path | None
    threads: int | None


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, random-full, or any SDXL_MODEL value")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the job")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--num-new-tokens", type=int, default=2)
    parser.add_argument("--ti-frac", type=float, default=0.5)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=2, help="inference steps of the final sample image")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--compile-unet", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--dataset", type=Path, default=None, help="image folder (default: synthetic images)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    a = parser.parse_args(argv)
    return BenchSettings(a.model, a.device, a.precision, a.resolution, a.steps, a.batch_size, a.rank,
                         a.num_new_tokens, a.ti_frac, a.num_images, a.sample_steps, a.gradient_checkpointing,
                         a.compile_unet, a.dataset, a.threads)


def write_synthetic_images(folder: Path, count: int, size: int) -> Path:
    """``count`` smooth random-colour images (so the VAE sees image-like input), deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"img{index:02d}.png")
    return folder


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cuda_peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass
class JobTimes:
    startup: float  # Trainer.create: model load, tokens, latents, LoRA, optimizer
    to_first_step: float  # from the start of the job to the first phase of the first step
    cpu_to_first_step: float  # CPU seconds of this process (all threads) over the same span
    training: float  # Trainer.run
    export: float  # samples, loss curve, weight files, model card, tar
    total: float


def run_job(bench: BenchSettings, work: Path) -> tuple[list[StepRecord], JobTimes, "object"]:
    from pti.formats import export
    from pti.training import trainer as trainer_module
    dataset = bench.dataset or write_synthetic_images(work / "images", bench.num_images, bench.resolution)
    settings = trainer_module.TrainingSettings(
        dataset_dir=dataset, output_dir=work / "out", base_model=bench.model, precision=bench.precision,
        device=bench.device, resolution=bench.resolution, train_batch_size=bench.batch_size,
        max_train_steps=bench.steps, num_new_tokens=bench.num_new_tokens, ti_frac=bench.ti_frac,
        lora_rank=bench.rank, lr_warmup_steps=0, validation_num_inference_steps=bench.sample_steps,
        caption_prefix="a photo of TOK", show_progress=False, **_speed_settings(trainer_module, bench),
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer = trainer_module.Trainer.create(settings)
    created = time.perf_counter()
    timer = PhaseTimer(trainer.runtime.device)
    trainer.step_hooks = timer
    trainer.run()
    trained = time.perf_counter()
    trainer.export()
    if trainer.accelerator.is_main_process:
        export.pack_tar(settings.output_dir, work / "trained_model.tar")
    done = time.perf_counter()
    times = JobTimes(created - start, (timer.first_step_started or trained) - start,
                     timer.first_step_cpu - start_cpu, trained - created, done - trained, done - start)
    return timer.records, times, trainer


def _speed_settings(trainer_module, bench: BenchSettings) -> dict:
    """Settings this benchmark varies that only newer trainers know (left out when the trainer lacks them)."""
    checkpointing = {"auto": None, "on": True, "off": False}[bench.gradient_checkpointing]
    wanted = {"gradient_checkpointing": checkpointing, "compile_unet": bench.compile_unet}
    fields = trainer_module.TrainingSettings.__dataclass_fields__
    return {key: value for key, value in wanted.items() if key in fields}


def phase_table(records: list[StepRecord]) -> str:
    """Mean seconds per phase, before and after the pivot (the first step of each side is shown apart: it
    includes one-off work such as the pivot's caption encoding)."""
    columns = [*PHASES, "other", "step", "step CPU"]
    rows = []
    for label, pivoted in (("before pivot", False), ("after pivot", True)):
        side = [r for r in records if r.pivoted == pivoted]
        if not side:
            continue
        rows.append((f"{label}: first step", [_cell(side[0], c) for c in columns]))
        if len(side) > 1:
            rest = side[1:]
            rows.append((f"{label}: mean of {len(rest)} more", [statistics.mean(_cell(r, c) for r in rest) for c in columns]))
    width = max(len(label) for label, _ in rows) if rows else 10
    lines = [f"{'seconds per step':<{width}} " + " ".join(f"{c:>13}" for c in columns)]
    for label, values in rows:
        lines.append(f"{label:<{width}} " + " ".join(f"{v:13.3f}" for v in values))
    return "\n".join(lines)


def _cell(record: StepRecord, column: str) -> float:
    if column == "step":
        return record.step_seconds
    if column == "step CPU":
        return record.cpu_seconds
    if column == "other":
        return record.step_seconds - record.total
    return record.seconds.get(column, 0.0)


def summary_table(bench: BenchSettings, records: list[StepRecord], times: JobTimes, trainer) -> str:
    runtime = trainer.runtime
    steady = [r.step_seconds for r in records[1:]] or [r.step_seconds for r in records]
    facts = [
        ("model", bench.model),
        ("device / weights dtype", f"{runtime.device} / {runtime.dtype}"),
        ("resolution, batch, rank, new tokens", f"{bench.resolution}, {bench.batch_size}, {bench.rank}, "
                                               f"{bench.num_new_tokens}"),
        ("steps (pivot after)", f"{len(records)} ({trainer.plan.pivot_step})"),
        ("gradient checkpointing", str(_checkpointing_on(trainer.unet))),
        ("torch threads", str(torch.get_num_threads())),
        ("start-up s (load, latents, LoRA)", f"{times.startup:.2f}"),
        ("job start to first step s (CPU s)", f"{times.to_first_step:.2f} ({times.cpu_to_first_step:.2f})"),
        ("training loop s", f"{times.training:.2f}"),
        ("export s (samples, files, tar)", f"{times.export:.2f}"),
        ("whole job s", f"{times.total:.2f}"),
        ("mean step s (all but the first)", f"{statistics.mean(steady):.3f}"),
        ("steps/s, whole job", f"{len(records) / times.total:.4f}"),
        ("steps/s, training loop", f"{len(records) / times.training:.4f}"),
        ("peak RSS GB", f"{peak_rss_gb():.2f}"),
        ("load average at the end (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"),
    ]
    cuda_peak = cuda_peak_gb(runtime.device)
    if cuda_peak is not None:
        facts.append(("CUDA peak allocated GB", f"{cuda_peak:.2f}"))
    width = max(len(k) for k, _ in facts)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts)


def _checkpointing_on(unet) -> bool:
    return bool(getattr(unet, "is_gradient_checkpointing", False))


def main(argv: list[str] | None = None) -> None:
    bench = parse_args(argv)
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        records, times, trainer = run_job(bench, Path(tmp))
        if trainer.accelerator.is_main_process:
            sys.stderr.flush()
            print("\n$ " + " ".join(["python", *sys.argv]))
            print(phase_table(records))
            print()
            print(summary_table(bench, records, times, trainer))


if __name__ == "__main__":
    main()
