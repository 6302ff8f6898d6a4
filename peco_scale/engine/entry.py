"""The shared body of the launch/ entry points: --help, logging, the error lines and exit codes.

Exit codes: 0 done, 2 bad input (one ``error:`` line: ConfigError, DataError, or a stage's own
user-error types), 3 non-finite loss. ``run(argv)`` parses, checks and trains, returning the
stage's summary; ``report(summary)`` prints it on rank 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def run_entry(argv: list[str], doc: str, cls: type, aliases: dict[str, str],
              run: Callable[[list[str]], dict[str, Any]], report: Callable[[dict[str, Any]], None],
              user_errors: tuple[type[BaseException], ...] = ()) -> int:
    from ..config import ConfigError, describe

    if "-h" in argv or "--help" in argv:
        print(doc)
        print("options (--config FILE.json|yaml, then --section.key VALUE overrides):")
        print("\n".join(describe(cls)))
        print("shorthands: " + ", ".join(f"--{k} = --{v}" for k, v in aliases.items()))
        return 0
    from ..data import DataError
    from .common import NonFiniteLoss
    from .logger import setup_logging

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        summary = run(argv)
    except (ConfigError, DataError, *user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    from .dist import shutdown_distributed, world_size

    if world_size() > 1:  # a world of one (in-process callers, tests) keeps its group
        shutdown_distributed()
    if rank == 0:
        report(summary)
    return 0
