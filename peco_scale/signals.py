"""The stop signals, and the worker-side helper that ignores them.

Below both ``peco_scale.engine`` (which installs the main process's handlers, see
``engine/preempt.py``) and ``peco_scale.data`` (whose loader workers ignore the signals), so
neither package imports the other for it. Standard library only.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """For data-loader worker processes: SLURM signals every process of a job step, and a
    worker killed by SIGUSR1's default action would take the training step down with it.
    The main process decides when to stop; its workers follow. Usable as a DataLoader
    ``worker_init_fn``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
