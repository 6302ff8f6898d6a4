"""Masked linear + softmax cross-entropy: Triton row kernel, chunked launcher, autograd Function.

Semantics are those of ``reference.masked_linear_cross_entropy_reference`` (logits in the input
dtype, softmax in fp32). The fp32 [M, V] logits are never formed: rows go through a reusable
[chunk, V] buffer bounded by ``_CHUNK_BYTES`` (128 MiB), GEMMs run in cuBLAS, and dW/db are
accumulated across chunks in fp32. Reduction "none" computes its gradients in backward (8MHV
instead of 6MHV).

Design notes: docs/design.md
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK_BYTES = 128 * 2**20  # bound on the transient [chunk, V] logits/dlogits buffer
_MAX_BLOCK_V = 32768 // 2   # elements of one row held per program iteration (as Liger)


@triton.jit
def _ce_rows_kernel(
    logits_ptr, logits_stride,  # [C, V] input dtype; overwritten with dlogits when HAS_GRAD
    targets_ptr,                # [M] int64, indexed at row_start + row
    loss_ptr, correct_ptr,      # [M] fp32, [M] int32 outputs
    scale_ptr, scale,           # per-row fp32 grad scale [M] (ROW_SCALE) or one scalar
    row_start, V, eps,
    BLOCK_V: tl.constexpr, HAS_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, SMOOTH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = row_start + pid
    ptr = logits_ptr + pid * logits_stride
    t = tl.load(targets_ptr + row)
    x_t = tl.load(ptr + t).to(tl.float32)

    # Pass 1: online logsumexp; sum over classes != t (for 1 - p_t); running argmax, ties to
    # the lowest index (strict > across blocks, tie_break_left within one); sum of logits.
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], tl.float32)
    d_other = tl.zeros([], tl.float32)
    sum_x = tl.zeros([], tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        blk_max = tl.max(x, axis=0)
        blk_arg = tl.argmax(x, axis=0, tie_break_left=True)
        best_idx = tl.where(blk_max > best, start + blk_arg, best_idx)
        best = tl.maximum(best, blk_max)
        m_new = tl.maximum(m, blk_max)
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        d = d * alpha + tl.sum(e, axis=0)
        d_other = d_other * alpha + tl.sum(tl.where(offs == t, 0.0, e), axis=0)
        if SMOOTH:
            sum_x += tl.sum(tl.where(valid, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    loss = lse - x_t
    if SMOOTH:
        # torch: (1 - eps) * nll + eps * mean_c(-log p_c), and -log p_c = lse - x_c
        loss = (1.0 - eps) * loss + eps * (lse - sum_x / V)
    tl.store(loss_ptr + row, loss)
    tl.store(correct_ptr + row, (best_idx == t).to(tl.int32))

    if HAS_GRAD:
        if ROW_SCALE:
            s = tl.load(scale_ptr + row)
        else:
            s = scale
        # true class: p_t - eps/V - (1 - eps) = -(1 - p_t) + eps * (1 - 1/V), in fp32
        g_t = eps - eps / V - d_other / d
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
            g = tl.where(offs == t, g_t, tl.exp(x - lse) - eps / V)
            tl.store(ptr + offs, (g * s).to(logits_ptr.dtype.element_ty), mask=valid)


_UPCAST_BYTES = 32 * 2**20  # bound on the fp32 copy of a dlogits slice where no fp32-output matmul exists
_FP32_OUT_MM: dict[str, bool] = {}  # device type -> does torch.mm(bf16, bf16, out_dtype=fp32) run there


def fp32_out_mm_supported(device: torch.device) -> bool:
    """Whether this torch has a 16-bit matmul with an fp32 output on ``device`` (``torch.mm(...,
    out_dtype=)``: CUDA in recent torch, not CPU); probed once per device type."""
    if device.type not in _FP32_OUT_MM:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _FP32_OUT_MM[device.type] = ok
    return _FP32_OUT_MM[device.type]


def upcast_rows(chunk_rows: int, V: int) -> int:
    """Rows of a dlogits chunk upcast at once by the fallback: at most ``_UPCAST_BYTES`` and an
    eighth of the chunk, so the fp32 slice stays at a quarter of the chunk's 16-bit buffer."""
    return max(1, min(_UPCAST_BYTES // (4 * V), -(-chunk_rows // 8)))


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, rows: torch.Tensor) -> None:
    """dw fp32 [V, H] += dlogits^T [V, C] @ rows [C, H], the product itself in fp32.

    16-bit inputs: cuBLAS's fp32-output matmul where this torch has it; elsewhere (CPU, older
    torch) slices of at most ``_UPCAST_BYTES`` are upcast and added in place (16-bit values are
    exact in fp32 and in tf32, so the product is the same up to fp32 summation order)."""
    if dlogits.dtype == torch.float32:
        dw.addmm_(dlogits.t(), rows)
    elif fp32_out_mm_supported(dlogits.device):
        dw.add_(torch.mm(dlogits.t(), rows, out_dtype=torch.float32))
    else:
        step = upcast_rows(*dlogits.shape)
        for s in range(0, dlogits.shape[0], step):
            dw.addmm_(dlogits[s:s + step].t().float(), rows[s:s + step].float())


def _launch(rows, weight, bias, targets, *, eps, scale, need_dh, need_dw, need_db, chunk_rows=None):
    """rows [M, H], weight [V, H], bias [V] or None, targets int64 [M] 16-byte aligned ->
    (loss fp32 [M], correct int32 [M], dH [M, H] in rows' dtype or None, dW fp32 [V, H] or
    None, db fp32 [V] or None).

    scale: None (forward only), a float (every row's gradient scale) or fp32 [M] (per row).
    """
    M, V = rows.shape[0], weight.shape[0]
    dev, dtype = rows.device, rows.dtype
    has_grad = scale is not None and (need_dh or need_dw or need_db)
    row_scale = isinstance(scale, torch.Tensor)
    loss = torch.empty(M, dtype=torch.float32, device=dev)
    correct = torch.empty(M, dtype=torch.int32, device=dev)
    dh = torch.empty_like(rows) if has_grad and need_dh else None
    dw = db = None
    if chunk_rows is None:  # equal chunks under _CHUNK_BYTES (no small tail GEMM)
        chunks = max(1, -(-M * V * rows.element_size() // _CHUNK_BYTES))
        chunk_rows = -(-M // chunks)
    chunk_rows = max(1, min(chunk_rows, M))
    buf = torch.empty(chunk_rows, V, dtype=dtype, device=dev) if M else None
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    num_warps = 32 if block_v >= 8192 else (16 if block_v >= 2048 else 4)
    wt = weight.t()
    for s in range(0, M, chunk_rows):
        e = min(s + chunk_rows, M)
        rows_c, logits = rows[s:e], buf[: e - s]
        if bias is None:
            torch.mm(rows_c, wt, out=logits)
        else:
            torch.addmm(bias, rows_c, wt, out=logits)
        _ce_rows_kernel[(e - s,)](
            logits, logits.stride(0), targets, loss, correct,
            scale if row_scale else loss, 0.0 if row_scale or scale is None else float(scale),
            s, V, float(eps),
            BLOCK_V=block_v, HAS_GRAD=has_grad, ROW_SCALE=row_scale, SMOOTH=eps > 0, num_warps=num_warps,
        )
        if not has_grad:
            continue
        if need_dh:
            torch.mm(logits, weight, out=dh[s:e])
        if need_dw:
            if dw is None:
                dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            _accumulate_dw(dw, logits, rows_c)
        if need_db:
            part = logits.sum(0, dtype=torch.float32)
            db = part if db is None else db.add_(part)
    if has_grad and need_dw and dw is None:  # no rows
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
    if has_grad and need_db and db is None:
        db = torch.zeros(V, dtype=torch.float32, device=dev)
    return loss, correct, dh, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(rows [M, H], weight [V, H], bias [V] | None, targets int64 [M]) -> (loss, accuracy).

    mean/sum: the gradients are computed in forward (scaled by 1/M or 1) and multiplied by
    the incoming scalar gradient in backward. none: recomputed in backward per row.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, reduction, eps, grad_enabled, chunk_rows):
        need_dh, need_dw, need_db = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        M = rows.shape[0]
        ctx.reduction, ctx.eps, ctx.chunk_rows = reduction, eps, chunk_rows
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        in_forward = reduction != "none" and (need_dh or need_dw or need_db)
        scale = (1.0 / max(M, 1) if reduction == "mean" else 1.0) if in_forward else None
        loss_rows, correct, dh, dw, db = _launch(rows, weight, bias, targets, eps=eps, scale=scale, need_dh=need_dh,
                                                 need_dw=need_dw, need_db=need_db, chunk_rows=chunk_rows)
        if reduction == "none":
            ctx.save_for_backward(rows, weight, bias, targets)
            loss = loss_rows
        else:
            ctx.save_for_backward(dh, dw, db)
            loss = loss_rows.mean() if reduction == "mean" else loss_rows.sum()
        accuracy = correct.float().mean()
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_accuracy):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            rows, weight, bias, targets = ctx.saved_tensors
            _, _, dh, dw, db = _launch(rows, weight, bias, targets, eps=ctx.eps,
                                       scale=grad_loss.float().contiguous(), need_dh=need_dh, need_dw=need_dw,
                                       need_db=need_db, chunk_rows=ctx.chunk_rows)
        else:
            dh, dw, db = ctx.saved_tensors
            g = grad_loss.float()
            dh = None if dh is None else dh * g  # 0-dim fp32: bf16 result, g not rounded first
            dw = None if dw is None else dw * g
            db = None if db is None else db * g
        dw = None if dw is None else dw.to(w_dtype)
        db = None if db is None else db.to(b_dtype)
        return dh, dw, db, None, None, None, None, None


def masked_linear_cross_entropy_triton(hidden, weight, bias, targets, mask, *, reduction="mean",
                                       label_smoothing=0.0, chunk_rows=None):
    """hidden [N, H] or [B, L, H], weight [V, H], bias [V] or None, targets int64 of hidden's
    leading shape, mask bool of that shape or None -> (loss fp32, accuracy fp32 detached).

    Inputs are validated by ``peco_kernels.masked_linear_cross_entropy``. Unselected rows get
    a zero gradient. ``chunk_rows`` overrides the rows per chunk (tests use it to exercise
    the cross-chunk fp32 accumulation at small sizes).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1)
    if mask is not None:
        idx = mask.reshape(-1).nonzero().squeeze(1)
        flat, tgt = flat.index_select(0, idx), tgt.index_select(0, idx)
    tgt = tgt.contiguous()
    if tgt.data_ptr() % 16:
        tgt = tgt.clone()
    return LinearCrossEntropyFunction.apply(flat, weight, bias, tgt, reduction, float(label_smoothing),
                                            torch.is_grad_enabled(), chunk_rows)
