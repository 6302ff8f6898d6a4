"""Plot a run's metrics.jsonl to a PNG, for people who would rather look than read.

    python -m peco_scale.tools.plot runs/pretrain [--out runs/pretrain/metrics.png]

Works for any stage: one panel per group of metrics that the run logged -- losses, accuracies
(mlm_acc, train/eval top-1, EMA), codebook health (usage, perplexity), throughput (images/s) --
against the optimizer step. metrics.jsonl stays the ground truth; the PNG is written to a temp
name and renamed. Needs matplotlib (the ``plot`` extra; in ``dev``).

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "rec_loss", "percep_loss", "commit_loss", "eval_loss", "ema_eval_loss"),
    "accuracy": ("mlm_acc", "train_top1", "eval_top1", "ema_eval_top1", "eval_top5"),
    "codebook": ("codebook_usage", "perplexity"),
    "throughput (images/s)": ("images_per_s",),
}


class PlotError(ValueError):
    """A run folder without usable metrics."""


def read_series(metrics: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} of every numeric, finite value in a metrics.jsonl."""
    if not metrics.is_file():
        raise PlotError(f"'{metrics}' does not exist; pass a run folder that has a metrics.jsonl "
                        f"(train.output_dir of a run)")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"line {n} of '{metrics}' is not JSON; the file is damaged") from None
        step = row.get("step")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and step is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return series


def plot_run(run: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, list[str]]]:
    """Write the PNG; returns (its path, {panel title: metrics drawn in it})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    series = read_series(run / "metrics.jsonl")
    panels = {title: [k for k in keys if k in series] for title, keys in PANELS.items()}
    panels = {t: ks for t, ks in panels.items() if ks}
    if not panels:
        raise PlotError(f"'{run / 'metrics.jsonl'}' has none of the plotted metrics "
                        f"({', '.join(k for ks in PANELS.values() for k in ks)})")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels.items()):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run), fontsize=10)
    fig.tight_layout()
    target = Path(out) if out else run / "metrics.png"
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, target)
    return target, panels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.tools.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run folder (holds metrics.jsonl)")
    ap.add_argument("--out", default=None, help="PNG path (default: <run>/metrics.png)")
    args = ap.parse_args(argv)
    try:
        path, panels = plot_run(args.run, args.out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: plotting needs matplotlib; pip install -e '.[plot]'", file=sys.stderr)
        return 2
    drawn = "; ".join(f"{title}: {', '.join(keys)}" for title, keys in panels.items())
    print(f"wrote {path} ({drawn})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
