"""Collect an array job's (or any set of) runs into one table.

    python -m peco_scale.tools.collect runs/sweeps/lambda-1234          # table to stdout and <dir>/summary.md
    python -m peco_scale.tools.collect runs/sweeps/lambda-1234/lambda_1 --line   # one run, one line
    python -m peco_scale.tools.collect runs/sweeps/targets-1234/mae --pipeline   # merge one pipeline task

A training run is a folder with ``config.json``; a finished one also has ``summary.json``
(written by every launch/ entry point). Its row holds the config values that differ between the
collected runs (e.g. ``loss.perceptual_weight`` in a lambda sweep), the step count and the final
metrics; a run without ``summary.json`` is listed as unfinished with its last logged step, so a
failed or still-running task is visible rather than missing. A benchmark task is a folder with
``results.jsonl`` (``python -m peco_kernels.bench --results``); its rows are listed as they are.

``--pipeline FOLDER`` merges one task of a pipeline sweep (``launch/slurm/sweep_targets.sbatch``:
``pretrain/`` run, ``linear.json`` probe result, ``finetune/`` run) into one run: it writes
``FOLDER/config.json`` (the pre-training config) and ``FOLDER/summary.json`` (pre-training steps
and loss, linear-probe top-1 and chance, fine-tune best and last top-1, all in %), so the sweep
folder collects into one table whose config column is the swept ``model.task``.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

SKIP_METRICS = {"step", "epoch", "lr", "codebook_in_sync", "skipped_images", "eval_images", "eval_skipped", "mem_gb"}
SKIP_CONFIG = {"train.output_dir", "train.resume"}
BENCH_COLUMNS = ("kernel", "variant", "shape", "phase", "dtype", "ms", "tflops", "fraction_of_peak", "peak_mem_mb",
                 "device")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_step(run: Path) -> int | None:
    step = None
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            step = json.loads(line).get("step", step)
        except ValueError:
            continue
    return step


def find_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """(training run folders, benchmark folders) at or below ``root`` (a run's own checkpoints
    are not searched)."""
    runs, benches = [], []

    def visit(d: Path, depth: int) -> None:
        if (d / "config.json").is_file() or (d / "summary.json").is_file():
            runs.append(d)
            return
        if (d / "results.jsonl").is_file():
            benches.append(d)
            return
        if depth < 4:
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                visit(sub, depth + 1)

    visit(root, 0)
    return runs, benches


def run_rows(runs: list[Path], root: Path) -> list[dict[str, Any]]:
    configs = {r: _flatten(_read_json(r / "config.json") or {}) for r in runs}
    keys = sorted({k for c in configs.values() for k in c} - SKIP_CONFIG)
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    rows = []
    for r in runs:
        name = str(r.relative_to(root)) if r != root else r.name
        row: dict[str, Any] = {"run": name, **{k: configs[r].get(k) for k in varying}}
        summary = _read_json(r / "summary.json")
        if summary is None:
            last = _last_step(r)
            row["status"] = f"unfinished (last logged step {last})" if last is not None else "unfinished (no steps)"
        else:
            row["status"] = "done"
            row["steps"] = summary.get("steps")
            for section in ("final", "eval"):
                for k, v in (summary.get(section) or {}).items():
                    if k not in SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[k] = v
        rows.append(row)
    return rows


def bench_rows(benches: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for b in benches:
        for line in (b / "results.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rows.append({k: rec.get(k) for k in BENCH_COLUMNS if k in rec})
    return rows


def merge_pipeline(folder: Path) -> dict[str, Any]:
    """Write ``folder/config.json`` and ``folder/summary.json`` from its pretrain / linear.json /
    finetune parts (see the module doc); returns the summary. ValueError (one line) when the
    pre-training part is missing or unfinished."""
    cfg, pre = _read_json(folder / "pretrain" / "config.json"), _read_json(folder / "pretrain" / "summary.json")
    if cfg is None or pre is None:
        raise ValueError(f"{folder / 'pretrain'} holds no finished pre-training run (config.json and summary.json); "
                         f"run the pipeline's first step before merging")
    final: dict[str, Any] = {"pretrain_loss": (pre.get("final") or {}).get("loss")}
    linear = _read_json(folder / "linear.json")
    if linear is not None:
        final.update(linear_top1=100.0 * linear["top1"], chance=100.0 * linear["chance"])
    ft = _read_json(folder / "finetune" / "summary.json")
    if ft is not None:
        final.update(finetune_top1=(ft.get("best") or {}).get("top1"),
                     finetune_last_top1=(ft.get("eval") or {}).get("eval_top1"))
    summary = {"run_dir": str(folder), "steps": pre.get("steps"), "final": final}
    for name, content in (("config.json", cfg), ("summary.json", summary)):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(json.dumps(content, indent=1))
        tmp.replace(folder / name)
    return summary


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def one_line(row: dict[str, Any]) -> str:
    return row["run"] + ": " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "run")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.tools.collect", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="an array job's folder (its tasks' run folders below it), or one run")
    ap.add_argument("--line", action="store_true", help="one line per run, nothing written")
    ap.add_argument("--out", default="", help="markdown table file (default <folder>/summary.md)")
    ap.add_argument("--pipeline", action="store_true", help="merge one pipeline task folder (pretrain/, linear.json, "
                                                            "finetune/) into one run, then print its line")
    args = ap.parse_args(argv)
    root = Path(args.folder)
    if not root.is_dir():
        print(f"error: {root} is not a folder; pass the array job's output folder (e.g. runs/sweeps/lambda-<id>)",
              file=sys.stderr)
        return 2
    if args.pipeline:
        try:
            merge_pipeline(root)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(one_line(run_rows([root], root)[0]))
        return 0
    runs, benches = find_runs(root)
    if not runs and not benches:
        print(f"error: no runs under {root}: no config.json, summary.json or results.jsonl found; did the "
              f"array's tasks write elsewhere (SWEEP_DIR)?", file=sys.stderr)
        return 2
    parts = []
    rows = run_rows(runs, root) if runs else []
    brows = bench_rows(benches)
    if args.line:
        for row in rows:
            print(one_line(row))
        for row in brows:
            print(one_line({"run": row.get("shape", ""), **row}))
        return 0
    if rows:
        parts.append(markdown(rows))
    if brows:
        parts.append(markdown(brows))
    text = "\n\n".join(parts) + "\n"
    print(text, end="")
    out = Path(args.out) if args.out else root / "summary.md"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    done = sum(r["status"] == "done" for r in rows)
    print(f"{len(rows)} run(s), {done} finished; {len(brows)} benchmark row(s); table written to {out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
