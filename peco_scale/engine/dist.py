"""Process-group set-up for one process or many (the `deepspeed` launcher), CPU or GPU."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Environment DeepSpeed needs, set before it is imported.

    Without CUDA DeepSpeed must be told to use its CPU accelerator (the installed torch is
    a CUDA build, so its auto-detection can pick CUDA and fail). A plain
    ``python launch/...`` run gets the rank variables of a world of one so that the same
    DeepSpeed code path runs with or without the launcher.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group (NCCL on GPU, gloo on CPU) -> (rank, world_size, device)."""
    prepare_environment()
    import deepspeed  # imported here: DS_ACCELERATOR must be set first

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ:
        # ranks sharing a host must share its cores: oversubscribed OpenMP pools spin-wait
        # on each other and run many times slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if device.type == "cpu":
            _unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size(), device


def _unlink_shm_buffer() -> None:
    """Remove this rank's shared-memory all-reduce buffer file as soon as every rank has mapped it.

    DeepSpeed's CPU accelerator creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (about 66 MiB per rank) while the process group starts, maps every peer's, and never unlinks
    them: each finished run left its files in RAM. The mappings stay valid after the unlink, so
    removing the name right after start-up leaks nothing however the run ends (even SIGKILL)."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()  # every peer has opened this rank's buffer (shm_initialize returns after that)
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def shutdown_distributed() -> None:
    """Meet every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's destructors can run while a peer has already closed
    its sockets, and a rank that finished correctly then aborts ("terminate called without an
    active exception", exit -6) and fails the whole launcher.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python numbers over ranks (e.g. skipped-image counts)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_norm_stats(module: torch.nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (each rank normalises its own
    micro-batch while training, so without this every rank keeps its own running mean and
    variance: evaluation would depend on the rank, and a checkpoint holds rank 0's only)."""
    if world_size() == 1:
        return
    stats = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    if not stats:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in stats])
    dist.all_reduce(flat)
    flat /= world_size()
    for b, part in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(part.view_as(b).to(b.dtype))


def match_forward_passes(passes: int, extra_pass, device: torch.device) -> None:
    """Call ``extra_pass()`` until this rank has made as many forward passes as the busiest rank.
    Under ZeRO-3 every forward gathers the parameters collectively, so ranks that evaluate fewer
    images than others must still join every pass."""
    if world_size() == 1:
        return
    most = torch.tensor([passes], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    for _ in range(int(most) - passes):
        extra_pass()


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """True when ``t`` is bitwise identical on every rank (compares a digest of its bytes)."""
    if world_size() == 1:
        return True
    import hashlib

    digest = hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    digests: list = [None] * world_size()
    dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1
