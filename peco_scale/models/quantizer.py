"""EMA vector quantizer (VQ-VAE v2 style) with k-means init, dead-code restart and usage stats.

Every statistic that changes the codebook is made identical across ranks: EMA counts and
sums are all-reduced, the k-means init runs on rank 0 over vectors gathered from every rank
and is broadcast, and dead-code replacements are drawn on rank 0 and broadcast. So every
rank holds the same codebook without relying on DDP/DeepSpeed buffer syncing (which
DeepSpeed does not do, and which BEiT v2's per-rank k-means gets wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from peco_kernels import vq_nearest

from ..config import field


@dataclass
class QuantizerConfig:
    """EMA vector quantizer."""

    codebook_size: int = field(8192, "K, the number of codes (the MIM head's vocabulary)")
    dim: int = field(32, "D, the code dimension (low-dimensional codes raise usage)")
    metric: str = field("euclidean", "euclidean, or cosine (l2-normalised codes and inputs)")
    decay: float = field(0.99, "EMA decay of code counts and sums")
    eps: float = field(1e-5, "Laplace smoothing of the EMA cluster sizes")
    beta: float = field(0.25, "commitment loss weight")
    kmeans_init: bool = field(True, "initialise the codebook by k-means on the first batches")
    kmeans_iters: int = field(10, "Lloyd iterations of the k-means init")
    kmeans_max_vectors: int = field(65536, "at most this many gathered vectors feed the k-means init")
    dead_code_steps: int = field(200, "a code unused for this many steps is restarted (0 = never)")
    usage_window: int = field(100, "codebook_usage = fraction of codes used in the last N steps")


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry of each row: z [N, D], codebook [K, D] -> (indices int64 [N],
    squared distances fp32 [N]), never an [N, K] matrix for all N at once; ties go to the
    lowest index. ``peco_kernels.vq_nearest`` (Triton or its torch reference)."""
    return vq_nearest(z, codebook, metric="l2", backend=backend)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is drawn with probability ~ D(x)^2. x: [N, D] -> [k, D].

    Plain random seeding often puts two centres in one cluster and none in another, a
    local minimum that Lloyd's iterations cannot leave.
    """
    n = x.shape[0]
    draws = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = min(int(draws[0] * n), n - 1)
    d2 = ((x - x[chosen[0]]) ** 2).sum(1).double()
    for i in range(1, k):
        # inverse-CDF draw: cheaper than torch.multinomial, and all-zero d2 (fewer distinct
        # points than k) falls back to index 0-ish duplicates, restarted later as dead codes
        cdf = torch.cumsum(d2, 0)
        j = torch.searchsorted(cdf, draws[i] * cdf[-1], right=True).clamp_(max=n - 1)
        chosen[i] = j
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1).double())
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator, cosine: bool) -> torch.Tensor:
    """k-means++ seeding then Lloyd's iterations. x: [N, D] fp32 -> centroids [k, D].

    An empty cluster keeps its previous centroid.
    """
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        idx, _ = nearest_code(x, centroids)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    return centroids


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer whose codebook follows an EMA of its assigned inputs.

    The codebook is a buffer, not a parameter: no optimizer touches it. Gradients reach
    the encoder through the straight-through estimator; the commitment loss pulls encoder
    outputs towards their codes.
    """

    def __init__(self, cfg: QuantizerConfig, kernels: str = "auto"):
        super().__init__()
        # kernels: the peco_kernels backend of the nearest-code search + EMA statistics (auto = Triton
        # on CUDA tensors). A runtime choice of this process, never part of the saved config.
        self.kernels = kernels
        if cfg.codebook_size < 2:
            raise ValueError(f"quantizer.codebook_size={cfg.codebook_size} must be at least 2")
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.dim
        embed = torch.randn(k, d)
        if cfg.metric == "cosine":
            embed = F.normalize(embed, dim=1)
        self.register_buffer("codebook", embed)  # [K, D]
        self.register_buffer("cluster_size", torch.zeros(k))  # EMA of counts [K]
        self.register_buffer("embed_sum", embed.clone())  # EMA of sums [K, D]
        # steps since a code was last used, or (re)started: decides dead codes
        self.register_buffer("code_age", torch.zeros(k, dtype=torch.long))
        # steps since a code was last used by an input (never: a large number): the usage metric
        self.register_buffer("used_age", torch.full((k,), 2**40, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        self._init_pool: list[torch.Tensor] = []  # vectors gathered for the k-means init

    @property
    def cosine(self) -> bool:
        return self.cfg.metric == "cosine"

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """z: [B, D, h, w] encoder output -> dict with

        ``z_q`` [B, D, h, w] (straight-through), ``indices`` [B, h, w], ``commit_loss`` scalar,
        and in training ``perplexity`` and ``codebook_usage`` (scalars, identical on all ranks).
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # [N, D]
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        stats: dict[str, torch.Tensor] = {}
        if self.training:
            with torch.no_grad():
                if not bool(self.initialized):
                    self._collect_for_init(flat.detach())
                # fused: assignment + this rank's per-code counts and sums (deterministic)
                idx, _, counts, sums = vq_nearest(flat.detach(), self.codebook, backend=self.kernels,
                                                  return_stats=True)
                stats = self._ema_update(flat.detach(), counts, sums)
        else:
            idx, _ = nearest_code(flat, self.codebook, self.kernels)
        q = self.codebook[idx]  # [N, D]
        commit = self.cfg.beta * F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()  # straight-through
        z_q = q.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return {"z_q": z_q, "indices": idx.view(b, h, w), "commit_loss": commit, **stats}

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids of z: [B, D, h, w] -> [B, h, w] (no statistics touched)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        return nearest_code(flat, self.codebook, self.kernels)[0].view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of token ids: [B, h, w] -> [B, D, h, w]."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    # -- codebook maintenance ------------------------------------------------------------

    @property
    def init_pool(self) -> list[torch.Tensor]:
        """Vectors gathered so far for the k-means init (identical on every rank; empty once the
        codebook is initialised). Not a buffer: its size varies. Checkpoints written before the
        init save it beside the model (``train/tokenizer``), so a resume there repeats the
        uninterrupted run exactly."""
        return self._init_pool

    def load_init_pool(self, pool: list[torch.Tensor]) -> None:
        self._init_pool = [p.to("cpu") for p in pool]

    def _collect_for_init(self, flat: torch.Tensor) -> None:
        """Pool vectors from all ranks until K are seen, then k-means on rank 0 and broadcast."""
        rank, world = _world()
        if world > 1:
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat.contiguous())
            flat = torch.cat(gathered)
        self._init_pool.append(flat.cpu())
        pooled = sum(p.shape[0] for p in self._init_pool)
        if pooled < self.cfg.codebook_size and len(self._init_pool) < 8:
            return
        x = torch.cat(self._init_pool)[: self.cfg.kmeans_max_vectors]
        self._init_pool.clear()
        centroids = torch.empty_like(self.codebook)
        if rank == 0:
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            centroids.copy_(kmeans(x, self.cfg.codebook_size, self.cfg.kmeans_iters, gen, self.cosine))
        if world > 1:
            dist.broadcast(centroids, 0)
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.code_age.zero_()
        self.initialized.fill_(True)

    def _ema_update(self, flat: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
        """One EMA step from this rank's per-code counts [K] and sums [K, D] (all-reduced here)."""
        _, world = _world()
        if world > 1:
            packed = torch.cat([counts[:, None], sums], dim=1)  # one collective for both
            dist.all_reduce(packed)
            counts, sums = packed[:, 0], packed[:, 1:]
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        self.code_age.add_(1).masked_fill_(counts > 0, 0)
        self.used_age.add_(1).masked_fill_(counts > 0, 0)
        if bool(self.initialized):
            self.cluster_size.mul_(self.cfg.decay).add_(counts, alpha=1 - self.cfg.decay)
            self.embed_sum.mul_(self.cfg.decay).add_(sums, alpha=1 - self.cfg.decay)
            self._refresh_codebook()
            self._restart_dead_codes(flat)
        usage = (self.used_age < self.cfg.usage_window).float().mean()
        return {"perplexity": perplexity, "codebook_usage": usage}

    def _refresh_codebook(self) -> None:
        k, eps = self.cfg.codebook_size, self.cfg.eps
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + eps) / (n + k * eps) * n  # Laplace smoothing
        embed = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(embed, dim=1) if self.cosine else embed)

    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Replace codes unused for ``dead_code_steps`` steps with recent encoder outputs.

        Replacements are drawn on rank 0 from its batch and broadcast, so the dead set (a
        function of all-reduced counts) and the new codes are identical on every rank.
        """
        steps = self.cfg.dead_code_steps
        if steps <= 0:
            return
        dead = (self.code_age >= steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        rank, world = _world()
        new = torch.empty(dead.numel(), flat.shape[1], dtype=self.codebook.dtype, device=flat.device)
        if rank == 0:
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), device="cpu").to(flat.device)
            new.copy_(flat[pick])
        if world > 1:
            dist.broadcast(new, 0)
        self.codebook[dead] = new
        # a restarted code starts with a unit-count cluster centred on its new vector
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = new
        self.code_age[dead] = 0

    def extra_repr(self) -> str:
        c = self.cfg
        return f"K={c.codebook_size}, D={c.dim}, metric={c.metric}, decay={c.decay}"
