"""Stage 1: train the PeCo perceptual tokenizer.

    python launch/train_tokenizer.py --data DIR --perceptual.weights PATH [--section.key VALUE ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_tokenizer.py --preset tiny --data DIR ...

Writes <train.output_dir>/{config.json, metrics.jsonl, checkpoints/, tokenizer.safetensors}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.engine.entry import run_entry  # noqa: E402
from peco_scale.engine.stage1_config import STAGE1_ALIASES, Stage1Config  # noqa: E402


def run(argv: list[str]) -> dict:
    from peco_scale.train.tokenizer import train_tokenizer
    from peco_scale.engine.stage1_config import config_from_argv

    return train_tokenizer(config_from_argv(argv))


def report(summary: dict) -> None:
    final = summary["final"]
    print(f"tokenizer artifact: {summary['artifact']}")
    print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
          f"codebook usage {final.get('codebook_usage', float('nan')):.1%})")


def main(argv: list[str]) -> int:
    from peco_scale.models.perceptual import PerceptualWeightsError

    return run_entry(argv, __doc__, Stage1Config, STAGE1_ALIASES, run, report, (PerceptualWeightsError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
