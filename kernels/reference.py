"""Pure-PyTorch references of the two kernels: the one place tests, benchmarks and the CPU path
use. Shapes and semantics here ARE the specification of the Triton kernels.

- ``vq_nearest_reference``: nearest code by squared L2 (or 1 - cosine), ties to the lowest
  index, in fp32, chunked over rows so [N, K] is never whole.
- ``vq_ema_stats_reference``: per-code counts and sums of an assignment, fp32, deterministic.
- ``masked_linear_cross_entropy_reference``: linear head + softmax cross-entropy on the rows a
  mask selects (logits in the input dtype, softmax in fp32), plus the accuracy of those rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2",
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D], codebook [K, D] -> (indices int64 [N], distances fp32 [N]).

    l2: squared distance ||z - e||^2, computed as ||z||^2 - 2 z.e + ||e||^2 in fp32 (the argmin
    uses -2 z.e + ||e||^2, which is exact in ranking up to fp32 rounding). cosine: inputs are
    expected l2-normalised; distance 1 - z.e. Ties go to the lowest index (torch.argmin).
    """
    zf, cf = z.float(), codebook.float()
    if metric == "l2":
        c2 = cf.square().sum(1)
    elif metric != "cosine":
        raise ValueError(f"metric='{metric}' must be 'l2' or 'cosine'")
    idx, dist = [], []
    for s in range(0, zf.shape[0], chunk):
        zc = zf[s:s + chunk]
        dots = zc @ cf.T
        score = (c2 - 2 * dots) if metric == "l2" else -dots
        best, arg = score.min(dim=1)
        idx.append(arg)
        dist.append((best + zc.square().sum(1)).clamp_min(0.0) if metric == "l2" else 1.0 + best)
    if not idx:
        return torch.empty(0, dtype=torch.long, device=z.device), torch.empty(0, device=z.device)
    return torch.cat(idx), torch.cat(dist)


def vq_ema_stats_reference(z: torch.Tensor, indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts fp32 [K], sums fp32 [K, D]) of rows ``z`` assigned to ``indices``.

    Counts by integer bincount; sums accumulated in fp64 and rounded to fp32 once, so the
    result does not depend on the order of accumulation (up to fp64 rounding).
    """
    counts = torch.bincount(indices, minlength=num_codes).float()
    sums = torch.zeros(num_codes, z.shape[1], dtype=torch.float64, device=z.device)
    sums.index_add_(0, indices, z.double())
    return counts, sums.float()


def masked_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                          targets: torch.Tensor, mask: torch.Tensor | None = None, *,
                                          reduction: str = "mean", label_smoothing: float = 0.0,
                                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, accuracy) over the rows where ``mask`` (all rows if None).

    hidden [N, H] or [B, L, H]; weight [V, H]; bias [V] or None; targets int64 shaped like
    hidden without its last dim; mask bool of that shape. Logits are computed in the input
    dtype and the softmax in fp32. reduction: mean (over selected rows; NaN if none, as
    torch), sum, or none (per selected row). accuracy: fraction of selected rows whose argmax
    (lowest index on ties) is the target (NaN if none).
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1)
    if mask is not None:
        sel = mask.reshape(-1)
        rows, tgt = rows[sel], tgt[sel]
    logits = F.linear(rows, weight, bias).float()
    loss = F.cross_entropy(logits, tgt, reduction=reduction, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == tgt).float().mean()
    return loss, acc
