"""Benchmarks of the two kernels against their alternatives, at the shapes of real runs.

    python -m peco_kernels.bench                      # both kernels, real shapes on CUDA
    python -m peco_kernels.bench --kernel ce --results benchmarks/results/kernels.jsonl

Each row: median time, peak memory above the inputs, achieved TFLOP/s, its fraction of a bf16
matmul peak measured in the same run, and the time over the floor of docs/gpu_check.md
(``x_floor``); rows are appended to --results with GPU name, versions and date. Without CUDA only
the torch variants are timed, at reduced shapes, and every row says so.

Design notes: docs/design.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .reference import masked_linear_cross_entropy_reference, vq_nearest_reference

CE_SHAPES = {  # name: (masked rows per GPU, hidden)
    "vit_b16_224": (256 * 75, 768),
    "vit_l16_448": (64 * 300, 1024),
    "vit_h14_448": (32 * 392, 1280),
}
VQ_SHAPES = {  # name: (rows = micro-batch x token grid, D)
    "224_d32": (64 * 14 * 14, 32), "448_d32": (32 * 32 * 32, 32),
    "224_d256": (64 * 14 * 14, 256), "448_d256": (32 * 32 * 32, 256),
}
VOCAB = 8192


def _bench(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    """Median milliseconds."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the block and alive at the same time.

    The device-independent count the CUDA caching allocator's ``memory_allocated`` makes (less
    its 512-byte rounding and cuBLAS workspaces), so it works on CPU: every op's outputs whose
    storage is not one of its inputs' (a view, an ``out=`` or in-place result is not) is a new
    allocation, counted until its storage dies. Storages that existed before the block (the
    inputs) are never counted. Triton launches allocate nothing through torch, but the
    interpreter leaves its arguments in a reference cycle, so garbage is collected before a
    large (>= 1 MiB) allocation is counted: the peak is that of storage still reachable.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        new = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = id(s)  # the storage's Python object lives exactly as long as the storage
                if key not in self._sizes and s.nbytes() and s.data_ptr() not in inputs:
                    new[key] = s
        if any(s.nbytes() >= 2**20 for s in new.values()):
            gc.collect()
        for key, s in new.items():
            self._sizes[key] = s.nbytes()
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key)
        return out


def _peak_mem(fn: Callable[[], object], cuda: bool) -> float:
    """Peak bytes allocated above what was live before the call: the CUDA allocator's count on
    CUDA, ``LiveBytes`` on CPU."""
    if not cuda:
        meter = LiveBytes()
        with meter:
            fn()
        return float(meter.peak)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = _bench(lambda: a @ b, device.type == "cuda", 5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def cuda_core_ops_per_s(device: torch.device) -> float | None:
    """fp32 lane-instructions per second of the CUDA cores (SMs x fp32 lanes x clock), from the
    device's properties; None on CPU or where torch does not report the clock."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    clock_khz = getattr(p, "clock_rate", 0)
    if not clock_khz:
        return None
    lanes = 64 if (p.major, p.minor) in ((7, 0), (7, 5), (8, 0)) else 128  # fp32 lanes per SM
    return p.multi_processor_count * lanes * clock_khz * 1e3


def floor_ms(row: dict, matmul_tflops: float, core_ops: float | None) -> tuple[float, str]:
    """(the row's floor in ms, what sets it), as in docs/gpu_check.md: the matmul FLOPs at the
    matmul peak measured in the same run; for the nearest-code search also its argmin epilogue,
    ~3 CUDA-core instructions per (row, code), which sets the floor at small D."""
    flops = row["tflops"] * row["ms"] * 1e-3 * 1e12
    mm = flops / (matmul_tflops * 1e12) * 1e3
    if row["kernel"] == "vq_nearest" and core_ops:
        epi = 3 * row["rows"] * row["codes"] / core_ops * 1e3
        if epi > mm:
            return epi, "argmin epilogue"
    return mm, "matmul"


def _ce_variants(device: torch.device, triton_on_cpu: bool = False) -> dict[str, Callable]:
    from .functional import masked_linear_cross_entropy

    def ref(h, w, b, t):
        return masked_linear_cross_entropy_reference(h, w, b, t)[0]

    variants = {"torch_eager": ref}
    if device.type == "cuda" or triton_on_cpu:
        variants["triton"] = lambda h, w, b, t: masked_linear_cross_entropy(h, w, b, t, backend="triton", validate=False)
    if device.type == "cuda":
        variants["torch_compile"] = torch.compile(ref)
        native = getattr(F, "linear_cross_entropy", None)
        if native is not None:
            variants["torch_native"] = lambda h, w, b, t: native(h, w, t, bias=b)
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            # fp32 accumulation of dW across chunks, as the Triton kernel does (Liger's default accumulates
            # in the input dtype where its version has the switch)
            kw = {"accum_dtype": torch.float32} if "accum_dtype" in inspect.signature(
                liger_fused_linear_cross_entropy).parameters else {}
            variants["liger"] = lambda h, w, b, t: liger_fused_linear_cross_entropy(h, w, t, bias=b, **kw)
        except ImportError:
            pass
    return variants


def bench_ce(device: torch.device, dtype: torch.dtype, shapes: dict, reps: int, note: str,
             triton_on_cpu: bool = False) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for shape, (m, hdim) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(m, hdim, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(VOCAB, hdim, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
        b = torch.zeros(VOCAB, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, VOCAB, (m,), device=device, generator=g)
        flops = {"forward": 2 * m * hdim * VOCAB, "backward": 4 * m * hdim * VOCAB, "full": 6 * m * hdim * VOCAB}
        for name, fn in _ce_variants(device, triton_on_cpu).items():
            def fwd():
                with torch.no_grad():
                    return fn(h, w, b, t)

            def full():
                h.grad = w.grad = b.grad = None
                fn(h, w, b, t).backward()

            try:
                t_fwd, t_full = _bench(fwd, cuda, reps), _bench(full, cuda, reps)
                mem = _peak_mem(full, cuda)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                rows.append({"kernel": "masked_linear_ce", "variant": name, "shape": shape, "error": repr(exc)[:200]})
                continue
            for phase, ms in (("forward", t_fwd), ("backward", max(t_full - t_fwd, 0.0)), ("full", t_full)):
                rows.append({"kernel": "masked_linear_ce", "variant": name, "shape": shape, "rows": m, "hidden": hdim,
                             "vocab": VOCAB, "dtype": str(dtype).replace("torch.", ""), "phase": phase, "ms": ms,
                             "peak_mem_mb": mem / 2**20 if phase == "full" else None,
                             "tflops": flops[phase] / (ms * 1e-3) / 1e12 if ms > 0 else None, "note": note})
    return rows


def _cdist_argmin(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z.float(), c.float()).argmin(1)


def bench_vq(device: torch.device, dtype: torch.dtype, shapes: dict, reps: int, note: str,
             triton_on_cpu: bool = False) -> list[dict]:
    from .functional import vq_nearest

    cuda = device.type == "cuda"
    variants = {"torch_chunked": lambda z, c: vq_nearest_reference(z, c), "torch_cdist_argmin": _cdist_argmin}
    if cuda:
        variants["torch_compile_cdist_argmin"] = torch.compile(_cdist_argmin)
    if cuda or triton_on_cpu:
        variants["triton"] = lambda z, c: vq_nearest(z, c, backend="triton")
        variants["triton_with_stats"] = lambda z, c: vq_nearest(z, c, backend="triton", return_stats=True)
    rows = []
    for shape, (n, d) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(n, d, device=device, generator=g).to(dtype)
        c = torch.randn(VOCAB, d, device=device, generator=g).to(dtype)
        for name, fn in variants.items():
            try:
                ms = _bench(lambda: fn(z, c), cuda, reps)
                mem = _peak_mem(lambda: fn(z, c), cuda)
            except Exception as exc:  # noqa: BLE001
                rows.append({"kernel": "vq_nearest", "variant": name, "shape": shape, "error": repr(exc)[:200]})
                continue
            rows.append({"kernel": "vq_nearest", "variant": name, "shape": shape, "rows": n, "dim": d, "codes": VOCAB,
                         "dtype": str(dtype).replace("torch.", ""), "phase": "forward", "ms": ms,
                         "peak_mem_mb": mem / 2**20, "tflops": 2 * n * VOCAB * d / (ms * 1e-3) / 1e12, "note": note})
    return rows


def goal_checks(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for the goals the rows can decide: at the ViT-H/14-448
    shape the Triton linear-CE full pass >= 1.3x faster than eager with <= 25% of its peak
    memory and no slower than torch.compile, the native op or Liger-Kernel; each nearest-code
    shape >= 5x faster than cdist + argmin and within 2x of its floor."""
    by = {(r["kernel"], r["variant"], r["shape"], r.get("phase")): r for r in rows if "error" not in r}
    out = []
    tri = by.get(("masked_linear_ce", "triton", "vit_h14_448", "full"))
    if tri:
        eager = by.get(("masked_linear_ce", "torch_eager", "vit_h14_448", "full"))
        if eager:
            x = eager["ms"] / tri["ms"]
            out.append(("linear-CE ViT-H/14-448 speed-up over eager", x, ">= 1.3", x >= 1.3))
            m = tri["peak_mem_mb"] / eager["peak_mem_mb"]
            out.append(("linear-CE ViT-H/14-448 peak memory / eager's", m, "<= 0.25", m <= 0.25))
        for other in ("torch_compile", "torch_native", "liger"):
            o = by.get(("masked_linear_ce", other, "vit_h14_448", "full"))
            if o:
                x = o["ms"] / tri["ms"]
                out.append((f"linear-CE ViT-H/14-448 speed-up over {other}", x, ">= 1.0", x >= 1.0))
    for (kernel, variant, shape, _), r in sorted(by.items()):
        if kernel != "vq_nearest" or variant != "triton":
            continue
        base = by.get(("vq_nearest", "torch_cdist_argmin", shape, "forward"))
        if base:
            x = base["ms"] / r["ms"]
            out.append((f"nearest-code {shape} speed-up over cdist+argmin", x, ">= 5", x >= 5))
        if r.get("x_floor"):
            out.append((f"nearest-code {shape} time / floor ({r['floor_basis']})", r["x_floor"], "<= 2",
                        r["x_floor"] <= 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=("ce", "vq", "all"), default="all")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (CUDA uses do_bench)")
    ap.add_argument("--scale", type=float, default=0.0,
                    help="row-count scale of the shapes (default 1 on CUDA, 1/64 on CPU)")
    ap.add_argument("--shape", default="", help="these shapes only, comma-separated (an array task's share): "
                    + ", ".join([*CE_SHAPES, *VQ_SHAPES]))
    ap.add_argument("--results", default="benchmarks/results/kernels.jsonl")
    ap.add_argument("--cpu_triton", action="store_true",
                    help="without CUDA, time the Triton rows too (under TRITON_INTERPRET=1: a check that the "
                         "code path runs, at tiny --scale; the times mean nothing)")
    args = ap.parse_args(argv)
    shapes = [x.strip() for x in args.shape.split(",") if x.strip()]
    if unknown := [x for x in shapes if x not in CE_SHAPES and x not in VQ_SHAPES]:
        ap.error(f"--shape {','.join(unknown)} is not a known shape; choose from {', '.join([*CE_SHAPES, *VQ_SHAPES])}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    scale = args.scale or (1.0 if cuda else 1 / 64)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    triton_on_cpu = not cuda and args.cpu_triton
    if triton_on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--cpu_triton runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    note = "" if cuda else (f"CPU only: torch references timed at {scale:g} x the real row counts; Triton rows "
                            + ("under the interpreter (correctness only, the times mean nothing)" if triton_on_cpu
                               else "need CUDA (the interpreter checks correctness, not speed)"))
    if note:
        print(note)
    peak = matmul_peak_tflops(device, dtype)
    core_ops = cuda_core_ops_per_s(device)
    # in the order --shape names them (the GPU check puts the goal shapes first), else the tables'
    order = shapes or [*CE_SHAPES, *VQ_SHAPES]
    work = [(k, "ce" if k in CE_SHAPES else "vq") for k in order
            if args.kernel in ("all", "ce" if k in CE_SHAPES else "vq")]
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
            "matmul_peak_tflops": peak, "cuda_core_tops": None if core_ops is None else core_ops / 1e12}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape, kind in work:  # each shape's rows are written as soon as they exist (a cut run keeps them)
        if kind == "ce":
            m, h = CE_SHAPES[shape]
            new = bench_ce(device, dtype, {shape: (max(1, int(m * scale)), h)}, args.reps, note, triton_on_cpu)
        else:
            n, d = VQ_SHAPES[shape]
            new = bench_vq(device, dtype, {shape: (max(1, int(n * scale)), d)}, args.reps, note, triton_on_cpu)
        with out.open("a") as f:
            for r in new:
                r.update(meta)
                if r.get("tflops"):
                    r["fraction_of_peak"] = r["tflops"] / peak
                    r["floor_ms"], r["floor_basis"] = floor_ms(r, peak, core_ops)
                    r["x_floor"] = r["ms"] / r["floor_ms"]
                f.write(json.dumps(r) + "\n")
        rows += new
    print(f"{meta['device']}, torch {meta['torch']}, bf16/fp32 matmul peak measured {peak:.1f} TFLOP/s")
    print(f"{'kernel':18} {'variant':20} {'shape':12} {'phase':9} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} "
          f"{'peak MB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:18} {r['variant']:20} {r['shape']:12} error: {r['error']}")
            continue
        mem = r.get("peak_mem_mb")
        print(f"{r['kernel']:18} {r['variant']:20} {r['shape']:12} {r['phase']:9} {r['ms']:9.3f} "
              f"{r['tflops'] or 0:8.2f} {r.get('x_floor') or 0:8.1f} {'' if mem is None or mem != mem else f'{mem:9.1f}'}")
    goals = goal_checks(rows)
    if goals:
        print("goals:")
        for what, value, target, met in goals:
            print(f"  {'MET ' if met else 'MISS'} {what}: {value:.2f} (target {target})")
    elif not cuda:
        print("goals: not checked (they need the Triton rows, which need CUDA)")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
