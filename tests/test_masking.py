"""Block-wise mask generator (BEiT v2 semantics): exact counts, determinism, block rules,
blockiness, position statistics, defaults and argument errors. CPU only, a few seconds."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from peco_scale.data.masking import BlockMaskGenerator, default_min_block, default_num_masked

# ----------------------------------------------------------------------------- helpers


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of True cells (iterative flood fill)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    sizes = []
    for i0, j0 in zip(*np.nonzero(mask)):
        if seen[i0, j0]:
            continue
        seen[i0, j0] = True
        stack, size = [(i0, j0)], 0
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= a < H and 0 <= b < W and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(size)
    return sizes


def _ring(H: int, W: int) -> np.ndarray:
    """Chebyshev distance of each cell to the grid border (0 = border)."""
    i, j = np.indices((H, W))
    return np.minimum(np.minimum(i, H - 1 - i), np.minimum(j, W - 1 - j))


def test_components_helper():
    m = np.array([[1, 1, 0, 1],
                  [0, 1, 0, 1],
                  [1, 0, 0, 0]], dtype=bool)
    assert sorted(_components(m)) == [1, 2, 3]


# ----------------------------------------------------------------------------- defaults


def test_default_scaling():
    assert default_num_masked(196) == 75 and default_min_block(196) == 16
    assert default_num_masked(1024) == 392 and default_min_block(1024) == 84  # H/14 @ 448
    assert default_num_masked(256) == 98 and default_min_block(256) == 21  # L/16 @ 256
    assert default_num_masked(784) == 300 and default_min_block(784) == 64  # L/16 @ 448
    # tiny grids clamp to 1 instead of rounding to 0
    assert default_num_masked(2) == 1 and default_min_block(4) == 1 and default_min_block(16) == 1
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="num_patches"):
            default_num_masked(bad)


def test_generator_defaults_and_repr():
    g = BlockMaskGenerator(14)
    assert g.grid == (14, 14) and g.num_patches == 196
    assert (g.num_masked, g.min_block, g.max_block, g.max_tries) == (75, 16, 75, 10)
    assert g.min_aspect == 0.3 and g.max_aspect == pytest.approx(1 / 0.3)
    g = BlockMaskGenerator((32, 32))
    assert (g.num_masked, g.min_block, g.max_block) == (392, 84, 392)
    r = repr(BlockMaskGenerator((8, 20), 50, min_block=4, max_block=30))
    for part in ("grid=(8, 20)", "num_masked=50", "min_block=4", "max_block=30", "max_tries=10"):
        assert part in r, r


# ----------------------------------------------------------------------------- exact count

COUNT_CASES = [
    ((4, 4), 1, {}), ((4, 4), 2, {}), ((4, 4), 6, {}), ((4, 4), 15, {}),
    ((2, 2), 3, {}),                      # only 1x1 blocks fit (h < H strict)
    ((1, 10), 4, {}),                     # no block fits at all: pure fill-up
    ((14, 14), 75, {}), ((14, 14), 1, {}), ((14, 14), 195, {}),
    ((14, 14), 5, {"min_block": 16}),     # min_block > budget: swapped uniform bounds
    ((14, 14), 120, {"max_block": 20}),
    ((16, 16), None, {}), ((28, 28), None, {}), ((32, 32), 392, {}),
    ((8, 20), None, {}), ((20, 8), 100, {}), ((3, 17), 20, {}), ((8, 8), 40, {"min_aspect": 0.1}),
]


@pytest.mark.parametrize("grid,n,kw", COUNT_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COUNT_CASES])
def test_exact_count(grid, n, kw):
    g = BlockMaskGenerator(grid, n, **kw)
    want = g.num_masked
    for seed in range(150):
        m = g(np.random.default_rng(seed))
        assert m.dtype == np.bool_ and m.shape == grid
        assert int(m.sum()) == want, (seed, int(m.sum()))


def test_no_block_fits_on_single_row():
    m, blocks = BlockMaskGenerator((1, 10), 4).generate(np.random.default_rng(0), return_blocks=True)
    assert blocks == [] and m.sum() == 4


# ----------------------------------------------------------------------------- determinism


def test_determinism_and_no_global_rng():
    g = BlockMaskGenerator(14)
    np_state, py_state = np.random.get_state(), random.getstate()
    a = [g(np.random.default_rng(s)) for s in range(40)]
    b = [g(np.random.default_rng(s)) for s in range(40)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) == 40  # different seeds -> different masks
    rng = np.random.default_rng(7)
    assert not np.array_equal(g(rng), g(rng))  # the generator state advances
    # the global RNGs were neither used nor reseeded
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    # and the mask is a function of the generator state alone
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    np.random.seed(123)
    m1 = g(r1)
    np.random.seed(456)
    random.seed(456)
    assert np.array_equal(m1, g(r2))


def test_rejects_non_generator():
    g = BlockMaskGenerator(14)
    for bad in (0, np.random.RandomState(0)):
        with pytest.raises(TypeError, match="default_rng"):
            g(bad)


# ----------------------------------------------------------------------------- block rules

RULE_CASES = [
    ((14, 14), None, {}),
    ((14, 14), 5, {"min_block": 16}),
    ((14, 14), 120, {"max_block": 20, "min_block": 6}),
    ((32, 32), 392, {}),
    ((8, 20), None, {"min_aspect": 0.2, "max_aspect": 2.0}),
    ((4, 4), 6, {}),
]


@pytest.mark.parametrize("grid,n,kw", RULE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in RULE_CASES])
def test_blocks_follow_the_rules(grid, n, kw):
    """Replay the blocks in order and check every acceptance rule of the algorithm."""
    g = BlockMaskGenerator(grid, n, **kw)
    H, W = grid
    n_blocks = 0
    for seed in range(120):
        mask, blocks = g.generate(np.random.default_rng(seed), return_blocks=True)
        covered = np.zeros_like(mask)
        for top, left, h, w in blocks:
            budget = min(g.num_masked - int(covered.sum()), g.max_block)
            assert 1 <= h < H and 1 <= w < W, (h, w)
            assert 0 <= top <= H - h and 0 <= left <= W - w
            new = h * w - int(covered[top:top + h, left:left + w].sum())
            assert 0 < new <= budget, (new, budget)
            covered[top:top + h, left:left + w] = True
            # h = round(sqrt(A r)), w = round(sqrt(A / r)) with A between min_block and the
            # budget (either order) and r in [min_aspect, max_aspect] implies
            # (h-.5)(w-.5) <= A <= (h+.5)(w+.5) and (h-.5)/(w+.5) <= r <= (h+.5)/(w-.5).
            a_lo, a_hi = sorted((g.min_block, budget))
            assert (h - .5) * (w - .5) <= a_hi + 1e-9 and (h + .5) * (w + .5) >= a_lo - 1e-9, \
                (h, w, a_lo, a_hi)
            r_lo, r_hi = (h - .5) / (w + .5), (h + .5) / (w - .5)
            assert r_lo <= g.max_aspect + 1e-9 and r_hi >= g.min_aspect - 1e-9, (h, w)
        n_blocks += len(blocks)
        assert not (covered & ~mask).any()  # over-count never happens, blocks stay masked
        assert int(covered.sum()) <= g.num_masked
    assert n_blocks > 0


def test_log_aspect_symmetric_and_oriented():
    g = BlockMaskGenerator(14)
    rng = np.random.default_rng(0)
    logs = np.array([math.log(h / w) for _ in range(600)
                     for _, _, h, w in g.generate(rng, return_blocks=True)[1]])
    assert len(logs) > 1500
    # log r ~ U(log .3, log 1/.3): std ~0.7, so the mean of >1500 blocks is within ~0.02 of 0
    # (the rounding of h and w is symmetric too).
    assert abs(logs.mean()) < 0.08, logs.mean()
    assert (logs > 0).mean() > 0.3 and (logs < 0).mean() > 0.3
    assert (logs > math.log(2)).any() and (logs < -math.log(2)).any()  # elongated blocks happen

    # h is the row count: a tall-only aspect range gives only tall blocks, 1 gives squares
    _, tall = BlockMaskGenerator(14, min_aspect=2.0, max_aspect=3.0).generate(
        np.random.default_rng(1), return_blocks=True)
    assert tall and all(h > w for _, _, h, w in tall), tall
    for seed in range(50):
        _, sq = BlockMaskGenerator(14, min_aspect=1.0).generate(
            np.random.default_rng(seed), return_blocks=True)
        assert all(h == w for _, _, h, w in sq), sq


# ----------------------------------------------------------------------------- statistics


def test_masks_are_blocky():
    g = BlockMaskGenerator(14)
    rng = np.random.default_rng(0)
    block_sizes, rand_sizes, block_cover = [], [], []
    for _ in range(300):
        m, blocks = g.generate(rng, return_blocks=True)
        block_sizes += _components(m)
        rand = np.zeros(196, dtype=bool)
        rand[rng.permutation(196)[:75]] = True
        rand_sizes += _components(rand.reshape(14, 14))
        cov = np.zeros_like(m)
        for t, l, h, w in blocks:
            cov[t:t + h, l:l + w] = True
        block_cover.append(cov.sum() / 75)
    mb, mr = np.mean(block_sizes), np.mean(rand_sizes)
    # scattered 38% masks form components of ~2-3 patches; blocks of >= 16 patches, merged
    assert mb > 5 * mr and mb > 15, (mb, mr)
    assert np.mean(block_cover) > 0.97  # almost everything comes from blocks, not the fill-up


# Mean masking frequency per border ring (0 = outer ring, 6 = central 2x2) at 14x14 with
# defaults, measured from 100k masks of BEiT v2's own MaskingGenerator (random.* based). BEiT's
# placement is strongly centre-biased: a block of height h covers row 0 for 1 of its H-h+1 tops
# but a central row for h of them, and blocks are big (16..75 patches on a 14-wide grid), so the
# corners are masked ~5% of the time and the centre ~72% -- far from a uniform 75/196 = 38%.
BEIT_RING_FREQ_14 = [0.1442, 0.2918, 0.4315, 0.5471, 0.6332, 0.6897, 0.7178]


def test_position_frequency_matches_beit():
    g = BlockMaskGenerator(14)
    rng = np.random.default_rng(0)
    n = 2000
    freq = np.mean([g(rng) for _ in range(n)], axis=0)
    assert freq.mean() == pytest.approx(75 / 196)  # exact count per mask
    ring = _ring(14, 14)
    rings = [freq[ring == k].mean() for k in range(7)]
    # ring means over 2000 masks: binomial SE <= sqrt(.25/2000) ~ 0.011 per cell, less for a
    # ring average; 0.03 is ~3 SE of a single cell.
    assert np.allclose(rings, BEIT_RING_FREQ_14, atol=0.03), np.round(rings, 3)
    assert all(a < b for a, b in zip(rings, rings[1:]))  # monotone towards the centre
    assert freq.min() > 0.015  # every patch, corners included, gets masked sometimes
    # quadrants: same mean by the flip symmetry of the placement. A mask's quadrant fraction
    # has std ~0.23 (big blocks), so SE ~0.005 per quadrant over 2000 masks and ~0.0075 for a
    # difference of two (other seeds give ranges up to ~0.021); 0.035 is ~4.5 SE.
    q = [freq[:7, :7].mean(), freq[:7, 7:].mean(), freq[7:, :7].mean(), freq[7:, 7:].mean()]
    assert max(q) - min(q) < 0.035, q
    # the map is symmetric under flips and transpose: per-cell SE <= 0.011, difference of two
    # cells ~0.016; the max over 196 cells is 0.033..0.047 over several seeds, 0.07 is ~4.5 SE
    for sym in (np.flipud(freq), np.fliplr(freq), freq.T):
        assert np.abs(freq - sym).max() < 0.07


def test_fast_enough():
    g = BlockMaskGenerator(32, 392)
    rng = np.random.default_rng(0)
    g(rng)
    t = time.perf_counter()
    for _ in range(200):
        g(rng)
    per_mask = (time.perf_counter() - t) / 200
    assert per_mask < 3e-3, f"{per_mask * 1e3:.2f} ms per 32x32 mask"  # ~0.1 ms unloaded


# ----------------------------------------------------------------------------- bad arguments

BAD = [
    ({"grid": 0}, "grid=0"),
    ({"grid": (14, -2)}, "grid=(14, -2)"),
    ({"grid": (14, 14, 3)}, "grid=(14, 14, 3)"),
    ({"grid": 1}, "grid=1"),
    ({"grid": 14.0}, "grid=14.0"),
    ({"grid": 14, "num_masked": 0}, "num_masked=0"),
    ({"grid": 14, "num_masked": 196}, "num_masked=196"),
    ({"grid": 14, "num_masked": -5}, "num_masked=-5"),
    ({"grid": 14, "num_masked": 0.4}, "num_masked=0.4"),
    ({"grid": 14, "min_block": 0}, "min_block=0"),
    ({"grid": 14, "min_block": 500}, "min_block=500"),
    ({"grid": 14, "min_block": 16, "max_block": 8}, "max_block=8"),
    ({"grid": 14, "min_aspect": 0}, "min_aspect=0"),
    ({"grid": 14, "min_aspect": -0.3}, "min_aspect=-0.3"),
    ({"grid": 14, "min_aspect": float("nan")}, "min_aspect=nan"),
    ({"grid": 14, "min_aspect": 0.5, "max_aspect": 0.4}, "max_aspect=0.4"),
    ({"grid": 14, "max_aspect": 0}, "max_aspect=0"),
    ({"grid": 14, "max_tries": 0}, "max_tries=0"),
]


@pytest.mark.parametrize("kw,named", BAD, ids=[b[1] for b in BAD])
def test_bad_arguments(kw, named):
    kw = dict(kw)
    grid = kw.pop("grid")
    with pytest.raises(ValueError) as exc:
        BlockMaskGenerator(grid, **kw)
    msg = str(exc.value)
    assert named in msg and "\n" not in msg, msg
    assert any(w in msg for w in ("use", "pass", "swap")), msg  # says how to fix it


def test_num_masked_range_message_names_the_fix():
    with pytest.raises(ValueError, match=r"num_masked=196 .*1\.\.195 for a 14x14 grid"):
        BlockMaskGenerator(14, 196)
    with pytest.raises(ValueError, match=r"round\(r \* 196\)"):
        BlockMaskGenerator(14, 0.4)
