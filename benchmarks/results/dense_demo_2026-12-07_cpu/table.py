"""Print the runs' evaluations from their metrics.jsonl files (in this folder, or in FOLDER):
detection box AP at each evaluation, then AP50 and mask AP at the last; segmentation mIoU at each;
for a stage-2 run (no evaluations) its loss at the last logged step.

    python table.py [FOLDER]
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv):
    folder = Path(argv[0]) if argv else HERE
    for path in sorted(folder.glob("*.metrics.jsonl")):
        name = path.name.removesuffix(".metrics.jsonl")
        every = [json.loads(line) for line in path.read_text().splitlines() if line]
        rows = [r for r in every if any(k.startswith("eval_") for k in r)]
        if not rows:
            losses = [r for r in every if "loss" in r]
            if losses:
                print(f"{name:10s} stage 2: loss {losses[-1]['loss']:.3f} at step {losses[-1]['step']}")
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
