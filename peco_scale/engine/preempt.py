"""Stop cleanly on SIGTERM, SIGINT or SIGUSR1: checkpoint at the next step boundary, then exit 75.

One signalled rank is enough: at the next step boundary all ranks agree on the flag, save
together and raise :class:`Interrupted`; the entry point exits with :data:`EXIT_REQUEUE` (75),
which ``launch/slurm/*.sbatch`` answers with a requeue. A signal that arrives while the model is
still being built is kept, not fatal (read it with :func:`current`); a second SIGINT stops at once.

Design notes: docs/design.md
"""

from __future__ import annotations

import math
import signal
import threading

import torch

from ..signals import STOP_SIGNALS
from . import dist as pdist
from .common import NonFiniteLoss

EXIT_REQUEUE = 75


class Interrupted(Exception):
    """A stop signal was honoured: the run saved a checkpoint at ``step`` and should be resumed."""

    def __init__(self, signame: str, step: int, total_steps: int, checkpoint: object):
        self.signame, self.step, self.total_steps, self.checkpoint = signame, step, total_steps, checkpoint
        super().__init__(f"stopped by {signame} after step {step} of {total_steps}; checkpoint {checkpoint} saved; "
                         f"rerun with --resume auto to continue (the launch/slurm/ scripts requeue the job, which does)")


_installed: list[StopFlag] = []


def current() -> StopFlag:
    """The flag whose handlers are installed, or a flag no signal sets (in-process callers)."""
    return _installed[-1] if _installed else StopFlag()


class StopFlag:
    """Context manager that installs the handlers (main thread only) and restores the old ones."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _installed.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _installed.remove(self)

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def check(self, loss: float, step: int, ckpt_root, device: torch.device) -> str | None:
        """One all-reduce per step: raise NonFiniteLoss on every rank if any rank's loss is not
        finite; otherwise the name of the stop signal if any rank received one, else None."""
        total, stops = pdist.all_reduce_sum([loss, 1.0 if self.signum is not None else 0.0], device)
        if not math.isfinite(total):
            raise NonFiniteLoss(f"non-finite loss {loss} at step {step}; stopped, and the last good checkpoint "
                                f"in {ckpt_root} is kept")
        if stops > 0:
            return self.name or "a signal to another rank"
        return None
