"""Print the runs' evaluations from their metrics.jsonl files (in this folder):
detection box AP at each evaluation, then AP50 and mask AP at the last; segmentation mIoU at each.

    python table.py
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def evals(name):
    return [r for r in map(json.loads, (HERE / f"{name}.metrics.jsonl").read_text().splitlines())
            if any(k.startswith("eval_") for k in r)]


def main(argv):
    for path in sorted(HERE.glob("*.metrics.jsonl")):
        name = path.name.removesuffix(".metrics.jsonl")
        rows = evals(name)
        if not rows:
            continue
        last = rows[-1]
        if "eval_bbox_AP" in last:
            steps = " / ".join(f"{r['eval_bbox_AP']:.2f}" for r in rows)
            print(f"{name:10s} box AP {steps}; at step {last['step']}: AP50 {last['eval_bbox_AP50']:.2f}, "
                  f"mask AP {last['eval_segm_AP']:.2f}")
        elif "eval_mIoU" in last:
            steps = " / ".join(f"{r['eval_mIoU']:.2f}" for r in rows)
            print(f"{name:10s} mIoU {steps}")


if __name__ == "__main__":
    main(sys.argv[1:])
