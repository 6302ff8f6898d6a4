r"""Detection and instance segmentation transfer: Mask R-CNN on a pre-trained ViT (ViTDet's simple
feature pyramid, COCO format), under DeepSpeed.

    deepspeed launch/detect.py --deepspeed_config ds_configs/detect_zero2_vitb.json \
        --init runs/pretrain --data /path/to/coco --data.train_split train2017 --data.val_split val2017
    deepspeed launch/detect.py --deepspeed_config ds_configs/detect_zero3_vitl.json \
        --init runs/pretrain_vitl/backbone.safetensors --data /path/to/coco \
        --data.train_split train2017 --data.val_split val2017

--data holds annotations/instances_<split>.json and images/<split>/ (or <split>/, COCO's own
layout; `python -m peco_scale.data dense-demo --out DIR` writes a small one with the splits
training and validation). --init takes a stage-2 run (or checkpoint) folder, an exported
backbone.safetensors, or a timm checkpoint file. Writes <train.output_dir>/{config.json,
metrics.jsonl, checkpoints/} with checkpoints/best naming the best box-AP checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.train.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("detect", sys.argv[1:], __doc__))
