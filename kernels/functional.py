"""Public functions: input checks, backend choice, then the Triton launcher or the reference.

backend="auto": Triton for CUDA tensors, the torch reference otherwise. backend="triton" on CPU
tensors works under TRITON_INTERPRET=1 (set before triton is imported), which the tests use.
"""

from __future__ import annotations

import os

import torch

from . import reference as ref

BACKENDS = ("auto", "triton", "torch")


class KernelInputError(ValueError):
    """Bad input to a kernel: one line naming the value and the fix."""


def _backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise KernelInputError(f"backend='{backend}' must be one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return "triton" if on_cuda and _triton_available() else "torch"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelInputError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported "
                               "(or use backend='torch' / 'auto')")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (Triton assumes alignment of int64 pointers it specialises on)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelInputError(f"{name} has dtype {t.dtype}; pass float32, bfloat16 or float16")


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", backend: str = "auto",
               return_stats: bool = False):
    """Nearest code of each row, never materialising [N, K].

    z [N, D], codebook [K, D] (fp32/bf16/fp16) -> (indices int64 [N], distances fp32 [N]); with
    ``return_stats`` also (counts fp32 [K], sums fp32 [K, D]) of the assignment (the EMA
    statistics), computed deterministically. Ties go to the lowest index.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise KernelInputError(f"z {tuple(z.shape)} and codebook {tuple(codebook.shape)} must be [N, D] and [K, D] "
                               f"with the same D")
    _check_float("z", z)
    _check_float("codebook", codebook)
    if metric not in ("l2", "cosine"):
        raise KernelInputError(f"metric='{metric}' must be 'l2' or 'cosine'")
    if z.device != codebook.device:
        raise KernelInputError(f"z is on {z.device} but codebook on {codebook.device}; move them to one device")
    if codebook.shape[0] == 0:
        raise KernelInputError("codebook has 0 codes")
    if _backend(backend, z, codebook) == "triton":
        from .vq import vq_nearest_triton

        return vq_nearest_triton(_aligned(z), _aligned(codebook), metric=metric, return_stats=return_stats)
    idx, dist = ref.vq_nearest_reference(z, codebook, metric=metric)
    if not return_stats:
        return idx, dist
    return (idx, dist, *ref.vq_ema_stats_reference(z, idx, codebook.shape[0]))


def _flatten_rows(hidden, targets, mask):
    if hidden.dim() not in (2, 3):
        raise KernelInputError(f"hidden {tuple(hidden.shape)} must be [N, H] or [B, L, H]")
    lead = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != lead:
        raise KernelInputError(f"targets {tuple(targets.shape)} must have hidden's leading shape {lead}")
    if mask is not None and tuple(mask.shape) != lead:
        raise KernelInputError(f"mask {tuple(mask.shape)} must have hidden's leading shape {lead}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"targets have dtype {targets.dtype}; pass class indices as int64")
    if mask is not None and mask.dtype != torch.bool:
        raise KernelInputError(f"mask has dtype {mask.dtype}; pass a bool mask (True = row counts)")


def masked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, mask: torch.Tensor | None = None, *, reduction: str = "mean",
                                label_smoothing: float = 0.0, backend: str = "auto", return_accuracy: bool = False,
                                validate: bool = True):
    """Cross-entropy of ``hidden @ weight.T + bias`` at the rows ``mask`` selects, without
    materialising the [rows, V] fp32 logits. Grads flow to hidden, weight and bias.

    With ``return_accuracy`` returns (loss, accuracy), the accuracy taken from the same pass.
    ``validate`` checks targets are in [0, V) on the selected rows (one device sync). Under
    autocast, hidden, weight and bias are cast to the autocast dtype first, as ``F.linear`` is.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = [None if t is None else t.to(dt) if t.is_floating_point() else t for t in (hidden, weight, bias)]
        with torch.autocast(dev, enabled=False):
            return masked_linear_cross_entropy(*cast, targets, mask, reduction=reduction,
                                               label_smoothing=label_smoothing, backend=backend,
                                               return_accuracy=return_accuracy, validate=validate)
    _flatten_rows(hidden, targets, mask)
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise KernelInputError(f"weight {tuple(weight.shape)} must be [V, H] with H = {hidden.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise KernelInputError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise KernelInputError(f"{name} is {t.dtype} but hidden is {hidden.dtype}; cast them to one dtype "
                                   f"(or run the head under autocast, which casts both)")
    for name, t in (("weight", weight), ("bias", bias), ("targets", targets), ("mask", mask)):
        if t is not None and t.device != hidden.device:
            raise KernelInputError(f"{name} is on {t.device} but hidden on {hidden.device}; move them to one device")
    if reduction not in ("mean", "sum", "none"):
        raise KernelInputError(f"reduction='{reduction}' must be mean, sum or none")
    if not 0.0 <= label_smoothing < 1.0:
        raise KernelInputError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
    if validate:
        sel = targets if mask is None else targets[mask]
        if sel.numel() and bool(((sel < 0) | (sel >= weight.shape[0])).any()):
            bad = sel[(sel < 0) | (sel >= weight.shape[0])][0].item()
            raise KernelInputError(f"target {bad} is outside [0, {weight.shape[0]}) (V = weight.shape[0]); "
                                   f"check the tokenizer's codebook size against the head")
    if _backend(backend, hidden, weight) == "triton":
        from .linear_ce import masked_linear_cross_entropy_triton

        loss, acc = masked_linear_cross_entropy_triton(
            hidden, weight, bias, targets.long(), mask, reduction=reduction, label_smoothing=label_smoothing)
    else:
        loss, acc = ref.masked_linear_cross_entropy_reference(hidden, weight, bias, targets.long(), mask,
                                                              reduction=reduction, label_smoothing=label_smoothing)
    return (loss, acc) if return_accuracy else loss
