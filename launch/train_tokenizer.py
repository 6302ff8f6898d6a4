"""Stage 1: train the PeCo perceptual tokenizer.

    python launch/train_tokenizer.py --data DIR --perceptual.weights PATH [--section.key VALUE ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_tokenizer.py --preset tiny --data DIR ...

Writes <train.output_dir>/{config.json, metrics.jsonl, checkpoints/, tokenizer.safetensors}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.train.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("tokenizer", sys.argv[1:], __doc__))
