"""The shared body of the launch/ entry points: ``main(stage, argv, doc)`` parses, checks and
trains the stage named (a module of this package with ``CONFIG``, ``resolve``, ``STAGE`` (its
:class:`~peco_scale.train.trainer.Stage`) and ``USER_ERRORS``), with --help, logging, the error
lines and exit codes.

Exit codes: 0 done, 2 bad input (one ``error:`` line: ConfigError, DataError, or a stage's own
user-error types), 3 non-finite loss, 4 a checkpoint could not be written (full disk; the previous
one is kept), 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (resume with
``--resume auto``; the SLURM scripts requeue on it). The summary is printed by the stage's
``report`` on rank 0, which also writes it to ``<run>/summary.json`` (read by the collect tool).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def main(stage: str, argv: list[str], doc: str) -> int:
    """Run the stage ``peco_scale.train.<stage>`` from command-line flags; returns the exit code."""
    spec = importlib.import_module(f"{__package__}.{stage}")

    def run(args: list[str]) -> dict[str, Any]:
        from .config import config_from_argv

        cfg, ds_dict = config_from_argv(args, spec.CONFIG)
        spec.resolve(cfg)  # every cheap check, before the process group or any model exists
        from .trainer import Trainer

        return Trainer(spec.STAGE(cfg, ds_dict)).run()

    return run_entry(argv, doc, spec.CONFIG, run, spec.STAGE.report, spec.USER_ERRORS)


def run_entry(argv: list[str], doc: str, cls: type, run: Callable[[list[str]], dict[str, Any]],
              report: Callable[[dict[str, Any]], None], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    from ..config import ConfigError, describe
    from .config import COMMON_ALIASES, REMOVED, RENAMED

    if "-h" in argv or "--help" in argv:
        print(doc)
        print("options (--config FILE.json|yaml, then --section.key VALUE overrides):")
        print("\n".join(describe(cls)))
        aliases = {**COMMON_ALIASES, **cls.ALIASES}
        print("shorthands: " + ", ".join(f"--{k} = --{v}" for k, v in aliases.items()))
        print("renamed keys (still accepted): " + ", ".join(f"{k} -> {v}" for k, v in RENAMED.items()))
        print("removed keys: " + "; ".join(f"{k}: {v}" for k, v in REMOVED.items()))
        return 0
    from ..data import DataError
    from ..engine.checkpoint import CheckpointError
    from ..engine.common import NonFiniteLoss
    from ..engine.dist import shutdown_distributed, world_size
    from ..engine.logger import setup_logging
    from ..engine.preempt import EXIT_REQUEUE, Interrupted, StopFlag

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        with StopFlag():  # from here on SIGTERM/SIGINT/SIGUSR1 mean: checkpoint at the next step, exit 75
            summary = run(argv)
    except (ConfigError, DataError, *user_errors) as exc:
        _print_error(exc, rank)
        return 2
    except NonFiniteLoss as exc:
        _print_error(exc, rank)
        return 3
    except CheckpointError as exc:
        _print_error(exc, rank)
        return 4
    except Interrupted as exc:
        if world_size() > 1:  # every rank agreed to stop here: leave together
            shutdown_distributed()
        if rank == 0:
            print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_REQUEUE
    if world_size() > 1:  # a world of one (in-process callers, tests) keeps its group
        shutdown_distributed()
    if rank == 0:
        write_summary(summary)
        report(summary)
    return 0


def _print_error(exc: BaseException, rank: int) -> None:
    """One ``error:`` line. An error every rank raised together (``all_ranks``: agreed in a
    collective) is printed by rank 0 alone; any other by each rank that raised it."""
    if rank == 0 or not getattr(exc, "all_ranks", False):
        print(f"error: {exc}", file=sys.stderr)


def write_summary(summary: dict[str, Any]) -> None:
    """``<run_dir>/summary.json`` (atomically): the line an array job's collector reads."""
    import json
    from pathlib import Path

    if "run_dir" not in summary:
        return
    path = Path(summary["run_dir"]) / "summary.json"
    tmp = path.with_name(f".summary.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)
