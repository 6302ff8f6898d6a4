"""The one training loop under every stage: set-up, the step loop and the save cadence.

A stage (tokenizer, pretrain, finetune, ...) is a :class:`Stage`: it says what it builds, what one
micro-step computes and what extra state it keeps; :class:`Trainer` does the rest, in the same
order for every stage:

1. the stage's cheap checks and its loader (a missing dataset is one line before any process
   group exists); resume discovery and the stage's compatibility check; the output folder probed;
2. the process group; ``config.json``; the step schedule;
3. models built under one seed (identical on every rank), then per-rank seeds, then the
   DeepSpeed engines; the checkpoint folder's space checked;
4. resume (engines, RNG, the stage's extra state); metrics.jsonl (and wandb) from there;
5. the loop: lr, ``grad_accum`` micro-steps, the agreed stop/non-finite check, a metrics row every
   ``train.log_every`` steps, the stage's evaluation, a picture of its predictions every
   ``train.image_every`` steps, checkpoints by :meth:`Trainer.maybe_save`;
6. on a stop signal: a checkpoint, then :class:`~peco_scale.engine.preempt.Interrupted` (exit 75).

Exact resume: the data position is a function of the step (``optimizer_steps``) and each rank's
RNG is saved in every checkpoint, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, to_dict
from ..data import AugmentSpec, make_loader
from ..engine import ds
from ..engine import dist as pdist
from ..engine import preempt
from ..engine.checkpoint import CheckpointManager, check_writable, find_resume, lock_run_folder, verify_folder
from ..engine.weights import checkpoint_folder, checkpoint_state
from ..engine.common import Window, optimizer_steps, progress_row, stop_if_weights_nonfinite
from ..engine.logger import MetricsLogger, log
from ..engine.preempt import Interrupted
from ..pictures import GridRows, write_grid
from .config import scaled_lr, world_from_env


STEP_DECAY_AT = (8 / 9, 26 / 27)  # ViTDet: iterations 163889 and 177546 of 184375


@dataclass
class Schedule:
    """Steps and learning rate of a run: linear warm-up to ``base_lr``, then constant, or cosine or
    linear (poly, power 1) down to ``floor``, or step (x0.1 at each fraction of ``STEP_DECAY_AT``)."""

    steps_per_epoch: int
    total: int
    warmup: int
    base_lr: float
    floor: float = 0.0
    kind: str = "cosine"

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "poly":  # mmsegmentation's PolyLR with power 1
            return self.floor + (self.base_lr - self.floor) * (1 - progress)
        if self.kind == "step":  # ViTDet's: x0.1 at 8/9 and again at 26/27 of the steps
            return self.base_lr * 0.1 ** sum(step >= f * self.total for f in STEP_DECAY_AT)
        return self.floor + (self.base_lr - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(precision: str, ds_dict: dict[str, Any], device: torch.device) -> bool:
    """bf16 for ``precision`` 'bf16', or for 'auto' on GPU when the recipe enables it."""
    if precision == "auto":
        return device.type == "cuda" and bool(ds_dict.get("bf16", {}).get("enabled", False))
    return precision == "bf16"


class Stage:
    """What a stage plugs into the trainer. ``cfg.train`` carries the run control every stage
    shares (output_dir, resume, seed, max_steps/epochs, log_every, ckpt_every, keep_last, wandb).

    ``ds_dict`` is the recipe's DeepSpeed dict (without our blocks), finished by :meth:`ds_config`.
    Set by the trainer before :meth:`build`: ``rank``, ``world``, ``device``, ``run_dir``,
    ``ckpt`` and ``schedule``."""

    name = "stage"
    grad_accum = 1
    global_batch = 1
    flops_per_image: float | None = None  # a row's tflops_per_gpu, when known
    resolver = None  # staticmethod(resolve_x): (cfg, world) -> Batching, kept as ``self.r`` by check()

    def __init__(self, cfg, ds_dict: dict[str, Any]) -> None:
        self.cfg, self.ds_dict = cfg, ds_dict

    # -- before the process group --------------------------------------------------------
    def check(self, world: int) -> None:
        """Resolve and check the config for ``world`` ranks (cheap; may run twice)."""
        if self.resolver is not None:
            self.r = self.resolver(self.cfg, world)
            self.grad_accum, self.global_batch = self.r.grad_accum, self.r.global_batch

    def build_loader(self):
        raise NotImplementedError

    def check_resume(self, folder: Path, state: dict[str, Any], world: int) -> None:
        """Refuse a checkpoint this run cannot continue; the world size is checked here by default."""
        saved_world = state.get("world_size")
        if saved_world and saved_world != world:
            raise ConfigError(f"checkpoint {folder} was written by {saved_world} ranks but this run has {world}; ZeRO's "
                              f"partitioned optimizer state cannot be re-split: resume on {saved_world} ranks, or "
                              f"convert it to a universal checkpoint with DeepSpeed's ds_to_universal.py first")

    def make_schedule(self, batches_per_epoch: int) -> Schedule:
        """Warm-up (``optim.warmup_steps``, or ``optim.warmup_epochs``) to ``optim.lr`` scaled to the
        global batch, then ``optim.schedule``: constant, or cosine down to ``optim.min_lr``. A dataset
        too small for one optimizer step is one line."""
        t, o = self.cfg.train, self.cfg.optim
        steps_per_epoch = batches_per_epoch // self.grad_accum
        if steps_per_epoch == 0:
            raise ConfigError(f"{self.cfg.data.path} gives {batches_per_epoch} micro-batches per rank, fewer than the "
                              f"{self.grad_accum} accumulation steps of one optimizer step; lower the batch size")
        total = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch
        warmup = o.warmup_steps if o.warmup_steps >= 0 else int(round(o.warmup_epochs * steps_per_epoch))
        base_lr = scaled_lr(o, self.global_batch)
        return Schedule(steps_per_epoch, total, warmup, base_lr, min(o.min_lr, base_lr), o.schedule)

    def make_loader(self, spec: AugmentSpec, batch_size: int):
        """This rank's training loader over ``data.path`` with ``data.backend`` (a missing or empty
        dataset is one line here, before any process group)."""
        d = self.cfg.data
        return make_loader(d.backend, d.path, spec, batch_size=batch_size, **self.loader_kwargs())

    def loader_kwargs(self) -> dict[str, Any]:
        """This rank's share of the training data: rank, world size, seed, workers and device."""
        return {"rank": int(os.environ.get("RANK", "0")), "world_size": world_from_env(), "seed": self.cfg.train.seed,
                "workers": self.cfg.data.workers, "device": self.loader_device()}

    @staticmethod
    def loader_device() -> str:
        """Where this rank's batches go (the process group does not exist yet when loaders are built)."""
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"

    def ds_config(self, bf16: bool) -> dict[str, Any]:
        """The recipe's DeepSpeed dict with this run's batch, clipping, ZeRO stage and precision."""
        t = self.cfg.train
        out = ds.finalize_ds_config(self.ds_dict, micro_batch=t.batch_size, grad_accum=self.grad_accum,
                                    world_size=self.world, grad_clip=self.cfg.optim.grad_clip,
                                    zero_stage=None if t.zero_stage < 0 else t.zero_stage, bf16=bf16)
        stage, allowed = out["zero_optimization"].get("stage", 0), type(self.cfg).ZERO_STAGES
        if stage not in allowed:
            raise ConfigError(f"ZeRO stage {stage} in '{t.deepspeed_config}' is not supported by the {self.name} stage; "
                              f"use one of {', '.join(map(str, allowed))} (train.zero_stage)")
        return out

    # -- models and engines ------------------------------------------------------------------
    def prepare(self) -> None:
        """After the process group exists, before the models (e.g. an evaluation loader)."""

    def build_models(self) -> None:
        """Build the modules; runs under one seed, so they are identical on every rank."""
        raise NotImplementedError

    def seed_rank(self, seed: int) -> None:
        """Seed this rank's own randomness (stochastic depth, ...); saved in every checkpoint."""
        torch.manual_seed(seed)

    def build_engines(self) -> dict[str, Any]:
        """The DeepSpeed engines; ``"model"`` is the one whose lr the schedule sets."""
        raise NotImplementedError

    def checkpoint_params(self) -> int:
        """Parameters a checkpoint holds (for the free-space check)."""
        return sum(p.numel() for e in self.engines.values() for p in e.module.parameters())

    @classmethod
    def report(cls, summary: dict[str, Any]) -> None:
        """The summary on stdout (rank 0, at the end of a run)."""
        print(f"metrics: {summary['metrics']}")
        print(f"checkpoint: {summary['checkpoint']}")

    def describe(self) -> str:
        return ""

    # -- the loop --------------------------------------------------------------------------------
    def micro_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Forward, backward and engine step of one micro-batch; returns detached scalars
        (``loss`` among them), averaged over the accumulation by the trainer."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimizer step (e.g. an EMA update)."""

    def finish_row(self, row: dict[str, Any], step_values: dict[str, float]) -> dict[str, Any]:
        """Add to or adjust a progress row (collective: every rank calls it)."""
        return row

    def evaluate(self, step: int, stopping: bool) -> tuple[dict[str, Any] | None, bool]:
        """(a metrics row, whether it is a new best) when the stage evaluates at ``step``."""
        return None, False

    def picture(self, batch: dict[str, Any]) -> GridRows | None:
        """Rows of what the model predicts on the first images of a training ``batch``
        (``peco_scale.pictures``), every ``train.image_every`` steps; collective: every rank calls
        it (ZeRO-3 gathers parameters in the forward), rank 0 writes. None: the stage pictures nothing."""
        return None

    # -- state ------------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        """Saved in ``state.json`` beside the trainer's own entries."""
        return {}

    def rank_state(self) -> dict[str, Any] | None:
        """Per-rank objects saved as ``<name>_rank<r>.pt``."""
        return None

    def load_state(self, saved: dict[str, Any], folder: Path) -> None:
        """Restore what :meth:`client_state`/:meth:`rank_state` saved."""

    def after_save(self, folder: Path, step: int) -> None:
        """After a checkpoint is published (collective)."""

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """After the last step of a run that was not interrupted (collective)."""
        return summary


class EvalStage(Stage):
    """A stage that evaluates on held-out data and keeps its best checkpoint by ``best_metric``
    (higher is better): ``self.best`` is saved in ``state.json`` by the stage's ``client_state``,
    restored on resume, and the checkpoint of a new best is named in ``checkpoints/best``."""

    best_metric = "score"
    EVAL_TEXT = "{eval_score:.2f}"

    def __init__(self, cfg, ds_dict: dict[str, Any]) -> None:
        super().__init__(cfg, ds_dict)
        self.best: dict[str, Any] = {self.best_metric: -1.0, "step": 0}
        self.last_eval: dict[str, Any] = {}

    def eval_due(self, step: int, stopping: bool) -> bool:
        """Whether to evaluate after ``step``: every ``train.eval_every`` steps and at the last step,
        not when stopping on a signal."""
        return not stopping and (step % self.cfg.train.eval_every == 0 or step == self.schedule.total)

    def eval_row(self, step: int) -> dict[str, Any]:
        """Evaluate the held-out data now (collective): a metrics row with ``eval_<best_metric>``."""
        raise NotImplementedError

    def eval_extra(self, row: dict[str, Any]) -> str:
        """More words for the evaluation's log line."""
        return ""

    def evaluate(self, step: int, stopping: bool) -> tuple[dict[str, Any] | None, bool]:
        if not self.eval_due(step, stopping):
            return None, False
        row = self.eval_row(step)
        return row, self.record_eval(row, step)

    def record_eval(self, row: dict[str, Any], step: int) -> bool:
        """Note (and log) an evaluation row; returns whether its ``eval_<best_metric>`` is a new best."""
        metric = self.best_metric
        improved = row[f"eval_{metric}"] > self.best[metric]
        if improved:
            self.best = {metric: row[f"eval_{metric}"], "step": step}
        row[f"best_{metric}"] = self.best[metric]
        self.last_eval = row
        log.info("eval at step %d: %s%s; best %s %.2f%% (step %d)", step, self.eval_text(row, self.r.num_classes),
                 self.eval_extra(row), metric, self.best[metric], self.best["step"])
        return improved

    def load_state(self, saved: dict[str, Any], folder: Path) -> None:
        self.best = saved.get("best", self.best)

    def after_save(self, folder: Path, step: int) -> None:
        if self.best["step"] == step:
            self.ckpt.mark_best(folder.name)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {**summary, "eval": self.last_eval, "best": self.best, "num_classes": self.r.num_classes}

    @classmethod
    def eval_text(cls, ev: dict[str, Any], num_classes: int) -> str:
        """An evaluation row in words (the log line and the report's ``eval:`` line): the stage's
        ``EVAL_TEXT`` formatted with the row and ``chance`` (100 / classes)."""
        return cls.EVAL_TEXT.format(**ev, chance=100.0 / num_classes)

    @classmethod
    def report(cls, summary: dict[str, Any]) -> None:
        """The summary on stdout (rank 0, at the end): metrics file, last evaluation and best, checkpoint."""
        ev, best = summary["eval"], summary["best"]
        print(f"metrics: {summary['metrics']}")
        if ev:
            print(f"eval: {cls.eval_text(ev, summary['num_classes'])} (best {cls.best_metric} {best[cls.best_metric]:.2f}% at step "
                  f"{best['step']})")
        print(f"checkpoint: {summary['checkpoint']}")


class Trainer:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.train = stage.cfg.train

    # -- set-up ----------------------------------------------------------------------------
    def _eval_checkpoint(self, path: Path, world: int) -> Path:
        """``train.eval_only``: a step folder, or a run folder's best checkpoint (else its newest)."""
        best = path / "checkpoints" / "best"
        folder = path / "checkpoints" / best.read_text().strip() if best.is_file() else checkpoint_folder(path)
        problem = verify_folder(folder) if (folder / "COMPLETE").is_file() else "no COMPLETE marker"
        if problem:
            raise ConfigError(f"train.eval_only='{path}': checkpoint {folder} is not usable ({problem}); pass a "
                              f"complete step_XXXXXXXX folder or a run folder")
        self.stage.check_resume(folder, checkpoint_state(folder), world)
        return folder

    def _discover_resume(self, ckpt: CheckpointManager, world: int) -> Path | None:
        t = self.train
        if not t.resume:
            return None
        folder = find_resume(ckpt.root) if t.resume == "auto" else Path(t.resume)
        if folder is not None:
            self.stage.check_resume(folder, json.loads((folder / "state.json").read_text()), world)
        return folder

    def setup(self) -> None:
        s, t = self.stage, self.train
        env_world = world_from_env()
        s.check(env_world)
        s.loader = s.build_loader()  # fails fast on a missing/empty dataset, before the process group starts
        s.run_dir = Path(t.output_dir)
        s.ckpt = self.ckpt = CheckpointManager(s.run_dir / "checkpoints", keep_last=t.keep_last)
        self.eval_only = getattr(t, "eval_only", "")
        self.resume_from = (self._eval_checkpoint(Path(self.eval_only), env_world) if self.eval_only
                            else self._discover_resume(self.ckpt, env_world))
        check_writable(s.run_dir)
        s.rank, s.world, s.device = pdist.init_distributed()
        self.lock = lock_run_folder(s.run_dir, s.device)  # a second run into this folder stops here
        if s.world != env_world:
            s.check(s.world)
        s.prepare()
        if s.rank == 0:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.eval_only:
                (s.run_dir / "config.json").write_text(json.dumps(to_dict(s.cfg), indent=1))
        s.schedule = self.schedule = s.make_schedule(s.loader.batches_per_epoch)
        log.info("data: %s backend on %s; %d steps/epoch at global batch %d (%d accumulation x %d ranks), %d steps",
                 s.cfg.data.backend, s.cfg.data.path, self.schedule.steps_per_epoch, s.global_batch, s.grad_accum,
                 s.world, self.schedule.total)

        torch.manual_seed(t.seed)  # identical init on every rank
        s.build_models()
        s.seed_rank(t.seed + s.rank)
        s.engines = self.engines = s.build_engines()
        self.ckpt.check_output(s.checkpoint_params(), s.device)
        text = s.describe()
        if text:
            log.info("%s", text)

        self.start_step, wandb_id = 0, None
        if self.resume_from is not None:
            saved = self.ckpt.load(self.resume_from, self.engines)
            s.load_state(saved, self.resume_from)
            self.start_step, wandb_id = saved["step"], saved.get("wandb_id")
            log.info("resumed from %s at step %d", self.resume_from, self.start_step)
        elif t.resume:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", self.ckpt.root)
        if self.eval_only:
            return  # no metrics.jsonl, no wandb: the run folder evaluated stays as it is
        wandb_cfg = None
        if t.wandb:
            wandb_cfg = {"project": t.wandb_project, "dir": str(s.run_dir), "config": to_dict(s.cfg),
                         "name": s.run_dir.name, "id": wandb_id}
        self.metrics = MetricsLogger(s.run_dir, s.rank, self.schedule.total, self.start_step, wandb_cfg=wandb_cfg)
        self.metrics.truncate_after(self.start_step)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int) -> None:
        s = self.stage
        stop_if_weights_nonfinite(self.engines["model"].module, step, self.ckpt.root, s.device)
        state = {"config": to_dict(s.cfg), "world_size": s.world, "kind": s.name, **s.client_state(),
                 "wandb_id": self.metrics.wandb_id}
        folder = self.ckpt.save(self.engines, step, state, rank_state=s.rank_state())
        s.after_save(folder, step)

    def picture(self, batch: dict[str, Any], step: int) -> None:
        """The stage's prediction grid on ``batch`` to ``<output_dir>/images/step_XXXXXXXX.png`` (and wandb)."""
        rows = self.stage.picture(batch)
        if rows is not None and self.stage.rank == 0:
            path = write_grid(rows.image(), self.stage.run_dir / "images" / f"step_{step:08d}.png")
            self.metrics.log_image("predictions", path, step)

    def maybe_save(self, step: int, last: bool, stopping: bool, improved: bool = False) -> None:
        """The cadence: every ``train.ckpt_every`` steps, at the last step, on a stop signal, and
        whenever the evaluation found a new best."""
        if step % self.train.ckpt_every == 0 or last or stopping or improved:
            self.save(step)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the stage to the end (or to a stop signal); returns its summary. All ranks call it."""
        self.lock = None
        try:
            self.setup()
            return self._evaluate_only() if self.eval_only else self._loop()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _evaluate_only(self) -> dict[str, Any]:
        """``train.eval_only``: score the loaded checkpoint once; the row goes to
        ``<output_dir>/eval_<checkpoint>.json`` (nothing else in the folder changes)."""
        s, folder = self.stage, self.resume_from
        row = s.eval_row(self.start_step)
        s.record_eval(row, self.start_step)
        out = s.run_dir / f"eval_{folder.name}.json"
        if s.rank == 0:
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({**row, "checkpoint": str(folder)}, indent=1))
            os.replace(tmp, out)
        pdist.barrier()
        return s.finish({"final": {}, "steps": self.start_step, "metrics": str(out), "checkpoint": str(folder)})

    def _loop(self) -> dict[str, Any]:
        s, t, sched = self.stage, self.train, self.schedule
        total, device = sched.total, s.device
        model = self.engines["model"]
        model.train()
        step, last, skipped, stopping = self.start_step, {}, 0, None
        window, stop = Window(), preempt.current()
        for step, epoch, micro_batches in optimizer_steps(s.loader, self.start_step, total, sched.steps_per_epoch,
                                                          s.grad_accum):
            lr = sched.lr(step)
            for group in model.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            acc: dict[str, Any] = {}
            for batch in micro_batches:
                skipped += batch["skipped"]
                for k, v in s.micro_step(batch, step).items():  # device tensors: no host sync per micro-step
                    acc[k] = acc.get(k, 0.0) + v / s.grad_accum
            s.after_step()
            values = {k: float(v) for k, v in acc.items()}
            stopping = stop.check(values["loss"], step + 1, self.ckpt.root, device)
            step += 1
            window.add(values, s.global_batch)
            self.metrics.advance()
            if step % t.log_every == 0 or step == total or stopping:
                grad_norm = model.get_global_grad_norm()
                last = progress_row(window, device, step=step, epoch=epoch, skipped=skipped, lr=lr,
                                    grad_norm=None if grad_norm is None else float(grad_norm),
                                    flops_per_image=s.flops_per_image)
                last = s.finish_row(last, values)
                self.metrics.log(last)
            evaluated, improved = s.evaluate(step, bool(stopping))
            if evaluated is not None:
                self.metrics.log(evaluated)
            if t.image_every > 0 and (step % t.image_every == 0 or step == total):
                self.picture(batch, step)
            self.maybe_save(step, step == total, bool(stopping), improved)
            if stopping:
                break
        self.metrics.close(preempted=bool(stopping) and step < total)
        pdist.barrier()
        if stopping and step < total:
            raise Interrupted(stopping, step, total, find_resume(self.ckpt.root))
        summary = {"final": last, "steps": step, "run_dir": str(s.run_dir), "metrics": str(s.run_dir / "metrics.jsonl"),
                   "checkpoint": str(find_resume(self.ckpt.root))}
        return s.finish(summary)
