"""Time one full pre-training step on one device: frozen tokenizer -> ViT -> MIM head -> AdamW.

    python -m peco_scale.tools.bench_step --model vit_huge_patch14 --img_size 448 --batch_size 32 --steps 20
    python -m peco_scale.tools.bench_step --model vit_large_patch16 --img_size 448 --batch_size 0 \
        --kernels triton,torch --checkpointing off,on          # every combination, largest batch each
    python -m peco_scale.tools.bench_step --model vit_pico_patch16 --img_size 64 --batch_size 16 --steps 5   # CPU

Synthetic inputs (the data pipeline has its own benchmark). bf16 autocast on GPU with fp32
master weights and fused AdamW; fp32 on CPU. For each kernels x checkpointing combination:
images/s, model TFLOP/s (3x forward of backbone + head, no recomputation counted), MFU against
--peak_tflops or a matmul peak measured here, peak memory and the share of step time spent in the
tokenizer, as a printed line and a JSON row (device, versions, date) appended to --results as
soon as that combination is done. ``--batch_size 0`` finds the largest micro-batch that fits
(``fit_batch``; on CPU, where no allocator reports a peak, it takes --max_batch).

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
from ..models.cost import mim_train_flops
from ..models.mim import MIMTask
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


def _check(args) -> tuple[list[str], list[str]]:
    """The kernel backends and checkpointing settings to time; raises ConfigError on bad flags."""
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    ckpts = [c.strip() for c in (args.checkpointing or ("on" if args.grad_checkpointing else "off")).split(",")]
    if not kernels or any(k not in KERNEL_BACKENDS for k in kernels):
        raise ConfigError(f"--kernels {args.kernels!r}: choose from {', '.join(KERNEL_BACKENDS)}, comma-separated")
    if any(c not in ("off", "on") for c in ckpts):
        raise ConfigError(f"--checkpointing {args.checkpointing!r}: use off, on or off,on")
    if args.batch_size < 0 or args.max_batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--batch_size {args.batch_size} (>= 0), --max_batch {args.max_batch} (>= 1), --steps "
                          f"{args.steps} (>= 1) and --warmup {args.warmup} (>= 0) are out of range")
    return kernels, ckpts


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
    flops = mim_train_flops(preset, size, vocab=row["vocab"], num_masked=num_masked,
                            checkpointing=row["grad_checkpointing"])
    row["images_per_s"] = row["batch_size"] / row["step_s"]
    row["model_tflop_per_image"] = flops["model"] / 1e12
    row["tflops"] = flops["model"] * row["images_per_s"] / 1e12
    row["hardware_tflops"] = flops["hardware"] * row["images_per_s"] / 1e12
    row["matmul_peak_tflops"] = peak
    row["mfu"] = row["tflops"] / peak


def _line(row: dict) -> str:
    head = f"{row['model']} @ {row['img_size']}"
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
        kernels, ckpts = _check(args)
        backbone = MaskedViT(preset, size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = device.type == "cuda"
    tokenizer = build_tokenizer(args)
    backbone.to(device)
    n = backbone.grid_size[0] * backbone.grid_size[1]
    gen = BlockMaskGenerator(backbone.grid_size, default_num_masked(n), min_block=default_min_block(n))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    budget = args.mem_budget_gb or (0.92 * torch.cuda.mem_get_info(device)[1] / 2**30 if device.type == "cuda" else 0)
    peak = args.peak_tflops
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    for ckpt, kern in itertools.product(ckpts, kernels):
        backbone.set_grad_checkpointing(ckpt == "on")
        task = MIMTask(backbone, tokenizer, kernels=kern).to_device(device)
        task.to(device)  # the head (the tokenizer was placed by to_device)
        step_fn = backbone if not args.compile else torch.compile(backbone)
        opt = torch.optim.AdamW(param_groups(task, 0.05), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
        bench = _StepBench(task, step_fn, opt, gen, size, device, bf16)
        trials = []
        if args.batch_size:
            b = args.batch_size
        elif device.type == "cuda":
            b, trials = fit_batch(lambda b, bench=bench: bench.peak_at(b, steps=1), probe=4, cap=args.max_batch,
                                  budget_gb=budget)
        else:  # no allocator to ask: the cap is the batch
            b = args.max_batch
        row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": dev_name, **_versions(),
               "model": name, "img_size": size, "kernels": kern, "grad_checkpointing": ckpt == "on",
               "compile": args.compile, "precision": "bf16" if bf16 else "fp32", "vocab": task.vocab,
               "batch_size": b, "steps": args.steps, "batch_search": trials}
        try:
            row.update(bench.time(b, args.steps, args.warmup) if b else
                       {"error": "out of memory at the smallest batch tried"})
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory at batch {b}: {str(exc)[:160]}"
        del bench, opt, task
        _free(device)
        if "error" not in row:
            peak = peak or matmul_peak_tflops(device, torch.bfloat16 if bf16 else torch.float32)
            _add_rates(row, preset, size, gen.num_masked, peak)
        print(_line(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _StepBench:
    """Synthetic inputs and one timed step (tokenizer -> ViT -> head -> AdamW) at a given batch."""

    def __init__(self, task, backbone, opt, gen, size, device, bf16):
        self.task, self.backbone, self.opt, self.gen = task, backbone, opt, gen
        self.size, self.device, self.bf16 = size, device, bf16

    def _inputs(self, b: int):
        rng = np.random.default_rng(0)
        ts = self.task.tokenizer_img_size
        x = torch.randn(b, 3, self.size, self.size, device=self.device)
        xt = torch.rand(b, 3, ts, ts, device=self.device) * 2 - 1
        mask = torch.from_numpy(np.stack([self.gen(rng) for _ in range(b)])).to(self.device)
        return x, xt, mask

    def _step(self, x, xt, mask) -> tuple[float, float]:
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            targets = self.task.targets(xt)
            _sync(dev)
            t1 = time.perf_counter()
            hidden = self.backbone(x, mask)
            loss, _ = self.task.head(hidden, targets, mask.flatten(1))
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
