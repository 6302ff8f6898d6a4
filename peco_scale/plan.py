"""Moved to ``peco_scale.tools.plan`` (``python -m peco_scale.tools.plan``). This name stays so that
``python -m peco_scale.plan`` and ``import peco_scale.plan`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import plan as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
