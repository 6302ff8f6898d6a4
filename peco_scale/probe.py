"""Moved to ``peco_scale.tools.probe`` (``python -m peco_scale.tools.probe``). This name stays so that
``python -m peco_scale.probe`` and ``import peco_scale.probe`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import probe as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
