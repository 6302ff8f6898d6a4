"""Moved to ``peco_scale.tools.plot`` (``python -m peco_scale.tools.plot``). This name stays so that
``python -m peco_scale.plot`` and ``import peco_scale.plot`` keep working: importing it gives the tool's
module itself (same object, so attributes and monkeypatches are shared)."""

import sys

from .tools import plot as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
