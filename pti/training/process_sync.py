"""Waiting for work that other processes of a multi-process run do in a shared folder, through marker files.

A barrier (``wait_for_everyone``) held while one process preprocesses photos or generates class images for minutes
would run into the process group's timeout (NCCL: 10 minutes) and kill the run. Instead each process marks its part
done (or failed, with the one-line reason) with a file, and the others poll the folder: no collective is pending
while they wait. ``torchrun`` stops the remaining processes when one dies, so a waiter is never left alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.2
DEFAULT_TIMEOUT_SECONDS = 6 * 3600.0


class PeerFailed(RuntimeError):
    """Another process of the run failed at the shared step; the message is its one-line reason."""


@dataclass(frozen=True)
class SharedStep:
    """One step of a run that some processes do and all wait for: markers ``.sync-<run_id>-<name>.{done,failed}``
    in ``folder`` (the run id keeps a previous run's markers in a reused folder from counting)."""

    folder: Path
    run_id: str
    name: str

    def marker(self, part: str, state: str) -> Path:
        return Path(self.folder) / f".sync-{self.run_id}-{self.name}-{part}.{state}"

    def mark_done(self, part: str = "all") -> None:
        _write_atomically(self.marker(part, "done"), "")

    def mark_failed(self, message: str, part: str = "all") -> None:
        _write_atomically(self.marker(part, "failed"), message.strip().splitlines()[0] if message.strip() else "")

    def wait(self, parts: Iterable[str] = ("all",), poll_s: float = POLL_SECONDS,
             timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        """Return when every part is marked done; raise :class:`PeerFailed` as soon as one is marked failed."""
        pending = list(parts)
        deadline = time.monotonic() + timeout_s
        while pending:
            for part in list(pending):
                failed = self.marker(part, "failed")
                if failed.is_file():
                    reason = failed.read_text() or "no reason given"
                    raise PeerFailed(f"another process of the run failed at {self.name}: {reason}")
                if self.marker(part, "done").is_file():
                    pending.remove(part)
            if pending and time.monotonic() > deadline:
                raise PeerFailed(f"waited {timeout_s:.0f}s for {self.name} ({', '.join(pending)}) of the other "
                                 "processes; none finished or failed")
            if pending:
                time.sleep(poll_s)

    def clear(self) -> None:
        for path in Path(self.folder).glob(f".sync-{self.run_id}-{self.name}-*"):
            path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    staging.replace(path)
