r"""Stage 3: fine-tune a pre-trained backbone for classification, under DeepSpeed.

    deepspeed launch/finetune.py --deepspeed_config ds_configs/finetune_zero2_vitb.json \
        --init runs/pretrain --data /path/to/imagenet/train --val /path/to/imagenet/val
    deepspeed launch/finetune.py --deepspeed_config ds_configs/finetune_zero3_vith448.json \
        --init runs/pretrain_vith/backbone.safetensors --data ... --val ... --model.ema true

--init takes a stage-2 run (or checkpoint) folder, an exported backbone.safetensors, or a timm
checkpoint file. Writes <train.output_dir>/{config.json, metrics.jsonl, checkpoints/} with
checkpoints/best naming the best-top-1 checkpoint; export it for timm with
`python -m peco_scale.export <run>/checkpoints/<best step>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.engine.entry import run_entry  # noqa: E402
from peco_scale.engine.finetune_config import FINETUNE_ALIASES, FinetuneConfig  # noqa: E402


def run(argv: list[str]) -> dict:
    from peco_scale.train.finetune import finetune
    from peco_scale.engine.finetune_config import config_from_argv, resolve_finetune

    cfg, ds_dict = config_from_argv(argv)
    resolve_finetune(cfg)  # every cheap check, before the process group or any model exists
    return finetune(cfg, ds_dict)


def report(summary: dict) -> None:
    ev = summary["eval"]
    print(f"metrics: {summary['metrics']}")
    if ev:
        print(f"eval: top-1 {ev['eval_top1']:.2f}% top-5 {ev['eval_top5']:.2f}% on {ev['eval_images']} images, "
              f"chance {100.0 / summary['num_classes']:.2f}% (best top-1 {summary['best']['top1']:.2f}% at step "
              f"{summary['best']['step']})")
    print(f"checkpoint: {summary['checkpoint']}")


def main(argv: list[str]) -> int:
    return run_entry(argv, __doc__, FinetuneConfig, FINETUNE_ALIASES, run, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
