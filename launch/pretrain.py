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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.engine.entry import run_entry  # noqa: E402
from peco_scale.engine.stage2_config import STAGE2_ALIASES, Stage2Config  # noqa: E402


def run(argv: list[str]) -> dict:
    from peco_scale.train.pretrain import pretrain
    from peco_scale.engine.stage2_config import config_from_argv, resolve_stage2

    cfg, ds_dict = config_from_argv(argv)
    resolve_stage2(cfg)  # every cheap check, before the process group or any model exists
    return pretrain(cfg, ds_dict)


def report(summary: dict) -> None:
    final = summary["final"]
    print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
          f"mlm_acc {final.get('mlm_acc', float('nan')):.3f})")
    print(f"checkpoint: {summary['checkpoint']}")


def main(argv: list[str]) -> int:
    return run_entry(argv, __doc__, Stage2Config, STAGE2_ALIASES, run, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
