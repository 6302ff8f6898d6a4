"""Pieces the trainer uses: the non-finite stops, windowed means, the optimizer-step iterator.

The per-step non-finite-loss check lives in ``preempt.StopFlag.check``, which shares its
all-reduce with the stop-signal agreement."""

from __future__ import annotations

import resource
import time

import torch

from . import dist as pdist


class NonFiniteLoss(RuntimeError):
    """The loss went NaN/inf on some rank; all ranks raise it together."""

    all_ranks = True  # agreed in a collective: the entry point prints it once


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` 'bf16', or 'auto' on GPU; a no-op context otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def optimizer_steps(loader, start_step: int, total_steps: int, steps_per_epoch: int, grad_accum: int):
    """Yield ``(step, epoch, micro_batches)`` for each optimizer step from ``start_step``.

    The epoch and the offset inside it are functions of the step alone, so a resumed run
    sees exactly the batches the uninterrupted run would have (every backend resumes by
    index). ``micro_batches`` is an iterator of ``grad_accum`` batches: consume it before the
    next step. The epoch's iterator is closed when the loop ends early (FFCV/DALI threads).
    """
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        loader.set_start_batch(offset * grad_accum)
        batches = iter(loader)
        try:
            for _ in range(min(steps_per_epoch - offset, total_steps - step)):
                yield step, epoch, (next(batches) for _ in range(grad_accum))
                step += 1
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()


class Window:
    """Sums of per-step scalars and images since the last logged row; ``means`` averages them
    over steps and ranks (one all-reduce)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.steps, self.sums = time.perf_counter(), 0, 0, {}

    def add(self, values: dict[str, float], images: int) -> None:
        self.steps += 1
        self.images += images
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self, device: torch.device, counts: dict[str, float] | None = None) -> dict[str, float]:
        """Means over steps and ranks (one all-reduce); ``counts`` are summed over ranks only
        and returned as ints (e.g. skipped images)."""
        world = pdist.world_size()
        keys, counts = sorted(self.sums), dict(counts or {})
        summed = pdist.all_reduce_sum([self.sums[k] for k in keys] + list(counts.values()), device)
        out: dict[str, float] = {k: v / (max(1, self.steps) * world) for k, v in zip(keys, summed)}
        out.update({k: int(round(v)) for k, v in zip(counts, summed[len(keys):])})
        return out

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def progress_row(window: Window, device: torch.device, *, step: int, epoch: int, skipped: float, lr: float,
                 grad_norm, flops_per_image: float | None) -> dict:
    """A metrics row for the steps since the last one (means over steps and ranks, images/s,
    TFLOP/s per rank when ``flops_per_image`` is known, peak memory); starts the next window."""
    means = window.means(device, {"skipped_images": skipped})
    ips = window.images / window.elapsed()
    window.reset()
    row = {"step": step, "epoch": epoch, **means, "lr": lr, "grad_norm": grad_norm, "images_per_s": ips}
    if flops_per_image is not None:
        row["tflops_per_gpu"] = flops_per_image * ips / pdist.world_size() / 1e12
    row["mem_gb"] = peak_memory_gb(device)
    return row


def stop_if_weights_nonfinite(module: torch.nn.Module, step: int, ckpt_root, device: torch.device) -> None:
    """Before a checkpoint is written: every rank checks its own shard of the weights (under
    ZeRO-3 ``ds_tensor``, else the tensor) and all stop if any is NaN/inf, so a poisoned update
    (finite loss, non-finite weights) never becomes the newest checkpoint."""
    bad = 0.0
    with torch.no_grad():
        for p in module.parameters():
            t = getattr(p, "ds_tensor", p)
            if t.numel() and not bool(torch.isfinite(t).all()):
                bad = 1.0
                break
    if pdist.all_reduce_sum([bad], device)[0] > 0:
        raise NonFiniteLoss(f"non-finite weights after step {step}; that checkpoint was not written, and the last "
                            f"good checkpoint in {ckpt_root} is kept")
