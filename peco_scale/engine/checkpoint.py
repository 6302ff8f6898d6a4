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


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, engines: dict[str, Any], step: int, state: dict[str, Any],
             rank_state: dict[str, Any] | None = None) -> Path:
        """Save every engine, this rank's RNG and ``rank_state`` entries (``<name>_rank<r>.pt``), and
        (rank 0) ``state``; then publish."""
        tag = f"step_{step:08d}"
        folder = self.root / tag
        rank = pdist.rank()
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
