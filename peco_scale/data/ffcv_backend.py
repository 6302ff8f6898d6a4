"""FFCV backend: ImageFolder -> ``.beton`` writer and a rank-sharded, resumable loader.

Writer (:func:`write_beton`; command line ``python -m peco_scale.data convert --to ffcv``):
unreadable files are skipped and counted, never fatal; a killed conversion resumes from its
finished chunks in ``<out>.parts/``; the ``.beton`` appears atomically (temp file + rename), with
a sidecar ``<out>.json`` describing it.

Loader (:class:`FFCVLoader`): the BatchLoader of ``spec.py``, in the folder backend's order
(same permutation, drop-last, sharding, start-batch skip). A batch is bit-reproducible on CPU
given (seed, epoch, rank, world_size, batch_size, start batch), whatever ``workers`` or resuming.
Batches carry an extra ``"index"`` int64 [B]; ``"skipped"`` is always 0.

Design notes: docs/design.md
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .colour import draw_flip_jitter, flip_jitter_normalize, to_rgb
from .folder import scan_image_folder
from .masking import BlockMaskGenerator, RandomMaskGenerator, mask_generator
from .mim import IMAGENET_MEAN, IMAGENET_STD
from .sampling import ShardedSampler, sample_seeds, splitmix64_np
from .spec import TASKS, AugmentSpec, DataError, ShardedPosition

log = logging.getLogger(__name__)

__all__ = ["FFCVLoader", "write_beton", "read_sidecar"]

_INSTALL_HINT = ("ffcv is not installed; install it with `pip install -e '.[ffcv]'` after "
                 "`make syslibs` (system OpenCV + libturbojpeg + pkg-config), or use the folder backend")


def _require_ffcv():
    try:
        import ffcv
        from ffcv.fields import IntField, RGBImageField
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    del IntField, RGBImageField  # only checked to exist (a partial ffcv build lacks them)
    return ffcv


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


_PLAN_VERSION = 1


def _encode_one(path: str, max_resolution: int, mode: str, quality: int) -> tuple[np.ndarray | None, int, int, str]:
    """(stored bytes, height, width, "") for one file, or (None, 0, 0, reason) if PIL cannot decode it.

    The stored bytes are exactly what ffcv's RGBImageField would write: ffcv's own ``resizer``
    (INTER_AREA, longest side capped) then ``encode_jpeg`` (OpenCV) or the raw pixels.
    """
    from ffcv.fields.rgb_image import encode_jpeg, resizer

    try:
        with Image.open(path) as img:
            arr = np.asarray(to_rgb(img), dtype=np.uint8)  # full decode: truncation raises here
    except Exception as exc:  # noqa: BLE001 - any failure means "skip this file"
        return None, 0, 0, f"{type(exc).__name__}: {exc}"
    arr = np.ascontiguousarray(resizer(arr, int(max_resolution)))
    h, w = arr.shape[:2]
    data = encode_jpeg(arr, int(quality)) if mode == "jpg" else arr.reshape(-1)
    return np.ascontiguousarray(data, dtype=np.uint8), h, w, ""


def _save_atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encode_chunk(path: Path, samples: list[tuple[str, int]], first: int, pool: ThreadPoolExecutor,
                  max_resolution: int, mode: str, quality: int) -> None:
    """Encode samples[first:first+len] into one chunk file (written atomically)."""
    paths = [p for p, _ in samples]
    res = list(pool.map(lambda p: _encode_one(p, max_resolution, mode, quality), paths))
    ok = [i for i, r in enumerate(res) if r[0] is not None]
    blobs = [res[i][0] for i in ok]
    offsets = np.zeros(len(ok) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([b.size for b in blobs])
    _save_atomic_npz(
        path,
        data=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
        offsets=offsets,
        hw=np.array([[res[i][1], res[i][2]] for i in ok], dtype=np.int64).reshape(-1, 2),
        label=np.array([samples[i][1] for i in ok], dtype=np.int64),
        index=np.array([first + i for i in ok], dtype=np.int64),
        skipped_path=np.array([paths[i] for i, r in enumerate(res) if r[0] is None], dtype=str),
        skipped_reason=np.array([r[3] for r in res if r[0] is None], dtype=str),
    )


class _ChunkImages:
    """Indexable dataset over the encoded chunks for ffcv's DatasetWriter (one chunk cached per process)."""

    def __init__(self, files: list[Path], counts: list[int], mode: str) -> None:
        self.files, self.mode = files, mode
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        c = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._cached is None or self._cached[0] != c:
            with np.load(self.files[c]) as z:
                self._cached = (c, {k: z[k] for k in ("data", "offsets", "hw", "label", "index")})
        d = self._cached[1]
        j = i - int(self.starts[c])
        blob = d["data"][d["offsets"][j]:d["offsets"][j + 1]]
        h, w = (int(v) for v in d["hw"][j])
        return (blob, h, w, self.mode), int(d["label"][j]), int(d["index"][j])


def _write_encoded(destination, item, malloc) -> None:
    """RGBImageField.encode for an already encoded (bytes, height, width, mode) item: a copy, no re-encode."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    blob, h, w, mode = item
    destination["mode"] = IMAGE_MODES[mode]
    destination["height"], destination["width"] = h, w
    destination["data_ptr"], storage = malloc(blob.nbytes)
    storage[:] = blob


def _listing_digest(samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_beton(root: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                max_resolution: int = 256, jpeg_quality: int = 90, mode: str = "jpg",
                workers: int | None = None, progress: bool = True, chunk_size: int = 1024,
                resume: bool = True) -> dict[str, Any]:
    """Convert an ImageFolder tree to ``out_path`` (.beton) + ``out_path.json``; resumable.

    Two phases. (1) Encode: the images, in ``scan_image_folder`` order, are decoded fully with
    PIL, resized and encoded exactly as ffcv's RGBImageField would, ``chunk_size`` at a time, into
    ``<out>.parts/chunk-NNNNNN.npz`` (each written to a temp name and renamed, so a chunk file is
    complete or absent). A killed conversion rerun with the same source listing and settings
    (recorded in ``<out>.parts/plan.json``) keeps the finished chunks and encodes only the rest;
    anything else starts over. (2) Assemble: ffcv's DatasetWriter copies the stored bytes into
    ``<out>.tmp-<pid>``, renamed to ``out_path`` when complete; then the sidecar is written and the
    parts folder removed. Unreadable images are skipped and counted.

    Returns ``{"written", "skipped", "skipped_files", "classes", "ignored", "path", "reused_chunks",
    "chunks"}``.
    """
    _require_ffcv()
    if mode not in ("jpg", "raw"):
        raise DataError(f"mode={mode!r} is not supported; use 'jpg' (smaller) or 'raw' (faster decode)")
    if int(max_resolution) < 1:
        raise DataError(f"max_resolution={max_resolution} must be a positive side length, e.g. 256")
    if int(chunk_size) < 1:
        raise DataError(f"chunk_size={chunk_size} must be >= 1, e.g. 1024")
    workers = max(1, int(workers or os.cpu_count() or 1))
    samples, classes, n_ignored = scan_image_folder(root)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = {"version": _PLAN_VERSION, "source": str(Path(root).resolve()), "listing": _listing_digest(samples),
            "count": len(samples), "max_resolution": int(max_resolution), "mode": mode,
            "jpeg_quality": int(jpeg_quality), "chunk_size": int(chunk_size)}
    parts = Path(str(out) + ".parts")
    files, reused = _encode_phase(samples, parts, plan, workers=workers, progress=progress, resume=resume)
    counts, bad = _assemble_phase(files, out, plan, workers, root)
    side = {"max_resolution": int(max_resolution), "count": sum(counts), "skipped": len(bad),
            "classes": classes, "source": str(Path(root).resolve()), "mode": mode,
            "jpeg_quality": int(jpeg_quality), "scanned": len(samples), "listing": plan["listing"]}
    stmp = sidecar_path(out).with_name(sidecar_path(out).name + f".tmp-{os.getpid()}")
    stmp.write_text(json.dumps(side, indent=1))
    os.replace(stmp, sidecar_path(out))
    shutil.rmtree(parts, ignore_errors=True)
    return {"written": sum(counts), "skipped": len(bad), "skipped_files": [p for p, _ in bad],
            "classes": classes, "ignored": n_ignored, "path": str(out), "reused_chunks": reused,
            "chunks": len(files)}


def _encode_phase(samples: list[tuple[str, int]], parts: Path, plan: dict[str, Any], *, workers: int,
                  progress: bool, resume: bool) -> tuple[list[Path], int]:
    """Phase 1 of :func:`write_beton`: encode into chunk files under ``parts`` (resumable when
    ``plan`` matches the one recorded there). Returns (chunk files, chunks reused)."""
    plan_file = parts / "plan.json"
    if parts.exists():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            old = None
        if not resume or old != plan:
            why = "--overwrite" if not resume else "the source folder or the settings changed"
            log.warning("discarding the partial conversion in %s (%s)", parts, why)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob("*.tmp-*"):  # a chunk being written when the last run died
        stale.unlink()
    if not plan_file.is_file():
        tmp = plan_file.with_name(f"plan.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(plan, indent=1))
        os.replace(tmp, plan_file)
    size = plan["chunk_size"]
    n_chunks = -(-len(samples) // size)
    files = [parts / f"chunk-{c:06d}.npz" for c in range(n_chunks)]
    todo = [c for c in range(n_chunks) if not files[c].is_file()]
    reused = n_chunks - len(todo)
    if reused:
        log.info("resuming the conversion: %d of %d chunks already encoded in %s", reused, n_chunks, parts)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), initial=min(len(samples), reused * size), desc="encoding", unit="img")
        except ImportError:  # pragma: no cover
            pass
    with ThreadPoolExecutor(workers) as pool:
        for c in todo:
            chunk = samples[c * size:(c + 1) * size]
            _encode_chunk(files[c], chunk, c * size, pool, plan["max_resolution"], plan["mode"], plan["jpeg_quality"])
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return files, reused


def _assemble_phase(files: list[Path], out: Path, plan: dict[str, Any], workers: int,
                    root: str | os.PathLike[str]) -> tuple[list[int], list[tuple[str, str]]]:
    """Phase 2 of :func:`write_beton`: ffcv's DatasetWriter copies the chunks' bytes into a temp
    file renamed to ``out`` when complete. Returns (images per chunk, (path, reason) skipped)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    counts, bad = [], []
    for f in files:
        with np.load(f) as z:
            counts.append(int(z["label"].shape[0]))
            bad.extend(zip(z["skipped_path"].tolist(), z["skipped_reason"].tolist()))
    for p, r in bad:
        log.warning("skipping unreadable image %s (%s)", p, r)
    if sum(counts) == 0:
        shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
        raise DataError(f"none of the {plan['count']} images under '{root}' could be decoded; "
                        "check the files (e.g. open one with PIL) or point at another folder")
    image_field = RGBImageField(write_mode=plan["mode"], max_resolution=plan["max_resolution"],
                                jpeg_quality=plan["jpeg_quality"])
    image_field.encode = _write_encoded  # the bytes are already encoded: copy them (type stays RGBImageField)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField(), "index": IntField()},
                               num_workers=workers)
        writer.from_indexed_dataset(_ChunkImages(files, counts, plan["mode"]), chunksize=64)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return counts, bad


# ----------------------------------------------------------------------------- loader

_CROP_SALT = np.uint64(0xC0FFEE5EED)
_LOW32 = np.uint64(0xFFFFFFFF)


def _crop_seeds(seed: int, epoch: int, folder_index: np.ndarray) -> np.ndarray:
    """Per-sample crop seed (int64 in [0, 2**32)) for numba's np.random, vectorised.

    ``sample_seed(seed, epoch, index)`` mixed once more with a salt, so the crop stream is
    independent of the Python-side (flip / jitter / mask) stream of the same sample.
    """
    s = sample_seeds(seed, epoch, np.asarray(folder_index, dtype=np.int64)).astype(np.uint64)
    return (splitmix64_np(s ^ _CROP_SALT) & _LOW32).astype(np.int64)


def _make_decoder(output_size: int, scale, ratio):
    """ffcv RandomResizedCrop decoder whose crop is seeded per sample (see module doc).

    The seeds arrive at run time in a third scratch buffer (``[B, 1]`` int64, filled by
    :class:`_SeededEpochIterator` just before each batch runs), so the pipeline is compiled once
    per ffcv ``Loader`` and reused for every epoch.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__((output_size, output_size))
            self.scale = np.array(scale, dtype=np.float64)
            self.ratio = np.array(ratio, dtype=np.float64)

        @property
        def get_crop_generator(self):
            return get_random_crop

        def declare_state_and_memory(self, previous_state):
            state, (dest, temp) = super().declare_state_and_memory(previous_state)
            return state, (dest, temp, AllocationQuery((1,), np.dtype("<i8")))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            sc, ra = self.scale, self.ratio

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, seeds = my_storage
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
                    # numba keeps one RNG state per thread; seed + draws happen here, on one thread
                    np.random.seed(seeds[dst_ix, 0])
                    i, j, h, w = get_crop_c(height, width, sc, ra)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCropDecoder()


def _seeded_epoch_iterator(loader, order: np.ndarray, crop_seeds: np.ndarray):
    """An ffcv ``EpochIterator`` over ``order`` that fills the decoder's seed buffer per batch.

    ``crop_seeds`` is indexed by ``.beton`` position. Built on the (once compiled) ``loader``.
    """
    from ffcv.loader.epoch_iterator import EpochIterator

    class _SeededEpochIterator(EpochIterator):
        def __init__(self) -> None:
            self._crop_seeds = crop_seeds
            self._seed_bufs = None
            super().__init__(loader, order)  # starts the thread

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            if self._seed_bufs is None:
                self._seed_bufs = [v[2] for v in self.memory_allocations["operation"].values()
                                   if isinstance(v, tuple) and len(v) == 3]
            for buf in self._seed_bufs:
                buf[batch_slot, :len(batch_indices), 0] = self._crop_seeds[batch_indices]
            return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    return _SeededEpochIterator()


def _stop_epoch_iterator(it) -> None:
    """Stop ffcv's loader thread and wait for it (it otherwise runs on after an early exit and
    a thread still inside numba at interpreter exit aborts the process)."""
    it.terminate_event.set()
    it.iter_ixes = iter(())  # the thread finishes its current batch, then sees the end
    while it.is_alive():
        try:  # unblock a pending put (of a batch or of the end marker)
            it.output_queue.get(timeout=0.05)
        except Empty:
            pass
        it.join(timeout=0.01)
    it.close()


_LIVE: "weakref.WeakSet[_Epoch]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # iterators still referenced at exit (never closed by the caller)
    for ep in list(_LIVE):
        ep.stop()


class _Epoch:
    """One epoch: ffcv's thread decodes + crops, a second thread runs the torch side
    (flip / jitter / resize / mask) so it overlaps with decoding; the caller only dequeues."""

    def __init__(self, owner: "FFCVLoader", it, epoch: int, prefetch: int) -> None:
        self.owner, self.it, self.epoch = owner, it, epoch
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="ffcv-finish", daemon=True)
        self._stopped = False
        _LIVE.add(self)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            while not self.stop_event.is_set():
                batch = _next_or_raise(self.it, self.owner.path, self.stop_event)
                if batch is None:
                    break
                image, label, index = batch
                if not self._put(("ok", self.owner._finish(image, label, index, self.epoch))):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(("err", exc))
        finally:
            _stop_epoch_iterator(self.it)

    def get(self):
        while True:
            try:
                return self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise DataError(f"the ffcv batch thread for '{self.owner.path}' stopped "
                                    "without a result (traceback above)") from None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.02)
        _LIVE.discard(self)


def _next_or_raise(it, path: Path, stop: threading.Event | None = None):
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
            if stop is not None and stop.is_set():
                return None
            if not it.is_alive() and it.output_queue.empty():
                raise DataError(f"ffcv's loader thread for '{path}' died (traceback above); "
                                "re-run write_beton if the file is damaged") from None
    if item is None:
        return None
    slot, result = item
    if hasattr(it, "current_stream"):  # CUDA: wait for the copy stream as ffcv's __next__ does
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


class FFCVLoader(ShardedPosition):
    """BatchLoader over a ``.beton`` written by :func:`write_beton`; see the module doc."""

    def __init__(self, beton_path: str | os.PathLike[str], spec: AugmentSpec, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 1,
                 device: str | torch.device = "cpu", batches_ahead: int = 2, os_cache: bool = True) -> None:
        _require_ffcv()
        from ffcv.reader import Reader

        self.path = Path(beton_path)
        if not self.path.is_file():
            raise DataError(f"ffcv dataset '{self.path}' does not exist; convert the ImageFolder tree first: "
                            f"python -m peco_scale.data convert --to ffcv --data DIR --out {self.path}")
        if spec.task not in TASKS:
            raise DataError(f"task={spec.task!r} is not one of {TASKS}")
        self.spec = spec
        if spec.task == "pretrain":
            if spec.tokenizer_size < 0:
                raise DataError(f"pretrain needs tokenizer_size >= 0 (got {spec.tokenizer_size}); "
                                "set it to the tokenizer's input side, e.g. img_size (0 = no tokenizer view)")
            self.crop_size = max(spec.img_size, spec.tokenizer_size)
            mask_kw = dict(spec.mask)
            mask_kw.setdefault("grid", spec.img_size // 16)  # ViT/16 patch grid by default
            try:
                self.mask_gen: BlockMaskGenerator | RandomMaskGenerator | None = mask_generator(**mask_kw)
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
        self.prefetch = 2  # finished batches queued ahead of the caller
        self._loader = None
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    # -- protocol: batches_per_epoch, epoch, set_epoch, set_start_batch, __len__ come from ShardedPosition

    def _ffcv_loader(self):
        """The ffcv Loader (built and compiled once; every epoch reuses its compiled pipeline)."""
        if self._loader is None:
            from ffcv.loader import Loader, OrderOption

            dec = _make_decoder(self.crop_size, self.spec.scale, self.spec.ratio)
            self._loader = Loader(str(self.path), batch_size=self.batch_size, num_workers=self.workers,
                                  os_cache=self.os_cache, order=OrderOption.SEQUENTIAL,
                                  pipelines={"image": [dec]}, drop_last=True,
                                  batches_ahead=self.batches_ahead, seed=self.seed)
        return self._loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        positions = self.sampler.shard_indices()
        if len(positions) == 0:
            return
        epoch = self.sampler.epoch
        loader = self._ffcv_loader()
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_num_threads(self.workers)
        crop_seeds = _crop_seeds(self.seed, epoch, self.folder_index)
        ep = _Epoch(self, _seeded_epoch_iterator(loader, np.asarray(positions), crop_seeds), epoch,
                    self.prefetch)
        try:
            while True:
                kind, val = ep.get()
                if kind == "end":
                    return
                if kind == "err":
                    raise val
                yield val
        finally:
            ep.stop()

    # -- torch side of the augmentation
    def _finish(self, image: np.ndarray, label: np.ndarray, index: np.ndarray, epoch: int) -> dict[str, Any]:
        spec, dev = self.spec, self.device
        idx = np.asarray(index, dtype=np.int64).reshape(-1).copy()
        lab = torch.from_numpy(np.asarray(label, dtype=np.int64).reshape(-1).copy())
        seeds = sample_seeds(self.seed, epoch, idx)
        b = len(idx)
        flip = np.zeros(b, dtype=bool)
        factors = np.ones((b, 3), dtype=np.float32)
        order = np.zeros((b, 3), dtype=np.int64)
        masks = [] if self.mask_gen is not None else None
        for k, s in enumerate(seeds.tolist()):
            rng = np.random.default_rng(s)
            flip[k], factors[k], order[k] = draw_flip_jitter(rng, spec.hflip, float(spec.jitter))
            if masks is not None:
                masks.append(self.mask_gen(rng))

        x = flip_jitter_normalize(image, flip, factors, order, device=dev)  # [0, 1]: resized below

        def resized(size: int) -> torch.Tensor:
            if size == x.shape[-1]:
                return x
            return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                 antialias=True).clamp_(0.0, 1.0)

        out: dict[str, Any] = {"label": lab.to(dev), "index": torch.from_numpy(idx).to(dev), "skipped": 0}
        if spec.task == "tokenizer":
            out["image"] = resized(spec.img_size) * 2.0 - 1.0
        elif spec.task == "finetune":
            out["image"] = (resized(spec.img_size) - self._mean) / self._std
        else:
            out["patch"] = (resized(spec.img_size) - self._mean) / self._std
            if spec.tokenizer_size:  # 0: stage 2 without a tokenizer (the MAE tasks)
                out["tokenizer"] = resized(spec.tokenizer_size) * 2.0 - 1.0
            out["mask"] = torch.from_numpy(np.stack(masks).astype(bool)).to(dev)
        return out


def main(argv: list[str] | None = None) -> int:
    """The old second converter CLI, retired: one line naming the converter, exit 2."""
    print("error: this converter moved: python -m peco_scale.data convert --to ffcv --data DIR --out FILE.beton "
          "[--max_resolution N] [--mode jpg|raw] [--quality Q] [--workers N]", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
