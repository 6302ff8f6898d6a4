"""Peak memory of the masked linear-CE, forward + backward, counted on CPU by
``peco_kernels.bench.LiveBytes`` (device-independent: the Triton path runs under the interpreter).

    python benchmarks/ce_memory.py                       # ViT-H/14-448: 12,544 rows, H 1280, V 8192, bf16
    python benchmarks/ce_memory.py --chunk_mib 256       # another bound on the chunk buffer

Prints the eager reference's peak, the Triton path's and their ratio (the issue's goal: <= 25%).
The interpreted Triton pass takes about a minute and a half at the default shape on 2 cores.
"""

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import peco_kernels.linear_ce as linear_ce  # noqa: E402
from peco_kernels.bench import LiveBytes  # noqa: E402
from peco_kernels.reference import masked_linear_cross_entropy_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32 * 392)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunk_mib", type=int, default=0, help="override the chunk-buffer bound (default: the library's)")
    args = ap.parse_args()
    if args.chunk_mib:
        linear_ce._CHUNK_BYTES = args.chunk_mib * 2**20
    g = torch.Generator().manual_seed(0)
    m, h_dim, v = args.rows, args.hidden, args.vocab
    hidden = (torch.randn(m, h_dim, generator=g) * 0.5).bfloat16()
    weight = (torch.randn(v, h_dim, generator=g) * 0.02).bfloat16()
    bias = torch.zeros(v, dtype=torch.bfloat16)
    targets = torch.randint(0, v, (m,), generator=g)

    def peak(fn) -> float:
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        meter = LiveBytes()
        with meter:
            fn(h, w, b).backward()
        return meter.peak / 2**20

    eager = peak(lambda h, w, b: masked_linear_cross_entropy_reference(h, w, b, targets)[0])
    tri = peak(lambda h, w, b: linear_ce.masked_linear_cross_entropy_triton(h, w, b, targets, None)[0])
    print(f"rows {m}, hidden {h_dim}, vocab {v}, bf16, chunk bound {linear_ce._CHUNK_BYTES / 2**20:g} MiB: "
          f"eager {eager:.1f} MiB, triton {tri:.1f} MiB ({tri / eager:.1%} of eager)")


if __name__ == "__main__":
    main()
