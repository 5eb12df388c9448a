"""Optional hooks into every training step: phase timing for benchmarks, replica checks for multi-process tests.

The trainer marks the phases of each step (``with hooks.phase("unet_forward"): ...``) and calls
``hooks.step_done(...)`` after each optimizer step. :class:`StepHooks` itself does nothing (the default);
:class:`PhaseTimer` records wall-clock seconds per phase and step, waiting for the device to finish (CUDA launches
asynchronously) so each phase is charged for its own work.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

PHASES = ("data", "text_encoders", "unet_forward", "backward", "optimizer")


class StepHooks:
    """No-op hooks: the trainer's default."""

    def phase(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def step_done(self, step: int, pivoted: bool) -> None:
        """Called after optimizer step number ``step`` (1-based); ``pivoted``: only the UNet trained in it."""


@dataclass
class StepRecord:
    step: int
    pivoted: bool
    seconds: dict[str, float]  # per phase
    step_seconds: float  # wall time since the previous step ended (includes work outside the phases)
    cpu_seconds: float  # CPU time of all this process's threads over the same span (steadier on a busy machine)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class PhaseTimer(StepHooks):
    """Records seconds per phase for every step; ``records`` holds one :class:`StepRecord` per finished step."""

    device: torch.device
    records: list[StepRecord] = field(default_factory=list)
    first_step_started: float | None = None  # time.perf_counter() when the first phase of the first step began
    first_step_cpu: float = 0.0  # time.process_time() at the same moment
    _current: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _last_step_end: float | None = None
    _last_step_cpu: float = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        if self.first_step_started is None:
            self.first_step_started = self._last_step_end = start
            self.first_step_cpu = self._last_step_cpu = time.process_time()
        try:
            yield
        finally:
            self._sync()
            self._current[name] += time.perf_counter() - start

    def step_done(self, step: int, pivoted: bool) -> None:
        self._sync()
        now, cpu = time.perf_counter(), time.process_time()
        self.records.append(StepRecord(step, pivoted, dict(self._current), now - (self._last_step_end or now),
                                       cpu - self._last_step_cpu))
        self._current = defaultdict(float)
        self._last_step_end, self._last_step_cpu = now, cpu
