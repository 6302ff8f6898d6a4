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
    import warnings

    # emitted by DeepSpeed's ZeRO collectives on every step; not actionable by users
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def wandb_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as wandb keys: top-level numbers as they are, a dict of numbers
    (e.g. ``eval_IoU``, the per-class IoU) as one key per entry, ``eval_IoU/<class>``."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}/{sub}": x for sub, x in v.items() if isinstance(x, (int, float))})
    return out


class MetricsLogger:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl`` and shows a
    progress bar (rank 0 only; other ranks' calls are no-ops)."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int, start_step: int = 0,
                 wandb_cfg: dict[str, Any] | None = None):
        self.active = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        self.wandb_id: str | None = None
        if self.active and wandb_cfg is not None:
            self._wandb = _start_wandb(wandb_cfg)
            self.wandb_id = self._wandb.id
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
        if self._wandb is not None:
            self._wandb.log(wandb_scalars(row), step=int(row.get("step", 0)))
        if self._bar is not None:
            shown = {k: row[k] for k in ("loss", "mlm_acc", "rec_loss", "percep_loss", "codebook_usage") if k in row}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))})

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """An image file to wandb under ``key`` (rank 0, when wandb is on); the file is the record."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=int(step))

    def close(self, preempted: bool = False) -> None:
        """End the progress bar and the wandb run; ``preempted`` tells wandb the run will resume."""
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            if preempted:
                self._wandb.mark_preempting()
            self._wandb.finish()


def _start_wandb(cfg: dict[str, Any]):
    """wandb.init on rank 0: online with WANDB_API_KEY (or a prior login), offline otherwise;
    ``cfg['id']`` resumes a run (its id is kept in the checkpoints)."""
    import os

    try:
        import wandb
    except ImportError:
        raise RuntimeError("train.wandb=true but wandb is not installed; pip install 'peco-scale[wandb]' "
                           "or drop --train.wandb") from None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    log.info("wandb: %s mode, project %s", mode, cfg["project"])
    return wandb.init(project=cfg["project"], dir=cfg["dir"], config=cfg["config"], name=cfg["name"],
                      id=cfg.get("id"), resume="allow" if cfg.get("id") else None, mode=mode)
