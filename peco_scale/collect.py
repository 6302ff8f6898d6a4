"""Moved to ``peco_scale.tools.collect`` (``python -m peco_scale.tools.collect``). This name stays so that
``python -m peco_scale.collect`` and ``import peco_scale.collect`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import collect as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
