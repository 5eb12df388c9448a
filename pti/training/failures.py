"""How a run fails: one line saying what failed, where, and what to change; the full trace goes to the log.

The trainer raises :class:`RunFailed` itself for faults it can name a step for (a non-finite loss or gradient, out
of GPU memory in a step). ``train()`` runs each of its stages inside :func:`stage`, which turns any other exception
into a :class:`RunFailed` after logging its trace. Every ``RunFailed`` is a ``ValueError``, like the one-line
refusals of bad input the rooms raise, so a caller (Cog, ``cog_local.py``) shows its message as the run's error.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

MEMORY_ADVICE = "lower train_batch_size or resolution, or set gradient_checkpointing=true"


class RunFailed(ValueError):
    """A run that stopped; the message is one line naming what failed, where, and what to change."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_finite(step: int, loss: float, grad_norm: float, learning_rates: dict[str, float],
                 full_precision: bool) -> None:
    """Stop the run before optimizer step ``step`` (1-based) applies a non-finite loss or gradient; the advice
    names the learning rates in use and, for a half-precision run, float32."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    rates = ", ".join(f"{name}={value:g}" for name, value in learning_rates.items())
    raise RunFailed(f"training stopped at step {step}: the {what} is not finite (loss {loss:g}, gradient norm "
                    f"{grad_norm:g}), so no weights were updated with it; lower the learning rate ({rates})"
                    + ("" if full_precision else " or train in float32 (precision fp32)"))


def out_of_memory(step: int, settings_in_use: str) -> RunFailed:
    """The error for a step that ran out of GPU memory (the caller raises it ``from`` the original error)."""
    return RunFailed(f"training step {step} ran out of GPU memory ({settings_in_use}); {MEMORY_ADVICE}")


def explain(error: Exception, stage_name: str) -> str:
    """One line for an exception raised while ``stage_name`` ran."""
    if isinstance(error, RunFailed):
        return first_line(error)
    if isinstance(error, torch.OutOfMemoryError):
        return f"{stage_name}: out of GPU memory; {MEMORY_ADVICE}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"{stage_name}: out of disk space{where}; free some disk space and run again"
    if isinstance(error, ValueError):  # the rooms' own refusals already say what to change, in one line
        return first_line(error)
    return f"{stage_name} failed: {type(error).__name__}: {first_line(error)} (full trace in the log)"


@contextmanager
def stage(stage_name: str) -> Iterator[None]:
    """Run a stage of ``train()``: an exception becomes a one-line :class:`RunFailed`, its trace goes to the log."""
    try:
        yield
    except Exception as error:
        logger.error("%s failed", stage_name, exc_info=True)
        raise RunFailed(explain(error, stage_name)) from error
