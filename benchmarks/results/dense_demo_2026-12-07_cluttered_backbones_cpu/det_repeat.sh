#!/usr/bin/env bash
set -u; cd /work/main
for r in a b; do
DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port 29881 launch/detect.py --config configs/demo_detect.yaml --data runs/dense_cluttered/data --init '' --train.seed 0 --train.max_steps 40 --train.log_every 1 --output_dir runs/detrep/$r > runs/detrep_$r.log 2>&1
echo "$(date -u +%T) $r rc=$?" >> runs/detrep_done.log
done
