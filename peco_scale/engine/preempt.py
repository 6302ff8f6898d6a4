"""Stop cleanly on SIGTERM, SIGINT or SIGUSR1: checkpoint at the next step boundary, then exit 75.

SLURM sends SIGTERM on preemption and at the time limit, and ``--signal=USR1@SECONDS`` sends
SIGUSR1 that long before the limit; Ctrl-C is SIGINT. The handler only sets a flag: a
checkpoint cannot be written from inside a signal handler, and under ZeRO every rank must save
together. At each step boundary the ranks agree on the flag in the all-reduce they already do for
the non-finite-loss check, so one signalled rank is enough and no rank is left waiting in a
collective. The loop then saves on every rank and raises :class:`Interrupted`; the entry point
exits with :data:`EXIT_REQUEUE` (75, EX_TEMPFAIL), which ``launch/slurm/*.sbatch`` answers with
``scontrol requeue``, and the restarted job continues with ``--resume auto``.

The entry points (``engine/entry.run_entry``) install the handlers before anything else, so a
signal that arrives while the model is still being built is kept, not fatal; the loops read the
installed flag through :func:`current`. A second SIGINT while the first is being handled stops at
once (KeyboardInterrupt), as users of a terminal expect.
"""

from __future__ import annotations

import math
import signal
import threading

import torch

from . import dist as pdist
from .common import NonFiniteLoss

EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(Exception):
    """A stop signal was honoured: the run saved a checkpoint at ``step`` and should be resumed."""

    def __init__(self, signame: str, step: int, total_steps: int, checkpoint: object):
        self.signame, self.step, self.total_steps, self.checkpoint = signame, step, total_steps, checkpoint
        super().__init__(f"stopped by {signame} after step {step} of {total_steps}; checkpoint {checkpoint} saved; "
                         f"rerun with --resume auto to continue (the launch/slurm/ scripts requeue the job, which does)")


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """For data-loader worker processes: SLURM signals every process of a job step, and a
    worker killed by SIGUSR1's default action would take the training step down with it.
    The main process decides when to stop; its workers follow. Usable as a DataLoader
    ``worker_init_fn``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
