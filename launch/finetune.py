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

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.config import ConfigError, describe  # noqa: E402
from peco_scale.engine.logger import setup_logging  # noqa: E402


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from peco_scale.engine.finetune_config import FINETUNE_ALIASES, FinetuneConfig

        print(__doc__)
        print("options (--config FILE.json|yaml, then --section.key VALUE overrides):")
        print("\n".join(describe(FinetuneConfig)))
        print("shorthands: " + ", ".join(f"--{k} = --{v}" for k, v in FINETUNE_ALIASES.items()))
        return 0
    setup_logging(int(os.environ.get("RANK", "0")))
    from peco_scale.data import DataError
    from peco_scale.engine.common import NonFiniteLoss
    from peco_scale.engine.finetune import finetune
    from peco_scale.engine.finetune_config import config_from_argv, resolve_finetune

    try:
        cfg, ds_dict = config_from_argv(argv)
        resolve_finetune(cfg)  # every cheap check, before the process group or any model exists
        summary = finetune(cfg, ds_dict)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        ev = summary["eval"]
        print(f"metrics: {summary['metrics']}")
        if ev:
            print(f"eval: top-1 {ev['eval_top1']:.2f}% top-5 {ev['eval_top5']:.2f}% on {ev['eval_images']} images, "
                  f"chance {100.0 / summary['num_classes']:.2f}% (best top-1 {summary['best']['top1']:.2f}% at step "
                  f"{summary['best']['step']})")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
