"""Time one full pre-training step on one device: frozen tokenizer -> ViT -> MIM head -> AdamW.

    python launch/bench_step.py --model vit_huge_patch14 --img_size 448 --batch_size 32 --steps 20
    python launch/bench_step.py --model vit_pico_patch16 --img_size 64 --batch_size 16 --steps 5   # CPU

Synthetic inputs (the data pipeline has its own benchmark). bf16 autocast on GPU with fp32
master weights and fused AdamW; fp32 on CPU. Prints images/s, model TFLOP/s (3x forward of
backbone + head, no recomputation counted), MFU against a matmul peak measured here, peak
memory, and the share of step time spent in the tokenizer; appends a JSON row with the
device, versions and date to --results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peco_scale.config import ConfigError, apply_overrides  # noqa: E402
from peco_scale.data.masking import BlockMaskGenerator, default_min_block, default_num_masked  # noqa: E402
from peco_scale.models.artifact import load_tokenizer  # noqa: E402
from peco_scale.models.mim import MIMTask  # noqa: E402
from peco_scale.engine.common import peak_memory_gb  # noqa: E402
from peco_scale.engine.stage1_config import Stage1Config  # noqa: E402
from peco_scale.models.tokenizer import TOKENIZER_PRESETS, VQTokenizer  # noqa: E402
from peco_scale.models.vit import MaskedViT, param_groups, parse_model_name  # noqa: E402
from peco_scale.plan import mim_train_flops  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best TFLOP/s of square matmuls measured on this device (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def build_tokenizer(args) -> torch.nn.Module:
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    cfg = Stage1Config()
    apply_overrides(cfg, dict(TOKENIZER_PRESETS[args.tokenizer_preset]), f"preset {args.tokenizer_preset}")
    if args.vocab:
        cfg.quantizer.codebook_size = args.vocab
    tok = VQTokenizer(cfg.model, cfg.quantizer)  # random weights: timing only
    tok.quantizer.initialized.fill_(True)
    return tok.requires_grad_(False).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_pico_patch16")
    ap.add_argument("--img_size", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokenizer", default="", help="tokenizer artifact (default: random weights of --tokenizer_preset)")
    ap.add_argument("--tokenizer_preset", default="default", help="default (paper: 8192 codes) | lite | tiny")
    ap.add_argument("--vocab", type=int, default=0, help="override the random tokenizer's codebook size")
    ap.add_argument("--grad_checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--results", default="benchmarks/results/bench_step.jsonl")
    args = ap.parse_args(argv)
    try:
        name, preset, size = parse_model_name(args.model, args.img_size or None)
        backbone = MaskedViT(preset, size, grad_checkpointing=args.grad_checkpointing)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = device.type == "cuda"
    task = MIMTask(backbone, build_tokenizer(args)).to_device(device)
    task.to(device)
    if args.compile:
        task.backbone = torch.compile(task.backbone)
    opt = torch.optim.AdamW(param_groups(task, 0.05), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    grid = backbone.grid_size
    n = grid[0] * grid[1]
    gen = BlockMaskGenerator(grid, default_num_masked(n), min_block=default_min_block(n))
    rng = np.random.default_rng(0)
    b = args.batch_size
    x = torch.randn(b, 3, size, size, device=device)
    xt = torch.rand(b, 3, task.tokenizer_img_size, task.tokenizer_img_size, device=device) * 2 - 1
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(b)])).to(device)

    def step(timed: bool) -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            targets = task.targets(xt)
            _sync(device) if timed else None
            t1 = time.perf_counter()
            hidden = task.backbone(x, mask)
            loss, _ = task.head(hidden, targets, mask.flatten(1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0

    for _ in range(args.warmup):
        step(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step(True) for _ in range(args.steps)]
    total = float(np.median([t for t, _ in times]))
    tok_share = float(np.sum([k for _, k in times]) / np.sum([t for t, _ in times]))
    flops = mim_train_flops(preset, size, vocab=task.vocab, num_masked=gen.num_masked,
                            checkpointing=args.grad_checkpointing)
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    ips = b / total
    tflops = flops["model"] * ips / 1e12
    mem = peak_memory_gb(device)  # CUDA: peak allocated; CPU: the process's peak resident set
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": dev_name, "torch": torch.__version__,
           "model": name, "img_size": size, "batch_size": b, "steps": args.steps, "grad_checkpointing": args.grad_checkpointing,
           "compile": args.compile, "precision": "bf16" if bf16 else "fp32", "vocab": task.vocab,
           "step_s": total, "images_per_s": ips, "model_tflop_per_image": flops["model"] / 1e12,
           "tflops": tflops, "matmul_peak_tflops": peak, "mfu": tflops / peak, "peak_mem_gb": mem,
           "tokenizer_share": tok_share}
    try:
        import triton
        row["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"{name} @ {size}, batch {b}, {row['precision']} on {dev_name}: {total * 1e3:.1f} ms/step, "
          f"{ips:.1f} img/s, {tflops:.2f} model TFLOP/s, MFU {row['mfu']:.1%} of a measured {peak:.1f} TFLOP/s "
          f"matmul peak, peak mem {mem:.1f} GiB, tokenizer {tok_share:.1%} of the step")
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
