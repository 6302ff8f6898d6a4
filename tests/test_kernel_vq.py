"""The Triton nearest-code kernel (+ EMA statistics) against fp64 references computed another way.

On CPU the kernels run under TRITON_INTERPRET=1 (set here, before triton is imported), which is
slow (its dot is a plain numpy loop), so the CPU grid is a hand-picked subset covering every
awkward size once; with CUDA the full grid (N x K x D x dtype, 240 cases) runs, and N = 1000
with K = 8192, every D at K = 8192 and most dtype/size combinations run only there. The
interpreter's argmin always takes the leftmost of equal values, so the in-tile tie-break
(tie_break_left) is only really tested on CUDA; the cross-tile and cross-split ones are tested here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import peco_kernels  # noqa: E402
from peco_kernels import KernelInputError  # noqa: E402
from peco_kernels.functional import vq_nearest  # noqa: E402  (the public function, whatever shadows its name)

vq_mod = importlib.import_module("peco_kernels.vq")
vq_nearest_triton = vq_mod.vq_nearest_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(vq_mod._vq_nearest_kernel, InterpretedFunction):
        pytest.skip("no CUDA and the Triton interpreter is off (TRITON_INTERPRET must be 1 before triton is "
                    "imported)", allow_module_level=True)

EPS32 = torch.finfo(torch.float32).eps
# The kernel scores in fp32 whatever the input dtype (16-bit products are exact in fp32). fp32
# inputs go through tf32x3 on CUDA, which adds ~4 eps32 per product over ieee fp32.
EPS_FACTOR = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}

# (N, K, D, dtype): every awkward size once, small enough for the interpreter (~60 MMAC/s).
CPU_GRID = [
    (1, 8192, 32, torch.float32),     # one row: codebook split over programs
    (7, 5, 24, torch.bfloat16),       # K < tile, D not a power of 2
    (129, 100, 8, torch.float32),     # D = 8 padded to the 16 tl.dot needs; N one past a block
    (129, 8192, 32, torch.bfloat16),  # the production K and D
    (1000, 1, 256, torch.float32),    # K = 1; D looped in chunks
    (1000, 100, 256, torch.bfloat16),
    (7, 8192, 16, torch.float32),     # split path on a 16-dim codebook
    (129, 1000, 24, torch.float32),   # K not a multiple of the tile, several tiles
    (33, 300, 32, torch.float16),
]
FULL_GRID = list(itertools.product([1, 7, 129, 1000], [1, 5, 100, 8192], [8, 16, 24, 32, 256],
                                   [torch.float32, torch.bfloat16, torch.float16]))
GRID = FULL_GRID if CUDA else CPU_GRID


def _ids(grid):
    return [f"N{n}-K{k}-D{d}-{str(t).split('.')[-1]}" for n, k, d, t in grid]


def fp64_distances(z, codebook, metric):
    """[N, K] fp64 distances of the exact input values (test sizes only)."""
    zd, cd = z.double(), codebook.double()
    if metric == "cosine":
        return 1.0 - zd @ cd.T
    return zd.square().sum(1, keepdim=True) - 2.0 * zd @ cd.T + cd.square().sum(1)


def score_tolerance(z, codebook, dtype):
    """Per-row bound [N] on the fp32 error of a score / distance: (D + 8) eps * magnitude."""
    scale = z.double().square().sum(1) + codebook.double().square().sum(1).max()
    return (z.shape[1] + 8) * EPS32 * EPS_FACTOR[dtype] * scale


def check_against_fp64(z, codebook, idx, dist, metric="l2", max_flips=None):
    """Indices equal fp64's argmin except on near ties (rare: at most ``max_flips``, by default 1% of
    rows; fp64 top-2 gap within tolerance); distances close."""
    ref = fp64_distances(z, codebook, metric)
    tol = score_tolerance(z, codebook, z.dtype)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == dist.shape == (z.shape[0],)
    assert bool(((idx >= 0) & (idx < codebook.shape[0])).all())
    best, arg = ref.min(1)
    top2 = ref.topk(min(2, ref.shape[1]), dim=1, largest=False).values
    gap = top2[:, 1] - top2[:, 0] if ref.shape[1] > 1 else torch.full_like(best, float("inf"))
    picked = ref.gather(1, idx[:, None])[:, 0]
    assert bool((picked - best <= tol).all()), "a picked code is worse than the best by more than fp32 error"
    wrong = idx != arg
    assert bool((gap[wrong] <= 2 * tol[wrong]).all()), \
        f"argmin differs where the fp64 top-2 gap is clear: gaps {gap[wrong][:5].tolist()} tol {tol[wrong][:5].tolist()}"
    max_flips = max(1, z.shape[0] // 100) if max_flips is None else max_flips
    assert int(wrong.sum()) <= max_flips, f"{int(wrong.sum())} near-tie flips of {z.shape[0]} rows"
    assert bool(((dist.double() - best).abs() <= tol + 1e-6).all()), \
        f"distance off by {(dist.double() - best).abs().max().item()}"


@pytest.mark.parametrize("n,k,d,dtype", GRID, ids=_ids(GRID))
def test_nearest_matches_fp64(n, k, d, dtype):
    g = torch.Generator().manual_seed(n * 7919 + k * 31 + d)
    z = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    codebook = (0.5 * torch.randn(k, d, generator=g)).to(DEVICE, dtype)
    idx, dist = vq_nearest_triton(z, codebook, metric="l2")
    check_against_fp64(z, codebook, idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicates_go_to_lowest_index_across_tiles_and_splits(dtype):
    """Equal scores go to the lowest index, as torch.argmin: inside a tile, across tiles and across
    the codebook splits merged after the launch.

    The codes and rows are small integers (and quarters), so every product and partial sum is
    exact in fp32 and a duplicate's score is bitwise equal to the original's in any summation
    order. With real-valued data that is not so under the interpreter: its dot is numpy's sgemm,
    whose OpenBLAS kernels sum one output element in a different order depending on its column
    inside the tile (measured: the same z.e at tile column 3 and 107 differed by one ulp), so a
    row sitting on a duplicated code was a near tie, not a tie, and either copy could win."""
    g = torch.Generator().manual_seed(1)
    k, d = 2048, 24  # 16 tiles of 128; few rows -> the codebook is split over programs
    codebook = torch.randint(-4, 5, (k, d), generator=g).float()
    base = torch.arange(0, 40) * 3
    # copies of code b inside its tile, in the next tile and in a later split
    for b in base.tolist():
        for off in (1, 128, 1000):
            codebook[(b + off) % k] = codebook[b]
    z = codebook[base] + 0.25 * torch.randint(-1, 2, (len(base), d), generator=g)
    z[:5] = codebook[base[:5]]  # rows sitting exactly on a duplicated code: distance 0
    z, codebook = z.to(dtype).to(DEVICE), codebook.to(dtype).to(DEVICE)
    cfg = vq_mod._nearest_config(len(base), k, d, torch.device(DEVICE))
    assert cfg["split"] > 1 and (1000 // 128) // cfg["tiles_per_split"] > 0, cfg  # the copy at +1000 is in a later split
    idx, dist = vq_nearest_triton(z, codebook, metric="l2")
    ref = fp64_distances(z, codebook, "l2")
    assert ref.gather(1, (base[:, None] + torch.tensor([0, 1, 128, 1000])).remainder(k).to(DEVICE)).diff(1).eq(0).all()
    assert torch.equal(idx, ref.argmin(1)), "ties must go to the lowest index"
    assert torch.equal(idx.cpu(), base)
    assert bool((dist[:5] == 0).all())  # exact arithmetic: ||z||^2 + ||e||^2 - 2 z.e cancels to 0
    torch_idx, _ = vq_nearest(z, codebook, backend="torch")
    assert torch.equal(idx, torch_idx)


def test_tiny_gaps():
    """Each row has its own pair of near codes: 1 ulp apart (either may win) or 1% apart (exact)."""
    g = torch.Generator().manual_seed(2)
    n, d = 64, 32
    h, q = n // 2, n // 4
    z = torch.randn(n, d, generator=g)
    a = z + 0.3 * torch.randn(n, d, generator=g)
    tiny = a[:h].clone()  # rows [0, h): a nudged 1 ulp toward z in one coordinate
    tiny[:, 0] = torch.nextafter(a[:h, 0], z[:h, 0])
    clear = a[h:] + 1e-2 * (z[h:] - a[h:])  # rows [h, n): a clear 2% closer
    far = 3.0 + torch.randn(n, d, generator=g)
    # the nudged codes sit below the originals for some rows, above for others
    codebook = torch.cat([tiny[:q], a, tiny[q:], clear, far])
    pos_a, pos_tiny = q + torch.arange(n), torch.cat([torch.arange(q), n + torch.arange(q, h)])
    pos_clear = n + h + torch.arange(h)
    z, codebook = z.to(DEVICE), codebook.to(DEVICE)
    idx, dist = vq_nearest_triton(z, codebook, metric="l2")
    check_against_fp64(z, codebook, idx, dist, max_flips=h)
    idx = idx.cpu()
    assert bool(((idx[:h] == pos_a[:h]) | (idx[:h] == pos_tiny)).all())
    assert torch.equal(idx[h:], pos_clear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine(dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(129, 32, generator=g), dim=1).to(DEVICE, dtype)
    codebook = torch.nn.functional.normalize(torch.randn(1000, 32, generator=g), dim=1).to(DEVICE, dtype)
    idx, dist = vq_nearest_triton(z, codebook, metric="cosine")
    check_against_fp64(z, codebook, idx, dist, metric="cosine")
    ref_idx, ref_dist = vq_nearest(z, codebook, metric="cosine", backend="torch")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k,d,dtype", [(1000, 300, 24, torch.float32), (129, 50, 256, torch.bfloat16),
                                         (7, 8192, 32, torch.float32)])
def test_ema_stats(n, k, d, dtype):
    """counts exact, sums = fp64 one-hot within fp32 error, zero rows for unused codes, bitwise reproducible."""
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(k, d, generator=g)
    z = torch.randn(n, d, generator=g)
    z[: n // 2] = codebook[5] + 0.01 * torch.randn(n // 2, d, generator=g)  # one heavy code: many row chunks
    z, codebook = z.to(DEVICE, dtype), codebook.to(DEVICE, dtype)
    idx, _, counts, sums = vq_nearest_triton(z, codebook, metric="l2", return_stats=True)
    onehot = torch.nn.functional.one_hot(idx, k).double()
    ref_counts = onehot.sum(0)
    ref_sums = onehot.T @ z.double()
    assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (k, d)
    assert torch.equal(counts.double(), ref_counts)
    tol = (ref_counts[:, None] + 1) * EPS32 * (onehot.T @ z.double().abs())
    assert bool(((sums.double() - ref_sums).abs() <= tol + 1e-30).all())
    unused = ref_counts == 0
    assert bool(unused.any()) and bool((sums[unused] == 0).all())
    assert int(counts[idx[0]]) >= n // 2
    again = vq_nearest_triton(z, codebook, metric="l2", return_stats=True)
    for a, b in zip((idx, counts, sums), (again[0], again[2], again[3])):
        assert torch.equal(a, b) and a.cpu().numpy().tobytes() == b.cpu().numpy().tobytes()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_public_api_triton_matches_torch(metric):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(100, 16, generator=g)
    codebook = torch.randn(257, 16, generator=g)
    if metric == "cosine":
        z, codebook = (torch.nn.functional.normalize(t, dim=1) for t in (z, codebook))
    z, codebook = z.to(DEVICE), codebook.to(DEVICE)
    tri = vq_nearest(z, codebook, metric=metric, backend="triton", return_stats=True)
    ref = vq_nearest(z, codebook, metric=metric, backend="torch", return_stats=True)
    assert torch.equal(tri[0], ref[0])
    torch.testing.assert_close(tri[1], ref[1], atol=1e-4, rtol=1e-5)
    assert torch.equal(tri[2], ref[2])
    torch.testing.assert_close(tri[3], ref[3], atol=1e-5, rtol=1e-5)
    # a non-contiguous, mixed-dtype call goes through the same checks and promotion
    idx, _ = vq_nearest(z.T.contiguous().T.to(torch.bfloat16), codebook, metric=metric,
                                     backend="triton")
    ref_idx, _ = vq_nearest(z.to(torch.bfloat16), codebook, metric=metric, backend="torch")
    assert torch.equal(idx, ref_idx)


def test_peak_memory_has_no_n_by_k_buffer():
    """Measured by the bench's live-bytes meter: the kernel's extra memory is O(N * splits + K * D)
    (per-split winners, ||z||^2, ||e||^2 and the codebook's squares it is summed from), the EMA
    statistics add O(K * D + N); the cdist
    baseline measured the same way holds the [N, K] fp32 distances."""
    from peco_kernels.bench import LiveBytes

    N, K, D = 512, 8192, 32
    g = torch.Generator().manual_seed(12)
    z, codebook = torch.randn(N, D, generator=g).to(DEVICE), torch.randn(K, D, generator=g).to(DEVICE)

    def peak(fn):
        meter = LiveBytes()
        with meter:
            fn()
        return meter.peak

    assert peak(lambda: torch.cdist(z, codebook).argmin(1)) >= N * K * 4
    max_splits = triton.cdiv(K, 128)
    nearest = K * D * 4 + K * 4 + N * 4 + max_splits * N * (4 + 8) + N * 16 + 4096
    assert peak(lambda: vq_nearest(z, codebook, backend="triton")) <= nearest
    with_stats = nearest + K * D * 4 + K * 8 * 3 + N * 8 * 2
    assert peak(lambda: vq_nearest(z, codebook, backend="triton", return_stats=True)) <= with_stats < N * K * 4 // 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_and_strided_inputs(dtype):
    """z and codebook starting one element past a 16-byte boundary, and a transposed layout: the
    same indices, distances and statistics as contiguous copies."""
    g = torch.Generator().manual_seed(6)
    z, codebook = torch.randn(70, 24, generator=g).to(DEVICE, dtype), torch.randn(300, 24, generator=g).to(DEVICE, dtype)
    flat = torch.zeros(z.numel() + codebook.numel() + 1, dtype=dtype, device=DEVICE)
    z_odd = flat[1:1 + z.numel()].view_as(z)
    c_odd = flat[1 + z.numel():].view_as(codebook)
    z_odd.copy_(z)
    c_odd.copy_(codebook)
    assert z_odd.data_ptr() % 16 and c_odd.data_ptr() % 16
    expect = vq_nearest(z, codebook, backend="triton", return_stats=True)
    for zz, cc in ((z_odd, c_odd), (z.T.contiguous().T, codebook.T.contiguous().T)):
        got = vq_nearest(zz, cc, backend="triton", return_stats=True)
        for a, b in zip(got, expect):
            assert torch.equal(a, b)


def test_public_name_survives_the_kernel_import():
    """A kernel module named like the public function would rebind the package attribute from the
    function to the module on its first (lazy) import, breaking a user's second call."""
    vq_nearest(torch.randn(3, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE), backend="triton")
    assert callable(peco_kernels.vq_nearest), "peco_kernels.vq_nearest is now the kernel module, not the function"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", ["int_z", "mismatched_d", "3d_z"])
def test_bad_input_raises(backend, bad):
    z, codebook = torch.randn(4, 8, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    if bad == "int_z":
        z = torch.randint(0, 5, (4, 8), device=DEVICE)
    elif bad == "mismatched_d":
        codebook = torch.randn(16, 9, device=DEVICE)
    else:
        z = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(KernelInputError):
        vq_nearest(z, codebook, backend=backend)
