"""SIGTERM / SIGINT (a scheduler's pre-emption, Ctrl-C): finish the step, checkpoint, exit for requeue.

The first signal is only noted; the loop checks ``requested`` after each step, saves, and raises
``Preempted`` with the exit status a scheduler requeues on. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from trainer.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """A context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self, requeue_exit_code: Optional[int] = None):
        self.requeue_exit_code = requeue_exit_code
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(self.exit_code(signum))
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Another rank was signalled: stop here too (at the same step)."""
        if self.signum is None:
            self.signum = signum

    def exit_code(self, signum: int) -> int:
        return self.requeue_exit_code if self.requeue_exit_code is not None else 128 + signum

    def stopped(self, step: int, checkpoint) -> Preempted:
        code = self.exit_code(self.signum)
        return Preempted(f"{signal.Signals(self.signum).name} at step {step}: checkpoint saved to {checkpoint}; "
                         f"exiting with status {code} (requeue: the same command resumes)", code)
