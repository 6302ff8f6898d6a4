r"""Stage 3: fine-tune a pre-trained backbone for classification, under DeepSpeed.

    deepspeed launch/finetune.py --deepspeed_config ds_configs/finetune_zero2_vitb.json \
        --init runs/pretrain --data /path/to/imagenet/train --val /path/to/imagenet/val
    deepspeed launch/finetune.py --deepspeed_config ds_configs/finetune_zero3_vith448.json \
        --init runs/pretrain_vith/backbone.safetensors --data ... --val ... --model.ema true

--init takes a stage-2 run (or checkpoint) folder, an exported backbone.safetensors, or a timm
checkpoint file. Writes <train.output_dir>/{config.json, metrics.jsonl, checkpoints/} with
checkpoints/best naming the best-top-1 checkpoint; export it for timm with
`python -m peco_scale.tools.export <run>/checkpoints/<best step>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.train.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("finetune", sys.argv[1:], __doc__))
