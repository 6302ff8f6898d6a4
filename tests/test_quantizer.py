"""EMA quantizer against independent references (numpy float64, explicit one-hot algebra)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peco_scale.models.quantizer import EMAVectorQuantizer, QuantizerConfig, kmeans, nearest_code


def _grid(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [1, D, 1, N] (the quantizer's [B, D, h, w] layout)."""
    return x.t().reshape(1, x.shape[1], 1, x.shape[0])


def _reference_ema(codebook, cluster, embed_sum, z, decay, eps, cosine):
    """One EMA step in float64 numpy with a dense one-hot matrix."""
    z = z.astype(np.float64)
    if cosine:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)  # [N, K]
    idx = d.argmin(1)
    onehot = np.eye(codebook.shape[0])[idx]  # [N, K]
    cluster = decay * cluster + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * onehot.T @ z
    n = cluster.sum()
    smoothed = (cluster + eps) / (n + codebook.shape[0] * eps) * n
    new = embed_sum / smoothed[:, None]
    if cosine:
        new = new / np.linalg.norm(new, axis=1, keepdims=True)
    return new, cluster, embed_sum, idx


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ema_update_matches_reference(metric):
    torch.manual_seed(0)
    cfg = QuantizerConfig(codebook_size=37, dim=8, metric=metric, kmeans_init=False, dead_code_steps=0, decay=0.9)
    vq = EMAVectorQuantizer(cfg).train()
    cb = vq.codebook.double().numpy().copy()
    cluster = vq.cluster_size.double().numpy().copy()
    esum = vq.embed_sum.double().numpy().copy()
    for _ in range(3):
        z = torch.randn(200, 8)
        out = vq(_grid(z))
        cb, cluster, esum, idx = _reference_ema(cb, cluster, esum, z.numpy(), cfg.decay, cfg.eps, metric == "cosine")
        np.testing.assert_array_equal(out["indices"].flatten().numpy(), idx)
        np.testing.assert_allclose(vq.codebook.numpy(), cb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(vq.cluster_size.numpy(), cluster, rtol=1e-5, atol=1e-6)
        counts = np.bincount(idx, minlength=37) / idx.size
        nz = counts[counts > 0]
        assert out["perplexity"].item() == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-4)


def test_indices_are_nearest_and_ties_go_low():
    torch.manual_seed(1)
    z, cb = torch.randn(300, 16), torch.randn(50, 16)
    idx, d = nearest_code(z, cb)
    ref = torch.cdist(z.double(), cb.double()).argmin(1)
    assert torch.equal(idx, ref)
    torch.testing.assert_close(d, ((z - cb[idx]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    dup = torch.cat([cb[:5], cb[:5]])  # codes 0-4 repeated as 5-9: ties must pick the lower
    assert torch.equal(nearest_code(cb[:5], dup)[0], torch.arange(5))


def test_straight_through_and_commitment():
    vq = EMAVectorQuantizer(QuantizerConfig(codebook_size=10, dim=4, kmeans_init=False)).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    w = torch.randn_like(z)
    (out["z_q"] * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # gradient copied straight through
    q = vq.lookup(out["indices"])
    torch.testing.assert_close(out["z_q"], q)
    assert out["commit_loss"].item() == pytest.approx(0.25 * F.mse_loss(z, q).item(), rel=1e-5)
    assert not any(p.requires_grad for p in vq.parameters())


def test_kmeans_init_finds_clusters():
    torch.manual_seed(2)
    centers = torch.tensor([[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, 0, -5.0]])
    x = torch.cat([c + 0.1 * torch.randn(100, 3) for c in centers])
    vq = EMAVectorQuantizer(QuantizerConfig(codebook_size=4, dim=3, kmeans_iters=20, dead_code_steps=0)).train()
    assert not bool(vq.initialized)
    vq(_grid(x[torch.randperm(400)]))
    assert bool(vq.initialized)
    # every true centre has a code near it (a random init would not: codes ~ N(0, 1))
    d = torch.cdist(centers, vq.codebook).min(1).values
    assert d.max() < 0.2, d
    # direct call: k-means centroids are the means of their clusters
    c = kmeans(x, 4, 20, torch.Generator().manual_seed(0), cosine=False)
    idx, _ = nearest_code(x, c)
    for k in range(4):
        torch.testing.assert_close(c[k], x[idx == k].mean(0), rtol=1e-4, atol=1e-4)


def test_dead_codes_restart_from_recent_outputs():
    torch.manual_seed(3)
    cfg = QuantizerConfig(codebook_size=16, dim=4, kmeans_init=False, dead_code_steps=3, usage_window=2)
    vq = EMAVectorQuantizer(cfg).train()
    vq.codebook.mul_(100.0)  # push codes far away: all but the nearest few go unused
    vq.embed_sum.copy_(vq.codebook)
    z = torch.randn(64, 4)
    usage = []
    for _ in range(6):
        usage.append(vq(_grid(z))["codebook_usage"].item())
    # after the restart at step 3, restarted codes sit on batch vectors
    d = torch.cdist(vq.codebook, z).min(1).values
    restarted = (d < 1.0).sum().item()
    assert restarted >= 12, d
    assert usage[-1] > usage[1] + 0.3, usage


def test_no_restart_keeps_dead_codes():
    torch.manual_seed(3)
    cfg = QuantizerConfig(codebook_size=16, dim=4, kmeans_init=False, dead_code_steps=0, usage_window=2)
    vq = EMAVectorQuantizer(cfg).train()
    vq.codebook.mul_(100.0)
    vq.embed_sum.copy_(vq.codebook)
    z = torch.randn(64, 4)
    for _ in range(6):
        out = vq(_grid(z))
    assert out["codebook_usage"].item() <= 4 / 16


def test_codebook_size_below_two_rejected():
    with pytest.raises(ValueError, match="codebook_size=1"):
        EMAVectorQuantizer(QuantizerConfig(codebook_size=1))
