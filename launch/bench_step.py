"""Time one full pre-training step on one device: a launcher over ``peco_scale.tools.bench_step``.

    python launch/bench_step.py --model vit_huge_patch14 --img_size 448 --batch_size 32 --steps 20

Same as ``python -m peco_scale.tools.bench_step`` (arguments, rows, exit status); see its docstring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peco_scale.tools.bench_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
