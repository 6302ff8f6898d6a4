"""Time one full pre-training step on one device: frozen tokenizer -> ViT -> MIM head -> AdamW
(``--task peco``), or ViT on the visible patches -> pixel decoder [-> frozen perceptual network]
-> AdamW (``--task mae``, ``perceptual_mae``).

    python -m peco_scale.tools.bench_step --model vit_huge_patch14 --img_size 448 --batch_size 32 --steps 20
    python -m peco_scale.tools.bench_step --model vit_large_patch16 --img_size 448 --batch_size 0 \
        --kernels triton,torch --checkpointing off,on          # every combination, largest batch each
    python -m peco_scale.tools.bench_step --model vit_pico_patch16 --img_size 64 --batch_size 16 --steps 5   # CPU
    python -m peco_scale.tools.bench_step --task peco,mae,perceptual_mae --batch_size 32   # the targets' step ratios

Synthetic inputs (the data pipeline has its own benchmark). bf16 autocast on GPU with fp32
master weights and fused AdamW; fp32 on CPU. For each kernels x checkpointing combination:
images/s, model TFLOP/s (3x forward of backbone + head, no recomputation counted), MFU against
--peak_tflops or a matmul peak measured here, peak memory and the share of step time spent in the
tokenizer, as a printed line and a JSON row (device, versions, date) appended to --results as
soon as that combination is done. ``--batch_size 0`` finds the largest micro-batch that fits
(``fit_batch``; on CPU, where no allocator reports a peak, it takes --max_batch).

The MAE tasks use MAE's defaults (75% random masking, decoder 8 x 512, 16 heads, normalised pixel
loss); perceptual_mae adds the perceptual term through a randomly initialised
``--perceptual_arch`` (timing only; no discriminator). Their model FLOPs are encoder + decoder
(the perceptual network is not counted); ``tokenizer_share`` is 0. With several tasks, the time
per image of each task relative to the first one timed (same checkpointing) ends the output.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from peco_kernels import BACKENDS as KERNEL_BACKENDS
from peco_kernels.bench import matmul_peak_tflops

from ..config import ConfigError
from ..data.masking import BlockMaskGenerator, default_min_block, default_num_masked
from ..engine.common import peak_memory_gb
from ..gpu_check import random_tokenizer
from ..models.artifact import load_tokenizer
from ..data.masking import RandomMaskGenerator
from ..models.cost import mae_train_flops, mim_train_flops
from ..models.mae import MAETask
from ..models.mim import MIMTask
from ..models.perceptual import PerceptualLoss
from ..models.pmae import PerceptualMAELoss
from ..models.vit import MaskedViT, param_groups, parse_model_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_tokenizer(args) -> torch.nn.Module:
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    return random_tokenizer(args.tokenizer_preset, args.vocab)  # random weights: timing only


def fit_batch(trial, *, probe: int, cap: int, budget_gb: float, multiple: int = 8) -> tuple[int, list[dict]]:
    """The largest micro-batch under ``budget_gb`` of peak memory, found with few trials.

    ``trial(b)`` runs steps at batch b and returns the peak memory (GB) or None when b does not
    fit (out of memory). Peak memory is linear in the batch (the model's state plus activations
    per image), so two trials at ``probe`` and ``2 probe`` give the line; its crossing of the
    budget, rounded down to a multiple of ``multiple`` and capped at ``cap``, is tried next, and
    while that does not fit the batch shrinks by 15% (at most three times). Returns the batch and
    the trials [{batch, peak_gb or None}]."""
    tried = []

    def run(b):
        peak = trial(b)
        tried.append({"batch": b, "peak_gb": peak})
        return peak

    lo, hi = min(probe, cap), min(2 * probe, cap)
    p_lo = run(lo)
    if p_lo is None:
        return 0, tried
    if hi == lo:
        return lo, tried
    p_hi = run(hi)
    if p_hi is None:
        return lo, tried
    per_image = max((p_hi - p_lo) / (hi - lo), 1e-9)
    best = hi
    b = min(cap, int((budget_gb - (p_lo - per_image * lo)) / per_image) // multiple * multiple)
    for _ in range(4):
        if b <= best:
            break
        if run(b) is not None:
            return b, tried
        b = int(b * 0.85) // multiple * multiple
    return best, tried


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.tools.bench_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="peco", help="pre-training tasks to time, comma-separated: peco, mae, "
                                                   "perceptual_mae")
    ap.add_argument("--perceptual_arch", default="vit_base_patch16", help="perceptual_mae's frozen network (random "
                                                                         "weights)")
    ap.add_argument("--model", default="vit_pico_patch16")
    ap.add_argument("--img_size", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=16, help="micro-batch; 0 = the largest that fits (see --max_batch)")
    ap.add_argument("--max_batch", type=int, default=256, help="upper bound of the --batch_size 0 search")
    ap.add_argument("--mem_budget_gb", type=float, default=0.0,
                    help="peak memory the --batch_size 0 search may use (default: 92%% of the GPU's memory)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokenizer", default="", help="tokenizer artifact (default: random weights of --tokenizer_preset)")
    ap.add_argument("--tokenizer_preset", default="default", help="default (paper: 8192 codes) | lite | tiny")
    ap.add_argument("--vocab", type=int, default=0, help="override the random tokenizer's codebook size")
    ap.add_argument("--kernels", default="auto", help="MIM head + target lookup backends to time, comma-separated: "
                    "auto, triton, torch (e.g. triton,torch)")
    ap.add_argument("--checkpointing", default="", help="activation checkpointing settings to time: off, on or off,on "
                    "(default: --grad_checkpointing)")
    ap.add_argument("--grad_checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="MFU denominator (default: a matmul peak measured here at the end)")
    ap.add_argument("--results", default="benchmarks/results/bench_step.jsonl")
    return ap


TASKS = ("peco", "mae", "perceptual_mae")


def _check(args) -> tuple[list[str], list[str], list[str]]:
    """The tasks, kernel backends and checkpointing settings to time; raises ConfigError on bad flags."""
    from ..models.perceptual import PERCEPTUAL_ARCHS

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        raise ConfigError(f"--task {args.task!r}: choose from {', '.join(TASKS)}, comma-separated")
    if "perceptual_mae" in tasks and args.perceptual_arch not in PERCEPTUAL_ARCHS:
        raise ConfigError(f"--perceptual_arch {args.perceptual_arch!r}: choose from {', '.join(PERCEPTUAL_ARCHS)}")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    ckpts = [c.strip() for c in (args.checkpointing or ("on" if args.grad_checkpointing else "off")).split(",")]
    if not kernels or any(k not in KERNEL_BACKENDS for k in kernels):
        raise ConfigError(f"--kernels {args.kernels!r}: choose from {', '.join(KERNEL_BACKENDS)}, comma-separated")
    if any(c not in ("off", "on") for c in ckpts):
        raise ConfigError(f"--checkpointing {args.checkpointing!r}: use off, on or off,on")
    if args.batch_size < 0 or args.max_batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--batch_size {args.batch_size} (>= 0), --max_batch {args.max_batch} (>= 1), --steps "
                          f"{args.steps} (>= 1) and --warmup {args.warmup} (>= 0) are out of range")
    return tasks, kernels, ckpts


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def _add_rates(row: dict, preset, size: int, num_masked: int, peak: float) -> None:
    """Images/s, model and hardware TFLOP/s and MFU of a timed row (``peak`` TFLOP/s)."""
    if row["task"] == "peco":
        flops = mim_train_flops(preset, size, vocab=row["vocab"], num_masked=num_masked,
                                checkpointing=row["grad_checkpointing"])
    else:
        flops = mae_train_flops(preset, size, num_masked=num_masked, decoder_dim=512, decoder_depth=8,
                                checkpointing=row["grad_checkpointing"])
    row["images_per_s"] = row["batch_size"] / row["step_s"]
    row["model_tflop_per_image"] = flops["model"] / 1e12
    row["tflops"] = flops["model"] * row["images_per_s"] / 1e12
    row["hardware_tflops"] = flops["hardware"] * row["images_per_s"] / 1e12
    row["matmul_peak_tflops"] = peak
    row["mfu"] = row["tflops"] / peak


def _line(row: dict) -> str:
    head = f"{row['task']}: {row['model']} @ {row['img_size']}"
    ckpt = "on" if row["grad_checkpointing"] else "off"
    if "error" in row:
        return f"{head}, kernels {row['kernels']}, checkpointing {ckpt}: {row['error']}"
    return (f"{head}, batch {row['batch_size']}, {row['precision']}, kernels {row['kernels']}, checkpointing {ckpt} "
            f"on {row['device']}: {row['step_s'] * 1e3:.1f} ms/step, {row['images_per_s']:.1f} img/s, "
            f"{row['tflops']:.2f} model TFLOP/s, MFU {row['mfu']:.1%} of a measured {row['matmul_peak_tflops']:.4g} "
            f"TFLOP/s matmul peak, peak mem {row['peak_mem_gb']:.1f} GiB, tokenizer {row['tokenizer_share']:.1%} "
            f"of the step")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        name, preset, size = parse_model_name(args.model, args.img_size or None)
        tasks, kernels, ckpts = _check(args)
        backbone = MaskedViT(preset, size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    backbone.to(device)
    env = {"device": device, "bf16": device.type == "cuda", "name": name, "preset": preset, "size": size,
           "peak": args.peak_tflops, "tokenizer": build_tokenizer(args) if "peco" in tasks else None,
           "dev_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "budget": args.mem_budget_gb or (0.92 * torch.cuda.mem_get_info(device)[1] / 2**30
                                            if device.type == "cuda" else 0)}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for task, ckpt in itertools.product(tasks, ckpts):
        for kern in (kernels if task == "peco" else ["n/a"]):
            backbone.set_grad_checkpointing(ckpt == "on")
            row = _bench_one(args, env, backbone, task, kern, ckpt == "on")
            print(_line(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    for line in ratio_lines(rows):
        print(line)
    return 0


def _build(args, env, backbone, task: str, kern: str):
    """(model, step criterion or None, mask generator) of one task."""
    n = backbone.grid_size[0] * backbone.grid_size[1]
    if task == "peco":
        model = MIMTask(backbone, env["tokenizer"], kernels=kern).to_device(env["device"])
        return model, None, BlockMaskGenerator(backbone.grid_size, default_num_masked(n), min_block=default_min_block(n))
    gen = RandomMaskGenerator(backbone.grid_size)
    model = MAETask(backbone, num_masked=gen.num_masked)
    if task == "mae":
        return model, None, gen
    crit = PerceptualMAELoss(PerceptualLoss(args.perceptual_arch, None, "random"), 1.0, patch=model.patch,
                             grid=backbone.grid_size, norm_pix=True).to(env["device"])
    return model, crit, gen


def _bench_one(args, env, backbone, task: str, kern: str, ckpt: bool) -> dict:
    """Time one task x kernels x checkpointing combination; the JSON row."""
    device = env["device"]
    model, crit, gen = _build(args, env, backbone, task, kern)
    model.to(device)  # the head or decoder (a tokenizer was placed by to_device)
    step_fn = backbone if task == "peco" else model
    step_fn = torch.compile(step_fn) if args.compile else step_fn
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    bench = _StepBench(model, step_fn, opt, gen, env["size"], device, env["bf16"], crit)
    trials = []
    if args.batch_size:
        b = args.batch_size
    elif device.type == "cuda":
        b, trials = fit_batch(lambda b, bench=bench: bench.peak_at(b, steps=1), probe=4, cap=args.max_batch,
                              budget_gb=env["budget"])
    else:  # no allocator to ask: the cap is the batch
        b = args.max_batch
    row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": env["dev_name"], **_versions(),
           "task": task, "model": env["name"], "img_size": env["size"], "kernels": kern, "grad_checkpointing": ckpt,
           "compile": args.compile, "precision": "bf16" if env["bf16"] else "fp32",
           "vocab": model.vocab if task == "peco" else 0, "num_masked": gen.num_masked, "batch_size": b,
           "steps": args.steps, "batch_search": trials}
    if task == "perceptual_mae":
        row["perceptual_arch"] = args.perceptual_arch
    try:
        row.update(bench.time(b, args.steps, args.warmup) if b else {"error": "out of memory at the smallest batch tried"})
    except torch.OutOfMemoryError as exc:
        row["error"] = f"out of memory at batch {b}: {str(exc)[:160]}"
    del bench, opt, model, crit
    _free(device)
    if "error" not in row:
        env["peak"] = env["peak"] or matmul_peak_tflops(device, torch.bfloat16 if env["bf16"] else torch.float32)
        _add_rates(row, env["preset"], env["size"], gen.num_masked, env["peak"])
    return row


def ratio_lines(rows: list[dict]) -> list[str]:
    """With several tasks: each task's time per image relative to the first task timed, per
    checkpointing setting (peco's row: its first kernels)."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for ckpt in (False, True):
        per = {}
        for r in ok:
            if r["grad_checkpointing"] == ckpt:
                per.setdefault(r["task"], r["step_s"] / r["batch_size"])
        if len(per) > 1:
            (first, base), *rest = per.items()
            text = ", ".join(f"{t}/{first} {v / base:.3f}" for t, v in rest)
            if {"mae", "perceptual_mae"} <= set(per) and first != "mae":
                text += f", perceptual_mae/mae {per['perceptual_mae'] / per['mae']:.3f}"
            out.append(f"time per image, checkpointing {'on' if ckpt else 'off'}: {text}")
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _StepBench:
    """Synthetic inputs and one timed step at a given batch: tokenizer -> ViT -> head -> AdamW
    (peco), or the MAE task's forward [+ ``crit``, the perceptual term] -> AdamW. ``step_fn`` is
    the (possibly compiled) backbone for peco, the (possibly compiled) task for the MAE tasks."""

    def __init__(self, task, step_fn, opt, gen, size, device, bf16, crit=None):
        self.task, self.step_fn, self.opt, self.gen, self.crit = task, step_fn, opt, gen, crit
        self.size, self.device, self.bf16 = size, device, bf16
        self.peco = isinstance(task, MIMTask)

    def _inputs(self, b: int):
        rng = np.random.default_rng(0)
        ts = self.task.tokenizer_img_size if self.peco else 8
        x = torch.randn(b, 3, self.size, self.size, device=self.device)
        xt = torch.rand(b, 3, ts, ts, device=self.device) * 2 - 1
        mask = torch.from_numpy(np.stack([self.gen(rng) for _ in range(b)])).to(self.device)
        return x, xt, mask

    def _step(self, x, xt, mask) -> tuple[float, float]:
        dev = self.device
        _sync(dev)
        t0 = t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.peco:
                targets = self.task.targets(xt)
                _sync(dev)
                t1 = time.perf_counter()
                hidden = self.step_fn(x, mask)
                loss, _ = self.task.head(hidden, targets, mask.flatten(1))
            else:
                out = self.step_fn(x, mask)
                loss = out["loss"] if self.crit is None else self.crit(x, mask, out)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(dev)
        return time.perf_counter() - t0, t1 - t0

    def peak_at(self, b: int, steps: int) -> float | None:
        """Peak memory (GB) over ``steps`` steps at batch b, or None when it does not fit."""
        try:
            inputs = self._inputs(b)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(steps):
                self._step(*inputs)
            return peak_memory_gb(self.device)
        except torch.OutOfMemoryError:
            return None
        finally:
            inputs = None
            self.opt.zero_grad(set_to_none=True)
            _free(self.device)

    def time(self, b: int, steps: int, warmup: int) -> dict:
        inputs = self._inputs(b)
        for _ in range(warmup):
            self._step(*inputs)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = [self._step(*inputs) for _ in range(steps)]
        total = float(np.median([t for t, _ in times]))
        # CUDA: peak allocated during the timed steps; CPU: the process's peak resident set
        return {"step_s": total, "tokenizer_share": float(np.sum([k for _, k in times]) / np.sum([t for t, _ in times])),
                "peak_mem_gb": peak_memory_gb(self.device)}


if __name__ == "__main__":
    sys.exit(main())
