#!/usr/bin/env bash
# usage: chain.sh STAGE2_SEED PORT: stage 2 with that seed on the cluttered unlabelled scenes, tools.stream, detection seeds 0-2
set -u
cd /work/main
D=runs/dense_cluttered; S=$1; P=$2; O=runs/bb/s$S; mkdir -p $O
L="DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port $P"
LOG=runs/bb/done.log
eval $L launch/pretrain.py --deepspeed_config ds_configs/zero3_vith.json --config configs/demo_dense_pretrain.yaml --data $D/data/unlabelled --train.seed $S --output_dir $O/pretrain > $O/pretrain.log 2>&1
echo "$(date -u +%T) stage2 s$S rc=$?" >> $LOG
.venv/bin/python -m peco_scale.tools.stream --init $O/pretrain --model vit_pico_patch16 --img_size 64 --data $D/data/images --out $O/stream.json > $O/stream.log 2>&1
echo "$(date -u +%T) stream s$S rc=$? $(cat $O/stream.json | tr -d '\n')" >> $LOG
SC=$(.venv/bin/python -c "import json; print(json.load(open('$O/stream.json'))['stream_scale'])")
for f in 0 1 2; do
  eval $L launch/detect.py --config configs/demo_detect.yaml --data $D/data --init $O/pretrain --model.stream_scale $SC --train.seed $f --output_dir $O/detect_s$f > $O/det_s$f.log 2>&1
  echo "$(date -u +%T) detect b-s$S f$f rc=$?" >> $LOG
done
