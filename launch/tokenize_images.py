"""Map a folder of images to token grids: a thin entry point over peco_scale.tools.tokenize."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peco_scale.tools.tokenize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
