r"""Stage 2: masked image modeling over a frozen PeCo tokenizer, under DeepSpeed.

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json \
        --data /path/to/imagenet --tokenizer runs/tokenizer/tokenizer.safetensors
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json \
        --model vit_pico_patch16 --img_size 64 --batch_size 8 --global_batch 16 --data DIR --tokenizer PATH

The recipe (--deepspeed_config) names the model, resolution, batch and optimizer; any key can
be overridden with --section.key VALUE (or --config FILE.yaml). Writes
<train.output_dir>/{config.json, metrics.jsonl, checkpoints/}; export a backbone for timm with
`python -m peco_scale.tools.export <checkpoint> --out backbone.safetensors`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.train.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("pretrain", sys.argv[1:], __doc__))
