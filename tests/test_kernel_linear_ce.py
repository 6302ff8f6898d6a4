"""Triton masked linear cross-entropy against fp64 torch (F.linear + F.cross_entropy + autograd).

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set below before triton
is imported); with CUDA it also runs the full size grid on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import peco_kernels  # noqa: E402
from peco_kernels.linear_ce import (  # noqa: E402
    _accumulate_dw, _FP32_OUT_MM, fp32_out_mm_supported, masked_linear_cross_entropy_triton, upcast_rows)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def _triton_runs() -> str:
    """'' if a trivial Triton kernel runs on DEVICE, else why not."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"no CUDA and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} (need '1' before triton import)"
    try:
        x = torch.zeros(1, device=DEVICE)
        _probe_kernel[(1,)](x)
        return "" if x.item() == 1.0 else "probe kernel ran but wrote the wrong value"
    except Exception as e:  # noqa: BLE001 - any failure means triton cannot run here
        return f"a trivial triton kernel fails on {DEVICE}: {type(e).__name__}: {e}"


_WHY = _triton_runs()
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY)

# (atol, rtol); atol is relative to the largest |reference| of that tensor, so one table
# serves every reduction and size. bf16 error comes from the bf16 logits and dlogits (the
# reference's spec: logits in the input dtype) and bf16-rounded outputs.
TOL = {
    torch.float32: {"loss": (1e-6, 1e-5), "hidden": (1e-5, 1e-4), "weight": (1e-5, 1e-4), "bias": (1e-5, 1e-4)},
    torch.bfloat16: {"loss": (3e-3, 3e-3), "hidden": (2e-2, 3e-2), "weight": (2e-2, 3e-2), "bias": (2e-2, 3e-2)},
}


def _assert_close(name, actual, expected, dtype):
    atol, rtol = TOL[dtype][name]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def _make(lead, H, V, dtype, *, bias=True, mask="random", seed=0):
    """Random inputs; logits ~ N(0, 3^2); half the selected targets are the argmax."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = None if b is None else b.to(dtype)
    logits = F.linear(hidden.double(), weight.double(), None if b is None else b.double())
    targets = torch.where(torch.rand(lead, generator=g) < 0.5, logits.argmax(-1),
                          torch.randint(0, V, lead, generator=g))
    m = {"random": torch.rand(lead, generator=g) < 0.6, "all": torch.ones(lead, dtype=torch.bool),
         "none": torch.zeros(lead, dtype=torch.bool), "one": torch.zeros(lead, dtype=torch.bool),
         "nomask": None}[mask]
    if mask == "one":
        m.view(-1)[lead[-1] // 2] = True
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dev(hidden), dev(weight), dev(b), dev(targets), dev(m)


def _upstream(reduction, M):
    """The gradient fed to backward: a non-unit scalar, or per-row values for 'none'."""
    if reduction != "none":
        return torch.tensor(0.7, dtype=torch.float64)
    return torch.linspace(-1.0, 2.0, M, dtype=torch.float64)


def _reference(hidden, weight, bias, targets, mask, reduction, eps):
    """fp64 on the inputs' device: (loss, accuracy, grad hidden, grad weight, grad bias), on CPU."""
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    b = None if bias is None else bias.detach().double().requires_grad_()
    rows, rows_in, tgt = h.reshape(-1, h.shape[-1]), hidden.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if mask is not None:
        sel = mask.reshape(-1)
        rows, rows_in, tgt = rows[sel], rows_in[sel], tgt[sel]
    logits = F.linear(rows, w, b)
    # the spec rounds the logits to the input dtype (one rounding; the kernel's fp32 sums round to the
    # same value but for rare near-ties): fp64 logits rounded so, with the fp64 gradient passed through
    logits = logits + (logits.detach().to(hidden.dtype).double() - logits.detach())
    loss = F.cross_entropy(logits, tgt, reduction=reduction, label_smoothing=eps)
    # accuracy as specified (reference.py): argmax of the logits in the input dtype, where
    # rounding creates ties that fp64 would break
    with torch.no_grad():
        acc = (F.linear(rows_in, weight, bias).float().argmax(-1) == tgt).double().mean()
    (loss * _upstream(reduction, rows.shape[0]).to(loss.device)).sum().backward()
    out = (loss.detach(), acc, h.grad, w.grad, None if b is None else b.grad)
    return tuple(None if t is None else t.cpu() for t in out)


def _triton(hidden, weight, bias, targets, mask, reduction, eps, chunk_rows=None):
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss, acc = masked_linear_cross_entropy_triton(h, w, b, targets, mask, reduction=reduction, label_smoothing=eps,
                                                   chunk_rows=chunk_rows)
    up = _upstream(reduction, loss.numel()).float().to(loss.device)
    (loss * up).sum().backward()
    return loss.detach(), acc, h.grad, w.grad, None if b is None else b.grad


def _check_case(lead, H, V, dtype, reduction, eps, bias, mask, chunk_rows=None, seed=0):
    hidden, weight, b, targets, m = _make(lead, H, V, dtype, bias=bias, mask=mask, seed=seed)
    loss, acc, gh, gw, gb = _triton(hidden, weight, b, targets, m, reduction, eps, chunk_rows)
    r_loss, r_acc, r_gh, r_gw, r_gb = _reference(hidden, weight, b, targets, m, reduction, eps)
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32 and not acc.requires_grad
    assert gh.dtype == dtype and gw.dtype == dtype and (gb is None or gb.dtype == dtype)
    _assert_close("loss", loss.cpu(), r_loss, dtype)
    _assert_close("hidden", gh.cpu(), r_gh, dtype)
    _assert_close("weight", gw.cpu(), r_gw, dtype)
    if b is not None:
        _assert_close("bias", gb.cpu(), r_gb, dtype)
    if m is not None:
        assert torch.all(gh[~m] == 0), "unselected rows must get an exactly zero gradient"
    if dtype == torch.float32:
        assert acc.item() == pytest.approx(r_acc.item())
    else:  # bf16 logits from a differently blocked matmul may round one near-tie differently
        assert abs(acc.item() - r_acc.item()) <= 1.0 / max(1, gh.shape[0] if m is None else int(m.sum())) + 1e-9


B16, F32 = torch.bfloat16, torch.float32
# (lead shape, H, V, dtype, reduction, label_smoothing, bias, mask, chunk_rows)
CPU_CASES = [
    ((1,), 64, 10, F32, "mean", 0.0, True, "all", None),
    ((1,), 1280, 8192, B16, "none", 0.1, False, "all", None),
    ((7,), 64, 10, B16, "sum", 0.1, False, "random", None),
    ((7,), 64, 1000, F32, "none", 0.1, True, "random", 3),      # several chunks, 'none' recompute
    ((7,), 64, 20011, B16, "mean", 0.1, True, "nomask", None),  # prime V > one block: online lse
    ((7,), 1280, 8192, B16, "mean", 0.1, True, "random", None),
    ((129,), 64, 1000, B16, "mean", 0.0, True, "random", 50),
    ((129,), 64, 10, B16, "sum", 0.0, True, "all", 16),         # 9 chunks, the last one short
    ((129,), 64, 8192, F32, "mean", 0.1, False, "random", None),
    ((129,), 64, 8192, B16, "none", 0.0, True, "all", None),
    ((129,), 1280, 8192, F32, "sum", 0.0, True, "random", None),
    ((129,), 1280, 8192, B16, "mean", 0.0, True, "random", None),
    ((3, 43), 64, 1000, B16, "mean", 0.1, True, "random", None),  # [B, L, H] with a [B, L] mask
    ((3, 43), 64, 777, F32, "none", 0.0, False, "random", None),
]
CUDA_CASES = [((n,), h, 8192, dt, red, eps, True, "all" if n == 1 else "random", None)  # one row: not a coin flip
              for n in (1, 7, 129, 1000) for h in (64, 1280) for dt in (F32, B16)
              for red, eps in (("mean", 0.0), ("sum", 0.1), ("none", 0.1))]


@pytest.mark.parametrize("lead,H,V,dtype,reduction,eps,bias,mask,chunk_rows",
                         CPU_CASES + (CUDA_CASES if DEVICE == "cuda" else []))
def test_matches_fp64(lead, H, V, dtype, reduction, eps, bias, mask, chunk_rows):
    _check_case(lead, H, V, dtype, reduction, eps, bias, mask, chunk_rows)


@pytest.mark.parametrize("dtype", [F32, B16])
@pytest.mark.parametrize("mask", ["one", "all"])
def test_one_and_all_selected(dtype, mask):
    _check_case((2, 7), 64, 1000, dtype, "mean", 0.1, True, mask)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_none_selected(reduction):
    """No selected row: loss NaN (mean, as torch) / 0 (sum) / empty (none); zero grads."""
    hidden, weight, b, targets, m = _make((2, 5), 64, 100, F32, mask="none")
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    loss, acc = masked_linear_cross_entropy_triton(h, w, bb, targets, m, reduction=reduction)
    assert torch.isnan(acc)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0.0
    else:
        assert loss.shape == (0,)
    loss.sum().backward()
    for t in (h, w, bb):
        assert t.grad is not None and t.grad.shape == t.shape and not torch.any(t.grad.nan_to_num(1.0) != 0)


@pytest.mark.parametrize("dtype", [F32, B16])
@pytest.mark.parametrize("V", [10, 20011])
def test_accuracy_ties_go_to_lowest_index(dtype, V):
    """Integer-valued logits (exact in bf16 and in any summation order) tie often; targets
    on the first or the last maximum make the tie rule decide the accuracy. V = 20011 puts
    tied maxima in different blocks of the online pass."""
    g = torch.Generator().manual_seed(1)
    N, H = 64, 16
    hidden = torch.randint(-1, 2, (N, H), generator=g).to(dtype)
    weight = torch.randint(-1, 2, (V, H), generator=g).to(dtype)
    logits = hidden.double() @ weight.double().T
    is_max = logits == logits.max(-1, keepdim=True).values
    first = is_max.int().argmax(-1)
    last = V - 1 - is_max.flip(-1).int().argmax(-1)
    targets = torch.where(torch.arange(N) % 2 == 0, first, last)
    assert (first != last).sum() >= 8, "the construction must produce ties"
    hidden, weight, targets = hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)
    with torch.no_grad():
        loss, acc = masked_linear_cross_entropy_triton(hidden, weight, None, targets, None)
    r_loss, r_acc, *_ = _reference(hidden, weight, None, targets, None, "mean", 0.0)
    expected = ((first == targets.cpu()).double().mean()).item()
    assert r_acc.item() == expected < 1.0
    assert acc.item() == expected
    _assert_close("loss", loss.cpu(), r_loss, dtype)


def test_near_certain_true_class_gradient_bf16():
    """p_t = 1 - delta with delta < 2^-9: rounding p to bf16 before subtracting 1 would give
    a zero gradient (Liger PR #1329). Exact bf16 logits: x_t = a, every other class 0."""
    V, H = 8192, 16
    a = torch.tensor([16.0, 18.0, 20.0, 22.0])  # delta = 9e-4 .. 2.3e-6
    N = a.numel()
    targets = torch.tensor([3, 500, 8191, 4096])
    hidden = torch.zeros(N, H)
    hidden[torch.arange(N), torch.arange(N)] = a
    weight = torch.zeros(V, H)
    weight[targets, torch.arange(N)] = 1.0
    delta = (V - 1) / (torch.exp(a.double()) + V - 1)
    assert torch.all(delta < 2.0**-9), "the test must probe p_t above the last bf16 step below 1"
    hidden, weight, bias = (t.to(B16).to(DEVICE) for t in (hidden, weight, torch.zeros(V)))
    targets = targets.to(DEVICE)
    loss, acc, gh, gw, gb = _triton(hidden, weight, bias, targets, None, "mean", 0.0)
    r_loss, r_acc, r_gh, r_gw, r_gb = _reference(hidden, weight, bias, targets, None, "mean", 0.0)
    assert acc.item() == r_acc.item() == 1.0
    rows, t_cpu = torch.arange(N), targets.cpu()
    # true-class entries, each relative to itself (an atol on the whole tensor would pass zeros)
    other = 1.0 / (torch.exp(a.double()) + V - 1)  # p of each row at every non-target class
    expected_gb = 0.7 / N * (-delta + other.sum() - other)
    torch.testing.assert_close(r_gb[t_cpu], expected_gb, rtol=1e-6, atol=0)
    torch.testing.assert_close(gb.cpu().double()[t_cpu], expected_gb, rtol=2e-2, atol=0)
    torch.testing.assert_close(gw.cpu().double()[t_cpu, rows], r_gw[t_cpu, rows], rtol=2e-2, atol=0)
    torch.testing.assert_close(gh.cpu().double()[rows, rows], r_gh[rows, rows], rtol=2e-2, atol=0)
    torch.testing.assert_close(loss.cpu().double(), r_loss, rtol=2e-2, atol=0)


def test_grads_only_where_needed_and_no_grad():
    hidden, weight, b, targets, m = _make((4, 9), 64, 1000, F32)
    w = weight.clone().requires_grad_()
    loss, _ = masked_linear_cross_entropy_triton(hidden, w, b, targets, m)  # frozen hidden and bias
    (loss * 0.7).backward()
    r_loss, _, _, r_gw, _ = _reference(hidden, weight, b, targets, m, "mean", 0.0)
    _assert_close("weight", w.grad.cpu(), r_gw, F32)
    with torch.no_grad():
        loss2, _ = masked_linear_cross_entropy_triton(hidden, w, b, targets, m)
    assert not loss2.requires_grad and loss2.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("dtype", [F32, B16])
def test_public_api_matches_torch_backend(dtype):
    hidden, weight, b, targets, m = _make((3, 40), 64, 1000, dtype, seed=3)
    out = {}
    for backend in ("triton", "torch"):
        h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
        loss, acc = peco_kernels.masked_linear_cross_entropy(h, w, bb, targets, m, reduction="mean",
                                                             label_smoothing=0.1, backend=backend,
                                                             return_accuracy=True)
        loss.backward()
        out[backend] = (loss.detach(), acc, h.grad, w.grad, bb.grad)
    for name, a, e in zip(("loss", "accuracy", "hidden", "weight", "bias"), out["triton"], out["torch"]):
        _assert_close("loss" if name == "accuracy" else name, a.cpu(), e.cpu().double(), dtype)


@pytest.mark.parametrize("bad", ["float_targets", "target_ge_V", "target_negative", "mask_shape", "mask_int",
                                 "H_mismatch", "int_hidden", "weight_dtype", "bias_dtype", "bias_shape"])
def test_bad_input_raises(bad):
    hidden, weight, b, targets, m = _make((2, 5), 64, 100, F32)
    if bad == "target_negative":
        targets = targets.clone()
        targets[m] = -1
    elif bad == "mask_int":
        m = m.long()
    elif bad == "int_hidden":
        hidden = hidden.long()
    elif bad == "weight_dtype":
        weight = weight.to(B16)
    elif bad == "bias_dtype":
        b = b.to(B16)
    elif bad == "bias_shape":
        b = b[:50]
    elif bad == "float_targets":
        targets = targets.float()
    elif bad == "target_ge_V":
        targets = targets.clone()
        targets[m] = 100
    elif bad == "mask_shape":
        m = m.reshape(-1)
    else:
        weight = weight[:, :32]
    for backend in ("triton", "torch"):
        with pytest.raises(peco_kernels.KernelInputError) as err:
            peco_kernels.masked_linear_cross_entropy(hidden, weight, b, targets, m, backend=backend)
        assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_autocast_casts_like_f_linear():
    """Under bf16 autocast, fp32 hidden/weight/bias (a mixed pair included) give the loss and fp32
    gradients of the reference run under the same autocast, on both backends."""
    hidden, weight, b, targets, m = _make((2, 30), 64, 500, F32, seed=10)
    out = {}
    for backend in ("triton", "torch", "reference"):
        h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
        with torch.autocast(DEVICE, dtype=B16):
            if backend == "reference":
                loss = peco_kernels.masked_linear_cross_entropy_reference(h, w, bb, targets, m)[0]
            else:
                loss = peco_kernels.masked_linear_cross_entropy(h.to(B16), w, bb, targets, m, backend=backend)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == bb.grad.dtype == F32
        out[backend] = (loss.detach().double(), h.grad.double(), w.grad.double(), bb.grad.double())
    for backend in ("triton", "torch"):
        for name, a, e in zip(("loss", "hidden", "weight", "bias"), out[backend], out["reference"]):
            _assert_close(name, a.cpu(), e.cpu(), B16)


@pytest.mark.parametrize("dtype", [F32, B16])
def test_strided_and_misaligned_inputs_give_the_same_result(dtype):
    """Non-contiguous hidden and weight, and targets/mask/bias starting off a 16-byte boundary
    (an int64 slice at offset 1): the same loss and gradients as contiguous copies."""
    hidden, weight, b, targets, m = _make((3, 40), 64, 300, dtype, seed=9)
    big_t = torch.zeros(targets.numel() + 1, dtype=torch.long, device=DEVICE)
    big_t[1:] = targets.reshape(-1)
    odd_targets = big_t[1:].view(3, 40)
    assert odd_targets.data_ptr() % 16 == 8
    big_m = torch.zeros(m.numel() + 3, dtype=torch.bool, device=DEVICE)
    big_m[3:] = m.reshape(-1)
    odd_mask = big_m[3:].view(3, 40)
    big_b = torch.zeros(b.numel() + 1, dtype=dtype, device=DEVICE)
    big_b[1:] = b
    results = []
    for strided in (False, True):
        if strided:  # the same values laid out transposed in memory
            h = hidden.transpose(0, 1).contiguous().transpose(0, 1).detach().requires_grad_()
            w = weight.t().contiguous().t().detach().requires_grad_()
            bb = big_b[1:].detach().requires_grad_()
            tg, mk = odd_targets, odd_mask
            assert not h.is_contiguous() and not w.is_contiguous()
        else:
            h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
            tg, mk = targets, m
        loss, acc = peco_kernels.masked_linear_cross_entropy(h, w, bb, tg, mk, backend="triton", return_accuracy=True)
        loss.backward()
        results.append((loss.detach(), acc, h.grad, w.grad, bb.grad))
    for name, a, e in zip(("loss", "loss", "hidden", "weight", "bias"), *results):
        _assert_close(name, a.cpu(), e.cpu().double(), dtype)


def test_many_chunks_accumulate_in_fp32():
    """256 one-row chunks of identical rows (p = 0.9 on the target, ~0.011 elsewhere): a bf16
    running sum of db/dW rounds every increment to the sum's ulp (0.0156 past 2, -0.125 past
    -16), ending ~10% off the true 2.84 and -25.6 (Liger #512, CCE #14)."""
    N, H, V = 256, 16, 10
    hidden = torch.zeros(N, H)
    hidden[:, 0] = 1.0
    weight = torch.zeros(V, H)
    weight[0, 0] = 4.394  # e^x / (e^x + 9) ~ 0.9
    hidden, weight, bias = (t.to(B16).to(DEVICE) for t in (hidden, weight, torch.zeros(V)))
    targets = torch.zeros(N, dtype=torch.long, device=DEVICE)
    loss, acc, gh, gw, gb = _triton(hidden, weight, bias, targets, None, "sum", 0.0, chunk_rows=1)
    r_loss, r_acc, r_gh, r_gw, r_gb = _reference(hidden, weight, bias, targets, None, "sum", 0.0)
    for name, a, e in (("loss", loss, r_loss), ("hidden", gh, r_gh), ("weight", gw, r_gw), ("bias", gb, r_gb)):
        _assert_close(name, a.cpu(), e, B16)


def test_peak_memory_stays_under_the_chunk_bound():
    """Forward + backward never holds the [M, V] fp32 logits: measured by the bench's live-bytes
    meter, the peak stays within buffer + dH + the fp32 dW accumulator + one chunk's product (or
    the fp32 slices the fallback multiplies) + the backward's scaled copies, while the eager reference
    measured the same way holds its fp32 logits, log-softmax and their gradient at once."""
    from peco_kernels.bench import LiveBytes

    M, H, V = 512, 32, 8192  # the interpreter runs one program per row: rows cost time here
    g = torch.Generator().manual_seed(11)
    hidden = (torch.randn(M, H, generator=g) * 0.5).to(B16).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(B16).to(DEVICE)
    bias = torch.zeros(V, dtype=B16, device=DEVICE)
    targets = torch.randint(0, V, (M,), generator=g).to(DEVICE)

    def peak(fn):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        meter = LiveBytes()
        with meter:
            fn(h, w, b).backward()
        return meter.peak

    eager = peak(lambda h, w, b: peco_kernels.masked_linear_cross_entropy_reference(h, w, b, targets)[0])
    logits32 = M * V * 4
    assert eager >= 3 * logits32, f"the meter missed the reference's fp32 buffers: {eager} bytes"
    grads = M * H * 2 + V * H * 2 + V * 2  # what stays: the three gradients, bf16
    for chunk_rows in (None, M // 4):
        rows = M if chunk_rows is None else chunk_rows  # 8 MiB of bf16 logits: one chunk by default
        got = peak(lambda h, w, b: masked_linear_cross_entropy_triton(h, w, b, targets, None, chunk_rows=chunk_rows)[0])
        # dW's product: an fp32 [V, H] result where the fp32-output matmul exists (CUDA), else
        # fp32 copies of a slice of the chunk's dlogits and rows
        product = V * H * 4 if fp32_out_mm_supported(hidden.device) else upcast_rows(rows, V) * (V + H) * 4
        bound = rows * V * 2 + M * H * 2 + V * H * 4 + product + grads + 2**20
        assert got <= bound, f"chunk_rows={chunk_rows}: peak {got} > bound {bound} bytes"
        assert got < logits32 and got <= 0.25 * eager, (got, eager)


@pytest.mark.parametrize("fallback", [True, False])
def test_dw_product_is_fp32_on_both_paths(fallback, monkeypatch):
    """dW += dlogits^T @ rows keeps the 16-bit product in fp32 on both paths: cuBLAS's fp32-output
    matmul where torch has it, else (CPU, torch without ``mm(..., out_dtype=)``) upcast slices. Both
    match the fp64 product to fp32 rounding; a product rounded to bf16 first would be ~1e-3 off."""
    dev = torch.device(DEVICE)
    if not fallback and not fp32_out_mm_supported(dev):
        pytest.skip(f"torch {torch.__version__} has no fp32-output 16-bit matmul on {dev.type}: only the fallback runs")
    if fallback:
        monkeypatch.setitem(_FP32_OUT_MM, dev.type, False)
    g = torch.Generator().manual_seed(12)
    C, V, H = 37, 300, 48
    assert upcast_rows(C, V) < C  # several slices
    dl, rows = (torch.randn(C, n, generator=g).to(B16) for n in (V, H))
    dw = torch.full((V, H), 0.5)
    ref = dw.double() + dl.double().t() @ rows.double()
    dw = dw.to(dev)
    _accumulate_dw(dw, dl.to(dev), rows.to(dev))
    assert dw.dtype == torch.float32
    rel = ((dw.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    rounded = (dl.t() @ rows).double() + 0.5  # what a bf16 product would give
    assert ((rounded - ref).norm() / ref.norm()).item() > 100 * rel
