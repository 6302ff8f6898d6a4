"""NVIDIA DALI backend: decoding and augmentation in a DALI pipeline (GPU "mixed" decode on
CUDA, plain CPU operators otherwise), fed by the same sharded, resumable index order as the
folder backend.

Batches follow ``spec.py``; ``batches_per_epoch`` is identical on every rank, and the loader
state is ``(seed, epoch, start_batch)``, so a mid-epoch resume continues with exactly the
remaining samples. A sample's tensors are a pure function of ``(seed, epoch, index)`` (same DALI
version and device). Both stage-2 views come from one crop, with the ffcv backend's flip and
jitter code. Unreadable files (``verify="header"`` by default, ``"full"`` also decodes) are
replaced by the next readable one and counted in "skipped".

Design notes: docs/design.md
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from .colour import draw_flip_jitter, flip_jitter_normalize_views, to_rgb
from .folder import resolve_image_root, scan_image_folder
from .masking import BlockMaskGenerator, RandomMaskGenerator, mask_generator
from .mim import IMAGENET_MEAN, IMAGENET_STD
from .sampling import ShardedSampler, sample_seeds, splitmix64
from .spec import TASKS, AugmentSpec, DataError, ShardedPosition

log = logging.getLogger(__name__)

__all__ = ["DALILoader", "crop_window"]

_INSTALL_HINT = "pip install -e '.[dali]'"


def _import_dali() -> tuple[Any, Any, Any]:
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(f"the 'dali' data backend needs NVIDIA DALI ({exc}); install it with "
                          f"`{_INSTALL_HINT}` or use --data.backend folder") from None
    return dali, fn, types


def crop_window(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random-resized crop, torchvision's ``get_params`` algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# PIL (format, mode)s whose bytes go to DALI as they are: DALI's CPU decoder gives what PIL +
# colour.to_rgb give, within one level (16-bit PNG/TIFF, float TIFF included). Checked with DALI 2.4:
# it fails on TIFF modes 1 and I (32-bit or signed 16-bit), and decodes TIFF LA, PA and LAB to other
# colours. Every other file is decoded with PIL + to_rgb and handed to DALI as an 8-bit RGB PNG.
_DALI_NATIVE: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"L", "RGB", "CMYK"}),
    "MPO": frozenset({"L", "RGB", "CMYK"}),
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}),
    "BMP": frozenset({"1", "L", "P", "RGB"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
    "TIFF": frozenset({"L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "F"}),
}


def _check_bytes(data: bytes, full: bool) -> tuple[tuple[int, int], bool]:
    """Raise if the encoded image looks unreadable; return its ((width, height), native): native
    when DALI decodes these bytes as PIL + ``to_rgb`` would (see ``_DALI_NATIVE``)."""
    with Image.open(io.BytesIO(data)) as img:
        fmt, size = img.format, img.size
        native = img.mode in _DALI_NATIVE.get(fmt, ())
        if full or fmt not in ("JPEG", "PNG", "MPO"):
            img.load()  # full decode: truncation / corrupt data raise here
            return size, native
    if fmt in ("JPEG", "MPO"):
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise OSError("truncated JPEG (no end-of-image marker after the last scan)")
    elif b"IEND" not in data[-32:]:
        raise OSError("truncated PNG (no IEND chunk at the end)")
    return size, native


def _as_rgb_png(data: bytes) -> bytes:
    """The image decoded with PIL + ``to_rgb``, re-encoded as an 8-bit RGB PNG (lossless)."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = to_rgb(img)
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=1)
    return out.getvalue()


class DALILoader(ShardedPosition):
    """BatchLoader over an ImageFolder tree with a DALI pipeline (see the module docstring).

    Yields the batch dicts of ``spec.py`` for ``spec.task`` plus ``"index"`` (int64 [B], the
    dataset index each sample was requested as). ``device="cpu"`` runs CPU operators only
    (``device_id=None``); ``"cuda"``/``"cuda:N"`` decodes on the GPU ("mixed") and returns CUDA
    tensors.
    """

    def __init__(self, root: str | os.PathLike[str], spec: AugmentSpec, *, batch_size: int, rank: int,
                 world_size: int, seed: int, workers: int, device: str = "cpu",
                 verify: str = "header", prefetch: int = 2) -> None:
        self._dali, self._fn, self._types = _import_dali()
        if spec.task not in TASKS:
            raise DataError(f"task '{spec.task}' is unknown; use one of {', '.join(TASKS)}")
        if spec.img_size < 1:
            raise DataError(f"img_size={spec.img_size} must be >= 1; pass a positive --img_size")
        if verify not in ("header", "full"):
            raise DataError(f"verify='{verify}' is unknown; use 'header' or 'full'")
        self.spec, self.seed, self.rank, self.world_size = spec, int(seed), int(rank), int(world_size)
        self.batch_size, self.verify, self.prefetch = int(batch_size), verify, max(1, int(prefetch))
        self.num_threads = max(1, int(workers))
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise DataError(f"device '{device}' is not supported by the dali backend; use cpu or cuda")
        self.device = dev
        self.device_id = None if dev.type == "cpu" else (dev.index if dev.index is not None
                                                          else torch.cuda.current_device())
        self.root = resolve_image_root(root)
        self.samples, self.classes, self.n_ignored = scan_image_folder(root)  # DataError if empty
        self.mask_gen: BlockMaskGenerator | RandomMaskGenerator | None = None
        if spec.task == "pretrain":
            if spec.tokenizer_size < 0:
                raise DataError(f"stage 2 needs tokenizer_size >= 0 (got {spec.tokenizer_size}); set "
                                "AugmentSpec.tokenizer_size to the tokenizer's input size (0 = no tokenizer view)")
            if "grid" not in spec.mask:
                raise DataError(f"stage 2 needs the mask grid: AugmentSpec.mask={spec.mask!r} has no "
                                "'grid'; pass e.g. mask={'grid': img_size // patch_size}")
            try:
                self.mask_gen = mask_generator(**spec.mask)
            except (TypeError, ValueError) as exc:
                raise DataError(f"bad mask settings {spec.mask!r}: {exc}") from None
        # external-source outputs, in order (unused ones would only cost time and warn)
        self._fields = ("enc", "anchor", "shape", "flip", "factors", "order",
                        "label", "index", "skipped", *(("mask",) if self.mask_gen is not None else ()))
        self.sampler = ShardedSampler(len(self.samples), rank=rank, world_size=world_size,
                                      batch_size=batch_size, seed=seed)
        self._bad: set[int] = set()  # indices whose file failed the check (cached per process)
        self._sizes: dict[int, tuple[tuple[int, int], bool]] = {}  # ((w, h), DALI decodes it natively)
        self._read(0)  # DataError here, before any pipeline or process group, when no file is readable

    # ------------------------------------------------------------------ BatchLoader protocol
    # (batches_per_epoch, epoch, set_epoch, set_start_batch, __len__: ShardedPosition)

    def pipeline_seed(self) -> int:
        """DALI pipeline seed for the current (seed, epoch, rank)."""
        key = splitmix64(splitmix64(splitmix64(self.seed & (2**64 - 1)) ^ self.epoch) ^ self.rank)
        return key & 0x7FFFFFFF

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self.sampler.shard_indices()
        n_batches = len(indices) // self.batch_size
        if n_batches == 0:
            return
        seeds = sample_seeds(self.seed, self.epoch, indices)
        pipe = self._build(_Source(self, indices, seeds))
        try:
            pipe.build()
            for _ in range(n_batches):
                yield self._to_batch(pipe.run())
        finally:
            del pipe

    # ------------------------------------------------------------------ per-sample work (callback)

    def _read(self, index: int) -> tuple[int, bytes, tuple[int, int]]:
        """(j, bytes, (w, h)) of the first readable file at index, index+1, ... (wrapping)."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            path = self.samples[j][0]
            try:
                with open(path, "rb") as f:
                    data = f.read()
                checked = self._sizes.get(j)
                if checked is None:  # check each file once per process (then only its size is needed)
                    checked = self._sizes[j] = _check_bytes(data, self.verify == "full")
                size, native = checked
                return j, (data if native else _as_rgb_png(data)), size
            except Exception as exc:  # noqa: BLE001 - any failure means "skip this file"
                self._bad.add(j)
                log.warning("skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
        raise DataError(f"none of the {n} images under '{self.root}' could be read; "
                        "check the files (e.g. open one with PIL) or point --data elsewhere")

    def _sample(self, index: int, sseed: int) -> tuple:
        j, data, (width, height) = self._read(index)
        spec = self.spec
        rng = np.random.default_rng([sseed, 1])
        left, top, w, h = crop_window(rng, width, height, spec.scale, spec.ratio)
        flip, factors, order = draw_flip_jitter(rng, spec.hflip, float(spec.jitter))
        row = {"enc": np.frombuffer(data, dtype=np.uint8),
               "anchor": np.array([left, top], dtype=np.float32), "shape": np.array([w, h], dtype=np.float32),
               "flip": np.array(flip, dtype=np.bool_), "factors": factors, "order": order,
               "label": np.array(self.samples[j][1], dtype=np.int64), "index": np.array(index, dtype=np.int64),
               "skipped": np.array(int(j != index), dtype=np.int32)}
        if self.mask_gen is not None:  # stage 2: the block mask from the sample's seed
            row["mask"] = np.ascontiguousarray(self.mask_gen(np.random.default_rng(sseed)), dtype=bool)
        return tuple(row[k] for k in self._fields)

    # ------------------------------------------------------------------ pipeline

    def _build(self, source: "_Source") -> Any:
        dali, fn, types = self._dali, self._fn, self._types
        spec = self.spec
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=self.device_id, seed=self.pipeline_seed(),
                             prefetch_queue_depth=self.prefetch)
        gpu = self.device_id is not None
        with pipe:
            stage2 = spec.task == "pretrain"
            src = dict(zip(self._fields, fn.external_source(source=source, num_outputs=len(self._fields),
                                                            batch=True)))
            img = fn.decoders.image_slice(src["enc"], src["anchor"], src["shape"], device="mixed" if gpu else "cpu",
                                          output_type=types.RGB, normalized_anchor=False,
                                          normalized_shape=False, adjust_orientation=False)
            # one resize per distinct view size (views of equal size share it); uint8 HWC out, the
            # flip / jitter / normalisation follow in one fused pass per view (colour.py)
            self._sizes_out = sorted({spec.img_size, spec.tokenizer_size} - {0} if stage2 else {spec.img_size})
            views = [fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
                     for size in self._sizes_out]
            extra = (src["mask"],) if stage2 else ()
            pipe.set_outputs(*views, src["flip"], src["factors"], src["order"], src["label"], src["index"],
                             src["skipped"], *extra)
        return pipe

    def _tensor(self, out: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if type(out).__name__ == "TensorListGPU":  # views decoded with device="mixed"
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            arr = torch.empty(t.shape(), dtype=dtype, device=self.device)
            feed_ndarray(t, arr, cuda_stream=torch.cuda.current_stream(self.device))
            return arr
        arr = out.as_array()  # a fresh, owned copy of DALI's buffer: wrap it without copying again
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def _to_batch(self, outs: tuple) -> dict[str, Any]:
        nv = len(self._sizes_out)
        views = dict(zip(self._sizes_out, outs[:nv]))
        flip, factors, order, label, index, skipped = (o.as_array() for o in outs[nv:nv + 6])
        dev = self.device

        half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        imagenet = (IMAGENET_MEAN, IMAGENET_STD)
        spec = self.spec
        want = ({"patch": (spec.img_size, imagenet), "tokenizer": (spec.tokenizer_size, half)} if spec.task == "pretrain"
                else {"image": (spec.img_size, half if spec.task == "tokenizer" else imagenet)})
        if not spec.tokenizer_size:
            want.pop("tokenizer", None)  # stage 2 without a tokenizer (the MAE tasks): one view
        batch: dict[str, Any] = {}
        for size in self._sizes_out:  # one jitter pass per resized view, normalised once per key
            keys = [key for key, (sz, _) in want.items() if sz == size]
            img = self._tensor(views[size], torch.uint8)  # [B, H, W, 3]: CUDA for "mixed", else CPU
            xs = flip_jitter_normalize_views(img, flip, factors, order, [want[k][1] for k in keys], device=dev)
            batch.update(zip(keys, xs))
        if spec.task == "pretrain":
            batch["mask"] = torch.from_numpy(outs[nv + 6].as_array().astype(bool)).to(dev)
        batch["label"] = torch.from_numpy(label.astype(np.int64)).to(dev)
        batch["index"] = torch.from_numpy(index.astype(np.int64)).to(dev)
        batch["skipped"] = int(skipped.sum())
        return batch


class _Source:
    """Batch-mode external-source callback: this rank's samples of one epoch pass, in order."""

    def __init__(self, loader: DALILoader, indices: np.ndarray, seeds: np.ndarray) -> None:
        self.loader, self.indices, self.seeds = loader, indices.tolist(), seeds.tolist()
        self.pos = 0

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        bs = self.loader.batch_size
        if self.pos + bs > len(self.indices):
            raise StopIteration
        rows = [self.loader._sample(i, s) for i, s in
                zip(self.indices[self.pos:self.pos + bs], self.seeds[self.pos:self.pos + bs])]
        self.pos += bs
        return tuple(list(col) for col in zip(*rows))
