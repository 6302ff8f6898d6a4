"""One logger for every stage: console + metrics.jsonl, gated to rank 0 in one place."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("peco_scale")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere (so a rank's real problem still shows)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "%(asctime)s [%(levelname)s] %(message)s" if rank == 0 else f"%(asctime)s [rank {rank} %(levelname)s] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    # DeepSpeed's own logger is chatty at INFO on every rank
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl`` and shows a
    progress bar (rank 0 only; other ranks' calls are no-ops)."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int, start_step: int = 0):
        self.active = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._bar = None
        if self.active:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout,
                             disable=None, desc="train")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads as one run."""
        if not self.active or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {k: _jsonable(v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._bar is not None:
            shown = {k: row[k] for k in ("loss", "rec_loss", "percep_loss", "codebook_usage") if k in row}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
