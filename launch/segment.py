r"""Semantic segmentation transfer: UperNet on a pre-trained ViT (ADE20K layout), under DeepSpeed.

    deepspeed launch/segment.py --deepspeed_config ds_configs/segment_zero2_vitb.json \
        --init runs/pretrain --data /path/to/ADEChallengeData2016
    deepspeed launch/segment.py --deepspeed_config ds_configs/segment_zero3_vitl.json \
        --init runs/pretrain_vitl/backbone.safetensors --data /path/to/ADEChallengeData2016

--data holds images/{training,validation}/*.jpg and annotations/{training,validation}/*.png
(`python -m peco_scale.data dense-demo --out DIR` writes a small one). --init takes a stage-2 run
(or checkpoint) folder, an exported backbone.safetensors, or a timm checkpoint file. Writes
<train.output_dir>/{config.json, metrics.jsonl, checkpoints/} with checkpoints/best naming the
best-mIoU checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.train.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("segment", sys.argv[1:], __doc__))
