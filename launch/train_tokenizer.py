"""Stage 1: train the PeCo perceptual tokenizer.

    python launch/train_tokenizer.py --data DIR --perceptual.weights PATH [--section.key VALUE ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train_tokenizer.py --preset tiny --data DIR ...

Writes <train.output_dir>/{config.json, metrics.jsonl, checkpoints/, tokenizer.safetensors}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from peco_scale.config import ConfigError, describe  # noqa: E402
from peco_scale.engine.logger import setup_logging  # noqa: E402


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from peco_scale.engine.stage1_config import STAGE1_ALIASES, Stage1Config

        print(__doc__)
        print("options (--config FILE.json|yaml, then --section.key VALUE overrides):")
        print("\n".join(describe(Stage1Config)))
        print("shorthands: " + ", ".join(f"--{k} = --{v}" for k, v in STAGE1_ALIASES.items()))
        return 0
    import os

    setup_logging(int(os.environ.get("RANK", "0")))
    from peco_scale.engine.common import NonFiniteLoss
    from peco_scale.engine.stage1 import train_tokenizer
    from peco_scale.engine.stage1_config import config_from_argv
    from peco_scale.data import DataError
    from peco_scale.models.perceptual import PerceptualWeightsError

    try:
        summary = train_tokenizer(config_from_argv(argv))
    except (ConfigError, DataError, PerceptualWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"tokenizer artifact: {summary['artifact']}")
        print(f"metrics: {summary['metrics']} (last: loss {final.get('loss', float('nan')):.4f}, "
              f"codebook usage {final.get('codebook_usage', float('nan')):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
