"""FFCV backend: ImageFolder -> ``.beton`` writer and a rank-sharded, resumable loader.

Writer (:func:`write_beton`): fields ``image`` (RGBImageField, jpg or raw, longest side capped at
``max_resolution``), ``label`` (IntField) and ``index`` (IntField: the image's index in
``scan_image_folder`` order). Every file is first decoded fully with PIL; unreadable files are
skipped and counted, never fatal. The ``.beton`` is written to a temp file and renamed at the end;
a sidecar ``<out>.json`` records max_resolution, count, skipped, classes and the source path.
Conversion is not resumable (a killed run leaves only a ``*.tmp-<pid>`` file; rerun it).

Loader (:class:`FFCVLoader`), the BatchLoader protocol of ``backends.py``:

- Order: one ffcv ``Loader`` per ``__iter__`` with ``indices=`` this rank's index list and
  ``OrderOption.SEQUENTIAL`` (never QUASI_RANDOM, which does not shard). The list is
  ``ShardedSampler(n, ...).shard_indices()`` over the ``.beton`` positions -- the very same
  permutation / drop-last / strided sharding / start-batch skip as the folder backend. When the
  writer skipped nothing, ``.beton`` position == folder index, so both backends visit the same
  images in the same order on every rank.
- One crop for both stage-2 views: the compiled ffcv decoder decodes and random-resized-crops once
  to ``C = max(img_size, tokenizer_size)`` (ffcv's resize, area-style), then torch flips, jitters
  and resizes that single ``C x C`` crop down to ``img_size`` and ``tokenizer_size`` (bicubic,
  antialias=True; a view of size ``C`` is not resampled again). The folder backend resizes the
  crop box straight to each size, so pixels differ by one extra resampling, geometry does not.
- Randomness is a pure function of ``(seed, epoch, index)`` with ``index`` the folder (scan) index
  stored in the ``.beton``: the crop is drawn inside the compiled decoder from numba's
  ``np.random`` re-seeded per sample from ``sample_seed(seed, epoch, index)`` (numba keeps one
  RNG state per thread, and seed + draws happen in one iteration on one thread, so the
  thread schedule does not matter); flip, jitter factors / order and the block mask come from
  ``np.random.default_rng(sample_seed(...))`` in Python. So a batch is bit-reproducible on
  CPU given (seed, epoch, rank, world_size, batch_size, start batch), independent of ``workers``
  and of resuming. ffcv's own ``seed`` argument only drives its RANDOM order (unused here).
  Not reproducible across backends: the folder path draws from torch's RNG, so the same
  (seed, epoch, index) gives a different (equally distributed) crop there; GPU bicubic
  resizing may differ from CPU in the last bits.
- Jitter: brightness, contrast, saturation with factors uniform in ``[1-j, 1+j]`` applied in a
  per-sample random order (torchvision ``ColorJitter`` without hue, tensor formulas: contrast
  blends with the mean grayscale level, saturation with the per-pixel grayscale), on the
  ``C x C`` crop before the resizes, so both views get the same jitter.
- Crop distribution: ffcv's ``get_random_crop`` is torchvision's RandomResizedCrop algorithm
  (area ~ U(scale), log-ratio ~ U(log ratio), 10 tries, centre fallback).

The batch carries an extra ``"index"`` int64 [B] (folder index) next to the keys of
``backends.py``; ``"skipped"`` is always 0 (bad files are dropped at conversion time).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backends import TASKS, AugmentSpec
from .folder import DataError, ShardedSampler, _epoch_key, _sample_seeds, scan_image_folder
from .masking import BlockMaskGenerator
from .mim import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

__all__ = ["FFCVLoader", "write_beton", "read_sidecar"]

_INSTALL_HINT = ("ffcv is not installed; install it with `pip install -e '.[ffcv]'` after "
                 "`make syslibs` (system OpenCV + libturbojpeg + pkg-config), or use the folder backend")


def _require_ffcv():
    try:
        import ffcv  # noqa: F401
        from ffcv.fields import IntField, RGBImageField  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    import ffcv as mod

    return mod


def sidecar_path(beton: str | os.PathLike[str]) -> Path:
    return Path(str(beton) + ".json")


def read_sidecar(beton: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The writer's sidecar JSON for ``beton`` (None when absent)."""
    p = sidecar_path(beton)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"sidecar '{p}' is unreadable ({exc}); re-run write_beton on the source folder") from None


# ----------------------------------------------------------------------------- writer


def _readable(path: str) -> str | None:
    """None if PIL fully decodes ``path``, else a short reason."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")  # forces the full decode; truncation raises here
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "skip this file"
        return f"{type(exc).__name__}: {exc}"


class _KeptImages:
    """Indexable dataset for ffcv's DatasetWriter: (HxWx3 uint8, label, folder index)."""

    def __init__(self, kept: list[tuple[str, int, int]]) -> None:
        self.kept = kept

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int):
        path, label, index = self.kept[i]
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(arr), int(label), int(index)


def write_beton(root: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                max_resolution: int = 256, jpeg_quality: int = 90, mode: str = "jpg",
                workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert an ImageFolder tree to ``out_path`` (.beton) + ``out_path.json``.

    Returns ``{"written", "skipped", "skipped_files", "classes", "ignored", "path"}``.
    Unreadable images (PIL cannot fully decode them) are skipped and counted.
    """
    _require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if mode not in ("jpg", "raw"):
        raise DataError(f"mode={mode!r} is not supported; use 'jpg' (smaller) or 'raw' (faster decode)")
    if int(max_resolution) < 1:
        raise DataError(f"max_resolution={max_resolution} must be a positive side length, e.g. 256")
    workers = max(1, int(workers or os.cpu_count() or 1))
    samples, classes, n_ignored = scan_image_folder(root)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(workers) as pool:
        reasons = pool.map(_readable, paths, chunksize=16)
        if progress:
            try:
                from tqdm import tqdm

                reasons = tqdm(reasons, total=len(paths), desc="checking images", leave=False)
            except ImportError:  # pragma: no cover
                pass
        reasons = list(reasons)
    kept = [(p, lab, i) for i, ((p, lab), r) in enumerate(zip(samples, reasons)) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    for p, r in bad:
        log.warning("skipping unreadable image %s (%s)", p, r)
    if not kept:
        raise DataError(f"none of the {len(samples)} images under '{root}' could be decoded; "
                        "check the files (e.g. open one with PIL) or point at another folder")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {
            "image": RGBImageField(write_mode=mode, max_resolution=int(max_resolution),
                                   jpeg_quality=int(jpeg_quality)),
            "label": IntField(),
            "index": IntField(),
        }, num_workers=workers)
        writer.from_indexed_dataset(_KeptImages(kept), chunksize=32)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    summary = {"written": len(kept), "skipped": len(bad), "skipped_files": [p for p, _ in bad],
               "classes": classes, "ignored": n_ignored, "path": str(out)}
    side = {"max_resolution": int(max_resolution), "count": len(kept), "skipped": len(bad),
            "classes": classes, "source": str(Path(root).resolve()), "mode": mode,
            "jpeg_quality": int(jpeg_quality), "scanned": len(samples)}
    stmp = sidecar_path(out).with_name(sidecar_path(out).name + f".tmp-{os.getpid()}")
    stmp.write_text(json.dumps(side, indent=1))
    os.replace(stmp, sidecar_path(out))
    return summary


# ----------------------------------------------------------------------------- loader

_U64 = np.uint64
_GOLD, _M1, _M2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)
_MASK63_U = _U64((1 << 63) - 1)
_LOW32 = _U64(0xFFFFFFFF)
_CROP_SALT = _U64(0xC0FFEE5EED)


def _seed_crop_rng(epoch_key, index):
    """Seed (numba's per-thread) np.random from sample_seed(seed, epoch, index).

    SplitMix64 is inlined twice (numba cannot call plain Python globals); the first mix is
    exactly folder.sample_seed, the second derives the crop stream from it.
    """
    x = (epoch_key ^ index) + _GOLD
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    s = (x ^ (x >> _S31)) & _MASK63_U  # == folder.sample_seed(seed, epoch, index)
    x = (s ^ _CROP_SALT) + _GOLD
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    x = x ^ (x >> _S31)
    np.random.seed(np.int64(x & _LOW32))


def _make_decoder(output_size: int, scale, ratio, epoch_key: int, scan_index: np.ndarray):
    """ffcv RandomResizedCrop decoder whose crop is seeded per sample (see module doc)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__((output_size, output_size))
            self.scale = np.array(scale, dtype=np.float64)
            self.ratio = np.array(ratio, dtype=np.float64)

        @property
        def get_crop_generator(self):
            return get_random_crop

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            seed_c = Compiler.compile(_seed_crop_rng)
            sc, ra = self.scale, self.ratio
            key = _U64(epoch_key)
            folder_index = scan_index.astype(np.uint64)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        selected_size = 3 * height * width
                        temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    seed_c(key, folder_index[source_ix])
                    i, j, h, w = get_crop_c(height, width, sc, ra)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCropDecoder()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] (ITU-R 601 luma, as torchvision)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness/contrast/saturation on [N, 3, H, W] in [0, 1].

    factors: [N, 3] (brightness, contrast, saturation); order: [N, 3] int, a permutation of
    (0, 1, 2) per sample giving the order in which the three ops are applied.
    """
    for step in range(3):
        for op in range(3):
            sel = (order[:, step] == op).nonzero().flatten()
            if sel.numel() == 0:
                continue
            xs = x.index_select(0, sel)
            f = factors.index_select(0, sel)[:, op].view(-1, 1, 1, 1)
            if op == 0:
                xs = xs * f
            elif op == 1:
                xs = f * xs + (1 - f) * _gray(xs).mean(dim=(1, 2, 3), keepdim=True)
            else:
                xs = f * xs + (1 - f) * _gray(xs)
            x = x.index_copy(0, sel, xs.clamp_(0.0, 1.0))
    return x


def _next_or_raise(it, path: Path):
    """``next(EpochIterator)`` that raises instead of hanging when ffcv's thread dies.

    ffcv runs the compiled pipeline in a thread; an exception there (a numba typing error, a
    corrupt page) kills the thread and a plain ``next`` would wait forever. Returns None at the
    end of the epoch.
    """
    while True:
        try:
            item = it.output_queue.get(timeout=0.5)
            break
        except Empty:
            if not it.is_alive() and it.output_queue.empty():
                raise DataError(f"ffcv's loader thread for '{path}' died (traceback above); "
                                "re-run write_beton if the file is damaged") from None
    if item is None:
        return None
    slot, result = item
    if hasattr(it, "current_stream"):  # CUDA: wait for the copy stream as ffcv's __next__ does
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


class FFCVLoader:
    """BatchLoader over a ``.beton`` written by :func:`write_beton`; see the module doc."""

    def __init__(self, beton_path: str | os.PathLike[str], spec: AugmentSpec, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 1,
                 device: str | torch.device = "cpu", batches_ahead: int = 2, os_cache: bool = True) -> None:
        _require_ffcv()
        from ffcv.reader import Reader

        self.path = Path(beton_path)
        if not self.path.is_file():
            raise DataError(f"ffcv dataset '{self.path}' does not exist; convert the ImageFolder tree first: "
                            f"python -m peco_scale.data.ffcv_backend <data_root> {self.path}")
        if spec.task not in TASKS:
            raise DataError(f"task={spec.task!r} is not one of {TASKS}")
        self.spec = spec
        if spec.task == "stage2":
            if spec.tokenizer_size < 1:
                raise DataError(f"stage2 needs tokenizer_size >= 1 (got {spec.tokenizer_size}); "
                                "set it to the tokenizer's input side, e.g. img_size")
            self.crop_size = max(spec.img_size, spec.tokenizer_size)
            mask_kw = dict(spec.mask)
            mask_kw.setdefault("grid", spec.img_size // 16)  # ViT/16 patch grid by default
            try:
                self.mask_gen: BlockMaskGenerator | None = BlockMaskGenerator(**mask_kw)
            except (TypeError, ValueError) as exc:
                raise DataError(f"bad mask settings {spec.mask}: {exc}") from None
        else:
            self.crop_size = spec.img_size
            self.mask_gen = None
        if spec.img_size < 1:
            raise DataError(f"img_size={spec.img_size} must be >= 1")

        side = read_sidecar(self.path)
        if side is None:
            log.warning("no sidecar '%s'; cannot check the .beton's max_resolution", sidecar_path(self.path))
        elif int(side.get("max_resolution", 0)) < self.crop_size:
            raise DataError(f"'{self.path}' was written at max_resolution={side.get('max_resolution')} "
                            f"< requested {self.crop_size} px; re-run write_beton with "
                            f"max_resolution >= {self.crop_size} or lower img_size/tokenizer_size")
        try:
            reader = Reader(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"'{self.path}' is not a readable .beton ({type(exc).__name__}: {exc}); "
                            "re-run write_beton") from None
        fields = list(reader.handlers)
        if fields[:3] != ["image", "label", "index"]:
            raise DataError(f"'{self.path}' has fields {fields}, expected ['image', 'label', 'index']; "
                            "write it with peco_scale.data.ffcv_backend.write_beton")
        n = int(reader.num_samples)
        if n == 0:
            raise DataError(f"'{self.path}' holds no images; re-run write_beton on a folder with readable images")
        if side is not None and int(side.get("count", n)) != n:
            raise DataError(f"sidecar of '{self.path}' says {side.get('count')} images but the file holds {n}; "
                            "the conversion was interrupted or mixed up, re-run write_beton")
        self.folder_index = np.asarray(reader.metadata["f2"], dtype=np.int64).copy()
        self.num_samples = n
        self.sampler = ShardedSampler(n, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed)
        self.batch_size, self.seed, self.workers = int(batch_size), int(seed), max(1, int(workers))
        self.device = torch.device(device)
        self.batches_ahead, self.os_cache = batches_ahead, os_cache
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    # -- protocol
    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_start_batch(self, batch: int) -> None:
        self.sampler.set_start_batch(batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.sampler.start_batch

    def _ffcv_loader(self, positions: np.ndarray):
        from ffcv.loader import Loader, OrderOption

        dec = _make_decoder(self.crop_size, self.spec.scale, self.spec.ratio,
                            _epoch_key(self.seed, self.sampler.epoch), self.folder_index)
        return Loader(str(self.path), batch_size=self.batch_size, num_workers=self.workers,
                      os_cache=self.os_cache, order=OrderOption.SEQUENTIAL, indices=positions,
                      pipelines={"image": [dec]}, drop_last=True, batches_ahead=self.batches_ahead,
                      seed=self.seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        positions = self.sampler.shard_indices()
        if len(positions) == 0:
            return
        epoch = self.sampler.epoch
        it = iter(self._ffcv_loader(positions))
        try:
            while True:
                batch = _next_or_raise(it, self.path)
                if batch is None:
                    return
                image, label, index = batch
                yield self._finish(image, label, index, epoch)
        finally:
            it.close()

    # -- torch side of the augmentation
    def _finish(self, image: np.ndarray, label: np.ndarray, index: np.ndarray, epoch: int) -> dict[str, Any]:
        spec, dev = self.spec, self.device
        idx = np.asarray(index, dtype=np.int64).reshape(-1).copy()
        lab = torch.from_numpy(np.asarray(label, dtype=np.int64).reshape(-1).copy())
        seeds = _sample_seeds(self.seed, epoch, idx)
        b = len(idx)
        flip = np.zeros(b, dtype=bool)
        factors = np.ones((b, 3), dtype=np.float32)
        order = np.zeros((b, 3), dtype=np.int64)
        masks = [] if self.mask_gen is not None else None
        j = float(spec.jitter)
        for k, s in enumerate(seeds.tolist()):
            rng = np.random.default_rng(s)
            flip[k] = rng.random() < spec.hflip
            if j > 0:
                factors[k] = rng.uniform(max(0.0, 1 - j), 1 + j, size=3)
                order[k] = rng.permutation(3)
            if masks is not None:
                masks.append(self.mask_gen(rng))

        x = torch.from_numpy(image).to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if flip.any():
            fl = torch.from_numpy(flip).to(dev)
            x = torch.where(fl.view(-1, 1, 1, 1), x.flip(-1), x)
        if j > 0:
            x = color_jitter(x, torch.from_numpy(factors).to(dev), torch.from_numpy(order).to(dev))
        x = x.contiguous()

        def resized(size: int) -> torch.Tensor:
            if size == x.shape[-1]:
                return x
            return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                 antialias=True).clamp_(0.0, 1.0)

        out: dict[str, Any] = {"label": lab.to(dev), "index": torch.from_numpy(idx).to(dev), "skipped": 0}
        if spec.task == "stage1":
            out["image"] = resized(spec.img_size) * 2.0 - 1.0
        elif spec.task == "finetune":
            out["image"] = (resized(spec.img_size) - self._mean) / self._std
        else:
            out["patch"] = (resized(spec.img_size) - self._mean) / self._std
            out["tokenizer"] = resized(spec.tokenizer_size) * 2.0 - 1.0
            out["mask"] = torch.from_numpy(np.stack(masks).astype(bool)).to(dev)
        return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m peco_scale.data.ffcv_backend",
                                 description="Convert an ImageFolder tree to an ffcv .beton")
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--max-resolution", type=int, default=256)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--mode", choices=("jpg", "raw"), default="jpg")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        s = write_beton(a.root, a.out, max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality,
                        mode=a.mode, workers=a.workers)
    except DataError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {s['written']} images ({s['skipped']} unreadable skipped, {len(s['classes'])} classes) "
          f"to {s['path']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
