"""Moved to ``peco_scale.tools.tokenize`` (``python -m peco_scale.tools.tokenize``). This name stays so that
``python -m peco_scale.tokenize`` and ``import peco_scale.tokenize`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import tokenize as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
