"""Fused nearest-code search (+ EMA statistics) in Triton: the kernels and their launcher.

``vq_nearest_triton(z [N, D], codebook [K, D])`` -> (indices int64 [N], distances fp32 [N]) and,
with ``return_stats``, (counts fp32 [K], sums fp32 [K, D]). Semantics are those of
``reference.vq_nearest_reference`` / ``vq_ema_stats_reference``; inputs are checked by
``functional.vq_nearest``, which passes contiguous, 16-byte-aligned tensors.

[N, K] is never formed; ties go to the lowest index (as torch.argmin); fp32 inputs keep ~fp32
accuracy (tf32x3). Block sizes are fixed per shape, not autotuned, and there are no float
atomics, so every rank quantises identically and results are reproducible across runs and ranks
of one build (the sums are not bitwise equal to a one-hot matmul).

Design notes: docs/design.md
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter has no SMs; a small count makes small-N calls take the split path, so the CPU
# tests cover it.
_INTERPRETER_SMS = 4


@triton.jit
def _vq_nearest_kernel(
    z_ptr, c_ptr, bias_ptr,  # z [N, D], codebook [K, D], bias [K] fp32 (||e||^2 or 0; +inf past K)
    score_ptr, idx_ptr, z2_ptr,  # out: score [SPLIT, N] fp32, idx [SPLIT, N] int64, ||z||^2 [N] fp32
    N, K, D, tiles_per_split,
    SCALE: tl.constexpr,  # 2 for l2 (||e||^2 - 2 z.e), 1 for cosine (-z.e)
    WRITE_Z2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16 only: its numpy dot cannot read bf16 (stored as uint16)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_CHUNK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)

    if ONE_D_CHUNK:  # all of D in one tile: load z once for the whole codebook walk
        z_tile = tl.load(z_rows + offs_d[None, :], mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            z_tile = z_tile.to(tl.float32)

    if WRITE_Z2:
        if pid_s == 0:
            if ONE_D_CHUNK:
                zf = z_tile.to(tl.float32)
                z2 = tl.sum(zf * zf, axis=1)
            else:
                z2 = tl.zeros([BLOCK_N], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    zf = tl.load(z_rows + d0 + offs_d[None, :], mask=n_mask[:, None] & (d0 + offs_d[None, :] < D),
                                 other=0.0).to(tl.float32)
                    z2 += tl.sum(zf * zf, axis=1)
            tl.store(z2_ptr + offs_n, z2, mask=n_mask)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    k_begin = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        c_rows = c_ptr + offs_k.to(tl.int64)[:, None] * D
        if ONE_D_CHUNK:
            c_tile = tl.load(c_rows + offs_d[None, :], mask=k_mask[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                c_tile = c_tile.to(tl.float32)
            dot = tl.dot(z_tile, tl.trans(c_tile), input_precision=DOT_PRECISION)
        else:
            dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_mask = d0 + offs_d < D
                zt = tl.load(z_rows + d0 + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                ct = tl.load(c_rows + d0 + offs_d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    zt, ct = zt.to(tl.float32), ct.to(tl.float32)
                dot = tl.dot(zt, tl.trans(ct), dot, input_precision=DOT_PRECISION)
        bias = tl.load(bias_ptr + offs_k, mask=k_mask, other=float("inf"))
        score = bias[None, :] - SCALE * dot  # x2 is exact: one rounding, fused or not
        tile_best, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an equal score in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_arg, best_idx)

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(score_ptr + out, best, mask=n_mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=n_mask)


@triton.jit
def _vq_code_sums_kernel(
    z_ptr, order_ptr, offsets_ptr, sums_ptr,  # z [N, D]; order int64 [N]; offsets int64 [K + 1]; sums fp32 [K, D]
    K, D,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < K
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    start = tl.load(offsets_ptr + offs_c, mask=c_mask, other=0)
    count = tl.load(offsets_ptr + offs_c + 1, mask=c_mask, other=0) - start
    offs_r = tl.arange(0, BLOCK_R)
    # acc[c, j, d]: lane j of code c adds rows j, j + BLOCK_R, ... of its segment, in that order.
    acc = tl.zeros([BLOCK_C, BLOCK_R, BLOCK_D], tl.float32)
    for r0 in range(0, tl.max(count), BLOCK_R):
        r = r0 + offs_r[None, :]  # [1, BLOCK_R] position inside each code's segment
        r_mask = r < count[:, None]  # [BLOCK_C, BLOCK_R]
        rows = tl.load(order_ptr + start[:, None] + r, mask=r_mask, other=0)
        acc += tl.load(z_ptr + rows[:, :, None] * D + offs_d[None, None, :],
                       mask=r_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
    out = sums_ptr + offs_c.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out, tl.sum(acc, axis=1), mask=c_mask[:, None] & d_mask[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _nearest_config(N: int, K: int, D: int, device: torch.device) -> dict:
    """Tile sizes, warps and the codebook split for one call (see the module docstring)."""
    block_d = min(max(16, triton.next_power_of_2(D)), 64)  # tl.dot needs every dim >= 16
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    block_k = 128
    row_blocks, k_tiles = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    split = max(1, min(k_tiles, triton.cdiv(2 * _num_sms(device), row_blocks)))  # ~2 programs per SM
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, ONE_D_CHUNK=D <= block_d, split=split,
                tiles_per_split=tiles_per_split, num_warps=8 if block_n * block_k >= 128 * 128 else 4, num_stages=3)


def vq_ema_stats_triton(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts fp32 [K], sums fp32 [K, D]) of rows z [N, D] assigned to indices int64 [N]; deterministic."""
    D = z.shape[1]
    counts = torch.bincount(indices, minlength=num_codes)
    sums = torch.empty(num_codes, D, dtype=torch.float32, device=z.device)
    offsets = torch.zeros(num_codes + 1, dtype=torch.int64, device=z.device)
    offsets[1:] = counts.cumsum(0)
    order = torch.sort(indices, stable=True).indices
    block_c, block_d = 16, min(triton.next_power_of_2(D), 64)
    _vq_code_sums_kernel[(triton.cdiv(num_codes, block_c), triton.cdiv(D, block_d))](
        z, order, offsets, sums, num_codes, D, BLOCK_C=block_c, BLOCK_R=8, BLOCK_D=block_d, num_warps=4)
    return counts.float(), sums


def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", return_stats: bool = False):
    """z [N, D], codebook [K, D] -> (indices int64 [N], distances fp32 [N]) [+ (counts [K], sums [K, D]) fp32]."""
    stats_z = z
    if z.dtype != codebook.dtype:
        dtype = torch.promote_types(z.dtype, codebook.dtype)
        z, codebook = z.to(dtype), codebook.to(dtype)
    N, D = z.shape
    K = codebook.shape[0]
    dev = z.device
    if N == 0:
        idx, dist = torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, device=dev)
    else:
        if metric == "l2":
            bias = codebook.float().square().sum(1)
        else:
            bias = torch.zeros(K, dtype=torch.float32, device=dev)
        cfg = _nearest_config(N, K, D, dev)
        split = cfg.pop("split")
        score = torch.empty(split, N, dtype=torch.float32, device=dev)
        idx_part = torch.empty(split, N, dtype=torch.int64, device=dev)
        z2 = torch.empty(N, dtype=torch.float32, device=dev) if metric == "l2" else score
        _vq_nearest_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split)](
            z, codebook, bias, score, idx_part, z2, N, K, D, cfg.pop("tiles_per_split"),
            SCALE=2.0 if metric == "l2" else 1.0, WRITE_Z2=metric == "l2",
            UPCAST=_INTERPRET and z.dtype == torch.bfloat16,
            DOT_PRECISION="tf32x3" if z.dtype == torch.float32 else "tf32", **cfg)  # ignored for 16-bit inputs
        if split == 1:
            best, idx = score[0], idx_part[0]
        else:  # argmin takes the first (lowest) split on ties, i.e. the lowest code index
            pick = score.argmin(0, keepdim=True)
            best, idx = score.gather(0, pick)[0], idx_part.gather(0, pick)[0]
        dist = (best + z2).clamp_min_(0.0) if metric == "l2" else best + 1.0
    if not return_stats:
        return idx, dist
    return (idx, dist, *vq_ema_stats_triton(stats_z, idx, K))
