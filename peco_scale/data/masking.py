"""Block-wise masking for masked image modeling (BEiT v2 semantics, independent implementation).

A mask is a bool array ``[H, W]`` over the patch grid, ``True`` = masked, with exactly
``num_masked`` ``True`` entries: blocks are placed as BEiT v2's ``MaskingGenerator`` does, then
random patches are masked (or unmasked) to hit the count. All randomness comes from the
``np.random.Generator`` passed in, so a mask is a pure function of the generator state and the
constructor arguments (BEiT's distribution, not its random stream). Defaults scale BEiT's
224px / 14x14 setting by patch count.

``RandomMaskGenerator`` is MAE's masking: ``num_masked`` patches chosen uniformly without
replacement (MAE draws per-patch noise and keeps the lowest; the distribution is the same).
``mask_generator(kind=..., **kw)`` builds either from an ``AugmentSpec.mask`` dict.

Design notes: docs/design.md
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = ["BlockMaskGenerator", "RandomMaskGenerator", "default_min_block", "default_num_masked", "mask_generator"]

Block = tuple[int, int, int, int]  # (top, left, h, w)


def _positive_patches(num_patches: int) -> int:
    try:
        n = operator.index(num_patches)
    except TypeError:
        raise ValueError(f"num_patches={num_patches!r} must be an integer patch count") from None
    if n < 1:
        raise ValueError(f"num_patches={n} must be at least 1")
    return n


def default_num_masked(num_patches: int) -> int:
    """BEiT's 75 of 196 (~38%) scaled by patch count: ``round(num_patches * 75 / 196)``, >= 1.

    196 -> 75, 256 -> 98, 784 -> 300, 1024 -> 392.
    """
    n = _positive_patches(num_patches)
    return max(1, round(n * 75 / 196))


def default_min_block(num_patches: int) -> int:
    """BEiT's 16-patch minimum block at 14x14, scaled by area: ``max(1, round(16 * n / 196))``.

    196 -> 16, 256 -> 21, 784 -> 64, 1024 -> 84.
    """
    n = _positive_patches(num_patches)
    return max(1, round(16 * n / 196))


def _as_int(name: str, value: object, fix: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer; {fix}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer; {fix}") from None


def _as_positive_float(name: str, value: object, fix: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a positive number; {fix}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}={value!r} must be a positive finite number; {fix}")
    return v


def _parse_grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    fix = "pass the patch grid as an int (square) or (H, W), e.g. 14 or (14, 14)"
    if isinstance(grid, (tuple, list)):
        if len(grid) != 2:
            raise ValueError(f"grid={grid!r} must have 2 entries (H, W); {fix}")
        hw = tuple(_as_int("grid", g, fix) for g in grid)
    else:
        g = _as_int("grid", grid, fix)
        hw = (g, g)
    if hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"grid={grid!r} must be positive; {fix}")
    if hw[0] * hw[1] < 2:
        raise ValueError(f"grid={grid!r} has a single patch, nothing to mask and keep; "
                         "use a grid of at least 2 patches")
    return hw  # type: ignore[return-value]


class _PatchMask:
    """What both generators share: the grid, the count and the ratio (set by the subclass)."""

    height: int
    width: int
    num_patches: int
    num_masked: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def mask_ratio(self) -> float:
        return self.num_masked / self.num_patches

    def _repr_head(self) -> str:
        return f"{type(self).__name__}(grid=({self.height}, {self.width}), num_masked={self.num_masked} ({self.mask_ratio:.1%})"


class BlockMaskGenerator(_PatchMask):
    """BEiT v2 block-wise mask generator; see the module docstring for the exact semantics.

    Args:
        grid: patch grid, ``(H, W)`` or an int for a square grid (e.g. 14 for ViT/16 @ 224).
        num_masked: patches masked per mask, in ``[1, H*W - 1]``; default
            ``default_num_masked(H*W)``. 0 (an empty mean in the MIM loss, i.e. NaN) and ``H*W``
            (no visible patch left) are rejected on purpose.
        min_block: smallest target block area, ``>= 1``; default ``default_min_block(H*W)``.
            May exceed ``num_masked`` (then areas are drawn between the budget and ``min_block``,
            and most patches end up coming from the random fill-up).
        max_block: largest target block area, ``>= min_block``; default ``num_masked``.
        min_aspect, max_aspect: range of the block aspect ``h / w`` (log-uniform);
            ``max_aspect`` defaults to ``1 / min_aspect``.
        max_tries: attempts per block before block placement gives up (BEiT: 10).
    """

    def __init__(self, grid: tuple[int, int] | int, num_masked: int | None = None, *,
                 min_block: int | None = None, max_block: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None,
                 max_tries: int = 10) -> None:
        self.height, self.width = _parse_grid(grid)
        n = self.height * self.width
        self.num_patches = n

        if num_masked is None:
            num_masked = default_num_masked(n)
        fix = f"use a count in 1..{n - 1} for a {self.height}x{self.width} grid"
        self.num_masked = _as_int("num_masked", num_masked,
                                  fix + (f" (for a ratio r: round(r * {n}))"
                                         if isinstance(num_masked, float) else ""))
        if not 1 <= self.num_masked <= n - 1:
            raise ValueError(f"num_masked={self.num_masked} is out of range; {fix}")

        if min_block is None:
            min_block = default_min_block(n)
        fix = f"use an area in 1..{n} patches (default {default_min_block(n)})"
        self.min_block = _as_int("min_block", min_block, fix)
        if not 1 <= self.min_block <= n:
            raise ValueError(f"min_block={self.min_block} is out of range; {fix}")

        if max_block is None:
            self.max_block = self.num_masked
        else:
            fix = f"use an area >= min_block={self.min_block}, or None for num_masked"
            self.max_block = _as_int("max_block", max_block, fix)
            if self.max_block < self.min_block:
                raise ValueError(f"max_block={self.max_block} is below min_block="
                                 f"{self.min_block}; {fix}")

        self.min_aspect = _as_positive_float(
            "min_aspect", min_aspect, "use a ratio h/w > 0 such as BEiT's 0.3")
        if max_aspect is None:
            self.max_aspect = 1.0 / self.min_aspect
        else:
            self.max_aspect = _as_positive_float(
                "max_aspect", max_aspect, "use a ratio h/w > 0, or None for 1/min_aspect")
        if self.max_aspect < self.min_aspect:
            raise ValueError(f"max_aspect={self.max_aspect:g} is below min_aspect="
                             f"{self.min_aspect:g}; swap them or pass max_aspect=None "
                             f"(= 1/min_aspect)")
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

        self.max_tries = _as_int("max_tries", max_tries, "use a positive count such as 10")
        if self.max_tries < 1:
            raise ValueError(f"max_tries={self.max_tries} must be at least 1; use e.g. 10")

    def __repr__(self) -> str:
        return (f"{self._repr_head()}, min_block={self.min_block}, max_block={self.max_block}, "
                f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g}), "
                f"max_tries={self.max_tries})")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask: bool ``[H, W]``, ``True`` = masked, exactly ``num_masked`` ``True``."""
        return self.generate(rng)

    def generate(self, rng: np.random.Generator, return_blocks: bool = False
                 ) -> np.ndarray | tuple[np.ndarray, list[Block]]:
        """Like ``__call__``; with ``return_blocks`` also the accepted blocks, in placement order,
        as ``(top, left, h, w)`` (patches added by the random fill-up are in no block)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                            "use np.random.default_rng(seed)")
        H, W, target = self.height, self.width, self.num_masked
        mask = np.zeros((H, W), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < target:
            budget = min(target - count, self.max_block)
            added = self._place_block(mask, budget, rng, blocks)
            if added == 0:
                break
            count += added

        flat = mask.reshape(-1)  # view: mask is C-contiguous
        if count > target:  # unreachable (new patches <= budget), see module docstring
            flat[rng.choice(np.flatnonzero(flat), count - target, replace=False)] = False
        elif count < target:
            flat[rng.choice(np.flatnonzero(~flat), target - count, replace=False)] = True
        return (mask, blocks) if return_blocks else mask

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator,
                     blocks: list[Block]) -> int:
        """Up to ``max_tries`` attempts at one block; returns the number of patches it added."""
        H, W, tries = self.height, self.width, self.max_tries
        u = rng.random((4, tries))
        lo = self.min_block
        area = lo + (budget - lo) * u[0]  # swapped bounds when min_block > budget, as random.uniform
        la, lb = self._log_aspect
        aspect = np.exp(la + (lb - la) * u[1])
        hs = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        ws = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        # top ~ U{0..H-h}: floor(u * (H - h + 1)), u in [0, 1); meaningless (unused) when h >= H.
        tops = (u[2] * (H - hs + 1)).astype(np.int64)
        lefts = (u[3] * (W - ws + 1)).astype(np.int64)
        for h, w, top, left in zip(hs.tolist(), ws.tolist(), tops.tolist(), lefts.tolist()):
            if h >= H or w >= W:
                continue
            window = mask[top:top + h, left:left + w]
            new = h * w - int(np.count_nonzero(window))  # h or w may round to 0: new == 0
            if 0 < new <= budget:
                window[...] = True
                blocks.append((top, left, h, w))
                return new
        return 0


class RandomMaskGenerator(_PatchMask):
    """MAE's random masking: exactly ``num_masked`` of the ``H*W`` patches, uniformly without
    replacement. ``num_masked`` in ``[1, H*W - 1]``; default ``round(0.75 * H*W)`` (MAE's ratio)."""

    def __init__(self, grid: tuple[int, int] | int, num_masked: int | None = None) -> None:
        self.height, self.width = _parse_grid(grid)
        n = self.num_patches = self.height * self.width
        if num_masked is None:
            num_masked = max(1, min(n - 1, round(0.75 * n)))
        fix = f"use a count in 1..{n - 1} for a {self.height}x{self.width} grid"
        self.num_masked = _as_int("num_masked", num_masked, fix)
        if not 1 <= self.num_masked <= n - 1:
            raise ValueError(f"num_masked={self.num_masked} is out of range; {fix}")

    def __repr__(self) -> str:
        return self._repr_head() + ")"

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask: bool ``[H, W]``, ``True`` = masked, exactly ``num_masked`` ``True``."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                            "use np.random.default_rng(seed)")
        flat = np.zeros(self.num_patches, dtype=bool)
        flat[rng.permutation(self.num_patches)[: self.num_masked]] = True
        return flat.reshape(self.height, self.width)


MASK_KINDS = {"block": BlockMaskGenerator, "random": RandomMaskGenerator}


def mask_generator(kind: str = "block", **kwargs: object) -> BlockMaskGenerator | RandomMaskGenerator:
    """The generator of an ``AugmentSpec.mask`` dict: ``kind`` 'block' (BEiT/PeCo, the default)
    or 'random' (MAE), the other keys its constructor's arguments."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind '{kind}' is unknown; use one of {', '.join(MASK_KINDS)}")
    return MASK_KINDS[kind](**kwargs)  # type: ignore[arg-type]
