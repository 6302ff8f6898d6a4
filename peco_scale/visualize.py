"""``python -m peco_scale.visualize``: the picture command, whose code lives with the other tools in
``peco_scale.tools.visualize``; importing this name gives that module itself (same object, so
attributes and monkeypatches are shared)."""

import sys

from .tools import visualize as _tool

if __name__ == "__main__":
    sys.exit(_tool.main())
sys.modules[__name__] = _tool
