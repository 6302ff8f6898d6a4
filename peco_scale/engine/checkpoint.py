"""One checkpoint manager: DeepSpeed engines + run state + per-rank RNG, published atomically.

A ``<run>/checkpoints/step_XXXXXXXX`` folder counts only once rank 0 has written its ``COMPLETE``
file (every file with its size); ``latest`` is replaced atomically, and ``find_resume`` verifies
that list and falls back, with a warning, to the previous complete checkpoint. Loading never
unpickles arbitrary objects (:func:`safe_load`, :func:`verify_pickles`). A full disk stops the
run with :class:`CheckpointError` before anything is written. ``save`` must be called on every
rank.

Design notes: docs/design.md
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

from ..config import ConfigError
from . import dist as pdist
from .logger import log

_TAG = re.compile(r"^step_(\d{8})$")
BYTES_PER_PARAM = 16  # fp32 master + Adam's two moments + the 16/32-bit module weights, rounded up
SPACE_MARGIN = 1.1
_WARNED: set = set()  # damaged folders already reported by this process


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


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds Python objects outside the allow-list; it was not loaded."""


def _allowed_globals() -> list[Any]:
    """What this project's checkpoint files hold besides tensors and plain containers: numpy's
    RNG state (arrays) and DeepSpeed's small records (loss scaler, ZeRO stage, fragment address)."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("uint32", "float32", "int64")]  # numpy >= 1.25 dtype classes
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


def safe_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` of a file this project (or DeepSpeed) wrote, without running code from it:
    ``weights_only=True`` with :func:`_allowed_globals`; anything else raises
    :class:`UnsafeCheckpoint` naming the file and the offending type."""
    import pickle

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UnsafeCheckpoint(f"{path} holds objects a checkpoint of this project never contains ({first[:200]}); "
                               f"refusing to load it, since unpickling it could run code. Use checkpoints written "
                               f"by peco-scale, or a .safetensors file") from None


def verify_pickles(folder: Path) -> None:
    """Read every ``.pt`` under ``folder`` with :func:`safe_load` (memory-mapped, so tensors are
    not read): after this, handing the folder to DeepSpeed's own loaders runs no foreign code."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            safe_load(path, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            safe_load(path)


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "COMPLETE"}


def verify_folder(folder: Path) -> str:
    """'' when ``folder`` is complete and every file COMPLETE lists is there with its size, else
    what is wrong. A marker of an older version (the step alone) lists nothing and passes."""
    marker = folder / "COMPLETE"
    if not marker.is_file():
        return "no COMPLETE marker"
    try:
        listed = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):
        return ""
    for name, size in listed.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return ""


def complete_tags(root: Path) -> list[str]:
    """Names of complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(tags)


def find_resume(root: Path) -> Path | None:
    """The newest complete checkpoint whose files all verify (:func:`verify_folder`): ``latest``
    if it names one, else the newest such folder; a damaged one is skipped with a warning."""
    latest = root / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named is not None and not (root / named / "COMPLETE").is_file():
        log.warning("checkpoint %s named by %s is incomplete; scanning for the newest complete one", named, latest)
    tags = complete_tags(root)
    if named in tags:  # normally the newest; try it first
        tags = [t for t in tags if t != named] + [named]
    for tag in reversed(tags):
        problem = verify_folder(root / tag)
        if not problem:
            return root / tag
        if (root / tag, problem) not in _WARNED:
            _WARNED.add((root / tag, problem))
            log.warning("checkpoint %s is damaged (%s); falling back to the previous complete checkpoint",
                        root / tag, problem)
    return None


def check_writable(root: Path, what: str = "--train.output_dir") -> None:
    """Create ``root`` and write, sync and remove a probe file in it: an unwritable or read-only
    output folder is one line at start, not an error at the first checkpoint hours later."""
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
                _atomic_write_text(folder / "COMPLETE", json.dumps({"step": step, "files": _manifest(folder)}))
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
        """Load engines and this rank's RNG from ``folder``; returns the saved state dict. Every
        pickle in the folder is checked by :func:`verify_pickles` before DeepSpeed reads it."""
        verify_pickles(folder)
        state = json.loads((folder / "state.json").read_text())
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"checkpoint {folder} has no '{name}' engine state; it was written by a different set-up")
        rng_file = folder / f"rng_rank{pdist.rank()}.pt"
        if rng_file.is_file():
            set_rng_state(safe_load(rng_file))
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?); continuing with fresh RNG",
                        pdist.rank(), folder)
        return state

    @staticmethod
    def load_rank_state(folder: Path, name: str) -> Any:
        """This rank's ``rank_state[name]`` saved in ``folder`` (None when absent)."""
        path = folder / f"{name}_rank{pdist.rank()}.pt"
        return safe_load(path) if path.is_file() else None


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` held by rank 0 for the whole run, so a second run
    into the same folder refuses to start instead of overwriting checkpoints and interleaving
    metrics. The kernel drops the lock when the process ends however it ends (crash, kill,
    preemption, SLURM requeue), so it is never left stuck; the file itself only says who held it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> str:
        """'' when this process now holds the lock, else who holds it."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def lock_run_folder(run_dir: Path, device) -> RunLock:
    """Rank 0 takes :class:`RunLock`; all ranks learn the outcome (one all-reduce) and, if another
    run holds the folder, raise the same one-line error together."""
    lock = RunLock(run_dir)
    holder = lock.acquire() if pdist.rank() == 0 else ""
    if pdist.all_reduce_sum([float(bool(holder))], device)[0] > 0:
        holder = pdist.broadcast_object(holder)
        err = ConfigError(f"{run_dir} is in use by another run ({holder}); wait for it to end, or choose another "
                          f"--train.output_dir")
        err.all_ranks = True  # agreed: printed once
        raise err
    return lock

