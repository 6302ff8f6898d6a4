"""One checkpoint manager: DeepSpeed engines + run state + per-rank RNG, published atomically.

Layout under ``<run>/checkpoints``::

    step_00000100/
        model/ ...            DeepSpeed files of engine "model" (all ranks write their part)
        disc/  ...            another engine, if any
        rng_rank0.pt ...      each rank's RNG states
        ema_rank0.pt ...      other per-rank state (``rank_state``), e.g. an EMA's partitions
        state.json            step, config, client state (rank 0)
        COMPLETE              written last, by rank 0, after a barrier
    latest                    name of the newest COMPLETE folder, replaced atomically

A save killed midway leaves a folder without COMPLETE, which ``find_resume`` never picks.
``save`` must be called on every rank (DeepSpeed hangs otherwise).

Disk space: ``check_output`` (at start) stops with one line when the folder is not writable or
cannot hold one checkpoint; before each save every rank checks the free space against the size
of the previous checkpoint (or 16 bytes per parameter before the first) and all ranks agree, so a
full disk stops the run with :class:`CheckpointError` before anything is written, keeping the
previous checkpoint. A write that fails anyway (a quota, another job filling the disk) raises the
same error on the rank that saw it; its peers then fail in their next collective.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist as pdist
from .logger import log

_TAG = re.compile(r"^step_(\d{8})$")
BYTES_PER_PARAM = 16  # fp32 master + Adam's two moments + the 16/32-bit module weights, rounded up
SPACE_MARGIN = 1.1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is kept."""


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(root: Path) -> list[str]:
    """Names of complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(tags)


def find_resume(root: Path) -> Path | None:
    """The newest complete checkpoint: ``latest`` if it names a complete one, else a scan."""
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / "COMPLETE").is_file():
            return root / tag
        log.warning("checkpoint %s named by %s is incomplete; scanning for the newest complete one", tag, latest)
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def check_writable(root: Path, what: str = "--train.output_dir") -> None:
    """Create ``root`` and write, sync and remove a probe file in it: an unwritable or read-only
    output folder is one line at start, not an error at the first checkpoint hours later."""
    from ..config import ConfigError

    probe = root / f".write_probe.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"peco")
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {root} is not writable ({exc.strerror or exc}); fix its permissions or "
                          f"choose another {what}") from None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last
        self.expected_bytes = 0
        self.device = None

    def check_output(self, n_params: int, device) -> None:
        """At start, on every rank (collective): the checkpoint folder is writable and has room for
        one checkpoint of ``n_params`` parameters (or of the newest complete one's measured size)."""
        from ..config import ConfigError

        self.device = device
        check_writable(self.root)
        latest = find_resume(self.root)
        self.expected_bytes = folder_bytes(latest) if latest is not None else BYTES_PER_PARAM * n_params
        short = self._short_of_space()
        if short:
            err = ConfigError(f"{short}; free space there or choose another --train.output_dir")
            err.all_ranks = True  # agreed: printed once
            raise err

    def _short_of_space(self) -> str:
        """'' when every rank's checkpoint folder has room for the expected checkpoint, else the
        reason; agreed over ranks (one all-reduce) so that all of them act on it together."""
        need = int(self.expected_bytes * SPACE_MARGIN)
        free = shutil.disk_usage(self.root).free
        ranks_with_room = pdist.all_reduce_sum([float(free >= need)], self.device or "cpu")[0]
        if ranks_with_room >= pdist.world_size():
            return ""
        return (f"{self.root} has {_size(free)} free on rank {pdist.rank()} (or less on another rank); a checkpoint of "
                f"this run needs about {_size(need)}")

    def save(self, engines: dict[str, Any], step: int, state: dict[str, Any],
             rank_state: dict[str, Any] | None = None) -> Path:
        """Save every engine, this rank's RNG and ``rank_state`` entries (``<name>_rank<r>.pt``), and
        (rank 0) ``state``; then publish."""
        tag = f"step_{step:08d}"
        folder = self.root / tag
        rank = pdist.rank()
        kept = find_resume(self.root)
        keeping = f"the newest complete checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
        short = self._short_of_space() if self.expected_bytes else ""
        if short:
            err = CheckpointError(f"checkpoint at step {step} not written: {short}; {keeping}; free space, then "
                                  f"rerun with --resume auto")
            err.all_ranks = True  # agreed: printed once
            raise err
        try:
            if rank == 0 and folder.exists():
                shutil.rmtree(folder)  # a leftover of a killed save at this same step
            pdist.barrier()
            for name, engine in engines.items():
                engine.save_checkpoint(str(folder), tag=name, save_latest=False)
            torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
            for name, obj in (rank_state or {}).items():
                torch.save(obj, folder / f"{name}_rank{rank}.pt")
            pdist.barrier()
            if rank == 0:
                _atomic_write_text(folder / "state.json", json.dumps({"step": step, **state}, indent=1))
                _atomic_write_text(folder / "COMPLETE", f"{step}\n")
                _atomic_write_text(self.root / "latest", tag + "\n")
                self._prune(keep=tag)
            pdist.barrier()
        except (OSError, RuntimeError) as exc:  # torch.save wraps ENOSPC in a RuntimeError
            raise CheckpointError(f"checkpoint at step {step} failed on rank {rank}: {exc}; {keeping} (the partial "
                                  f"{folder.name} has no COMPLETE marker and is never resumed from)") from exc
        if self.expected_bytes:
            self.expected_bytes = folder_bytes(folder)  # measured: the next save needs about as much
        return folder

    def mark_best(self, tag: str) -> None:
        """Name ``tag`` in ``<root>/best`` (rank 0); pruning never removes the checkpoint it names."""
        if pdist.rank() == 0:
            _atomic_write_text(self.root / "best", tag + "\n")

    def _prune(self, keep: str) -> None:
        """Drop all but the newest ``keep_last`` complete checkpoints (and the ``best`` one) and stale partial ones."""
        tags = complete_tags(self.root)
        best = (self.root / "best").read_text().strip() if (self.root / "best").is_file() else None
        doomed = set(tags[: max(0, len(tags) - self.keep_last)]) - {best}
        for p in self.root.iterdir():
            if _TAG.match(p.name) and p.name != keep and (p.name in doomed or not (p / "COMPLETE").is_file()):
                if p.name < keep:
                    shutil.rmtree(p, ignore_errors=True)

    def load(self, folder: Path, engines: dict[str, Any]) -> dict[str, Any]:
        """Load engines and this rank's RNG from ``folder``; returns the saved state dict."""
        state = json.loads((folder / "state.json").read_text())
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"checkpoint {folder} has no '{name}' engine state; it was written by a different set-up")
        rng_file = folder / f"rng_rank{pdist.rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?); continuing with fresh RNG",
                        pdist.rank(), folder)
        return state

    @staticmethod
    def load_rank_state(folder: Path, name: str) -> Any:
        """This rank's ``rank_state[name]`` saved in ``folder`` (None when absent)."""
        path = folder / f"{name}_rank{pdist.rank()}.pt"
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
