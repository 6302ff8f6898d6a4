"""Throughput of the full stage-2 input pipeline (two views + mask) for each data backend.

    python -m peco_scale.data.bench --backend folder --img_size 224 --workers 2
    python -m peco_scale.data.bench --backend ffcv --img_size 448 --workers 2 --data /path/to/imagenet

Prints images/s and images/s per core (cores = the CPUs this process may use), and appends a
row with the machine, versions and date to --results. Without --data it uses the embedded demo
generator at ImageNet-like sizes (1600 JPEGs of 375-500 px, written to runs/bench/imagenet_like on
first use); the ffcv backend converts the folder to a .beton first (cached next to it, at
--max_resolution), which is not timed.

The rate is the steady state inside an epoch (after two warm-up batches); the time to the first
batch of a fresh epoch (workers/pipeline start) is reported apart as ``first_batch_s``, and
``epoch_starts`` counts how many fresh epochs fell inside the timed window (0 by default: on a
real dataset an epoch start is paid once per ~10^4 batches).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

from .loaders import make_loader
from .masking import default_min_block, default_num_masked
from .spec import BACKENDS, AugmentSpec, DataError


def _source(backend: str, data: Path, max_res: int, workers: int) -> Path:
    if backend != "ffcv":
        return data
    from .ffcv_backend import write_beton

    beton = data.parent / f"{data.name}_{max_res}.beton"
    if not beton.exists():
        print(f"converting {data} -> {beton} (max side {max_res}; not timed)")
        write_beton(data, beton, max_resolution=max_res, workers=max(1, workers))
    return beton


def _time_batches(loader, need: int) -> tuple[int, float, float, int]:
    """Read ``need`` batches (across epochs): (images timed, seconds, first batch's seconds, epoch
    starts inside the timed window); the first two batches are warm-up (workers started, JIT)."""
    images, t0, seen, epoch, first_batch_s, epoch_starts = 0, 0.0, 0, 0, 0.0, 0
    while seen < need:
        loader.set_epoch(epoch)
        t_start = time.perf_counter()
        if seen >= 2:
            epoch_starts += 1
        for batch in loader:
            seen += 1
            if seen == 1:
                first_batch_s = time.perf_counter() - t_start
            if seen == 2:
                t0 = time.perf_counter()
            elif seen > 2:
                images += batch["patch"].shape[0]
            if seen >= need:
                break
        epoch += 1
    return images, time.perf_counter() - t0, first_batch_s, epoch_starts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peco_scale.data.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=BACKENDS, default="folder")
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--patch_size", type=int, default=16, help="sets the mask grid and the tokenizer view")
    ap.add_argument("--tokenizer_downsample", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="timed batches (after 2 warm-up batches)")
    ap.add_argument("--data", default="", help="ImageFolder root (default: the demo dataset)")
    ap.add_argument("--max_resolution", type=int, default=512, help="ffcv: max image side stored in the .beton")
    ap.add_argument("--results", default="benchmarks/results/data_bench.jsonl")
    args = ap.parse_args(argv)
    try:
        if args.img_size % args.patch_size:
            raise DataError(f"--img_size {args.img_size} is not divisible by --patch_size {args.patch_size}")
        data = Path(args.data) if args.data else Path("runs/bench/imagenet_like")
        if not args.data:
            from .demo import make_demo_dataset

            # ImageNet-like sizes (the demo's own 64-256 px images would flatter decoding)
            make_demo_dataset(data, images_per_class=160, min_size=375, max_size=500)
        grid = args.img_size // args.patch_size
        n = grid * grid
        spec = AugmentSpec(args.img_size, "pretrain", tokenizer_size=grid * args.tokenizer_downsample,
                           mask=dict(grid=(grid, grid), num_masked=default_num_masked(n), min_block=default_min_block(n)))
        source = _source(args.backend, data, args.max_resolution, args.workers)
        loader = make_loader(args.backend, source, spec, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
                             workers=args.workers)
    except (DataError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    need = args.batches + 2
    if loader.batches_per_epoch < 1:
        print("error: the dataset is smaller than one batch; lower --batch_size", file=sys.stderr)
        return 2
    images, elapsed, first_batch_s, epoch_starts = _time_batches(loader, need)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ips = images / elapsed
    row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "backend": args.backend, "img_size": args.img_size,
           "tokenizer_size": spec.tokenizer_size, "workers": args.workers, "batch_size": args.batch_size,
           "images": images, "seconds": elapsed,
           "first_batch_s": first_batch_s, "epoch_starts": epoch_starts, "images_per_s": ips, "images_per_s_per_core": ips / cores,
           "cores": cores, "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
           "python": platform.python_version(), "data": str(data)}
    import torch

    row["torch"] = torch.__version__
    for mod, key in (("ffcv", "ffcv"), ("nvidia.dali", "dali")):
        try:
            m = __import__(mod, fromlist=["__version__"])
            row[key] = getattr(m, "__version__", "?")
        except ImportError:
            pass
    print(f"{args.backend} @ {args.img_size} (tokenizer view {spec.tokenizer_size}, mask {grid}x{grid}), "
          f"{args.workers} workers: {ips:.1f} images/s, {ips / cores:.1f} images/s per core ({cores} cores); "
          f"first batch after {first_batch_s:.2f}s" + (f"; {epoch_starts} epoch start(s) inside the timed window"
                                                      if epoch_starts else ""))
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
