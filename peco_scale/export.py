"""Moved to ``peco_scale.tools.export`` (``python -m peco_scale.tools.export``). This name stays so that
``python -m peco_scale.export`` and ``import peco_scale.export`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import export as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
