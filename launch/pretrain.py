r"""Stage 2: masked image modeling over a frozen PeCo tokenizer, under DeepSpeed.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json \
        --data /path/to/imagenet --tokenizer runs/tokenizer/tokenizer.safetensors
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json \
        --model vit_pico_patch16 --img_size 64 --batch_size 8 --global_batch 16 --data DIR --tokenizer PATH

The recipe (--deepspeed_config) names the model, resolution, batch and optimizer; any key can
be overridden with --section.key VALUE (or --config FILE.yaml). Writes
<train.output_dir>/{config.json, metrics.jsonl, checkpoints/}; export a backbone for timm with
`python -m peco_scale.export <checkpoint> --out backbone.safetensors`.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.config import ConfigError, describe  # noqa: E402
from peco_scale.engine.logger import setup_logging  # noqa: E402


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from peco_scale.engine.stage2_config import STAGE2_ALIASES, Stage2Config

        print(__doc__)
        print("options (--config FILE.json|yaml, then --section.key VALUE overrides):")
        print("\n".join(describe(Stage2Config)))
        print("shorthands: " + ", ".join(f"--{k} = --{v}" for k, v in STAGE2_ALIASES.items()))
        return 0
    setup_logging(int(os.environ.get("RANK", "0")))
    from peco_scale.data import DataError
    from peco_scale.engine.common import NonFiniteLoss
    from peco_scale.engine.stage2 import pretrain
    from peco_scale.engine.stage2_config import config_from_argv, resolve_stage2

    try:
        cfg, ds_dict = config_from_argv(argv)
        resolve_stage2(cfg)  # every cheap check, before the process group or any model exists
        summary = pretrain(cfg, ds_dict)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
              f"mlm_acc {final.get('mlm_acc', float('nan')):.3f})")
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
