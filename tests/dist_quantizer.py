"""Run by test_train_tokenizer under `deepspeed --num_gpus 2`: the quantizer's cross-rank sync.

Each rank quantizes its half of a fixed dataset for a few steps; the codebooks are saved per
rank. ``run_single`` replays the same steps in one process on the whole data: with dead-code
restarts off, the all-reduced EMA must equal it.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peco_scale.models.quantizer import EMAVectorQuantizer, QuantizerConfig  # noqa: E402

STEPS, N, D, K = 5, 256, 8, 64


def _data(step: int) -> torch.Tensor:
    """[2N, D] vectors of one step: rank r takes rows r*N:(r+1)*N."""
    g = torch.Generator().manual_seed(100 + step)
    centres = torch.randn(16, D, generator=g) * 3
    return centres[torch.randint(0, 16, (2 * N,), generator=g)] + torch.randn(2 * N, D, generator=g)


def _grid(x):
    return x.t().reshape(1, D, 1, x.shape[0])


def _run(rows: slice, restarts: int) -> EMAVectorQuantizer:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(QuantizerConfig(codebook_size=K, dim=D, dead_code_steps=restarts)).train()
    for step in range(STEPS):
        vq(_grid(_data(step)[rows]))
    return vq


def run_single() -> torch.Tensor:
    return _run(slice(0, 2 * N), 0).codebook.clone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    from peco_scale.engine.dist import init_distributed, shutdown_distributed

    rank, world, _ = init_distributed()
    assert world == 2
    rows = slice(rank * N, (rank + 1) * N)
    plain = _run(rows, 0)
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(QuantizerConfig(codebook_size=K, dim=D, dead_code_steps=1)).train()
    init = None
    for step in range(STEPS):
        vq(_grid(_data(step)[rows] * (1 if step == 0 else 0.01)))  # later steps leave most codes dead
        if step == 0:
            init = vq.codebook.clone()
    torch.save({"codebook": plain.codebook, "restart_codebook": vq.codebook, "restart_init": init},
               Path(args.out) / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
