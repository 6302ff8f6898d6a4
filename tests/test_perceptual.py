"""Tests of the frozen perceptual network, its checkpoint loading and the PeCo perceptual distance."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from peco_scale.models.perceptual import (
    PERCEPTUAL_ARCHS,
    PerceptualLoss,
    PerceptualNet,
    PerceptualWeightsError,
    filter_state_dict,
    perceptual_distance,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images(batch: int = 2, size: tuple[int, int] = (32, 32), seed: int = 0) -> Tensor:
    """[batch, 3, H, W] uniform in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g) * 2 - 1


def _random_state_dict(arch: str, seed: int = 123) -> dict[str, Tensor]:
    """A state dict of ``arch``'s backbone filled with fresh random values.

    Shapes come from a meta-device build, which is near free even for vgg16 / vit_base.
    """
    with torch.device("meta"):
        shapes = PERCEPTUAL_ARCHS[arch].build().state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.randint(0, 9, v.shape,
                                                                                                 generator=g)
            for k, v in shapes.items()}


def _moco_checkpoint(backbone_sd: dict[str, Tensor], head_key: str) -> dict[str, Any]:
    """A MoCo v3 style checkpoint: base + momentum encoders, predictor, projection head, training state."""
    sd = {f"module.base_encoder.{k}": v for k, v in backbone_sd.items()}
    # a few momentum-encoder keys suffice (a full copy would double the vit_base file to ~700 MB)
    sd |= {f"module.momentum_encoder.{k}": v + 1 for k, v in list(backbone_sd.items())[:3]}
    sd |= {f"module.base_encoder.{head_key}.0.weight": torch.randn(8, 4),
           f"module.momentum_encoder.{head_key}.0.weight": torch.randn(8, 4),
           "module.predictor.0.weight": torch.randn(8, 8)}
    return {"epoch": 300, "arch": "vit", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}


def _assert_loaded(net: PerceptualNet, expected: dict[str, Tensor]) -> None:
    # the backbone is built on the meta device: every tensor must have been materialised by the load
    assert not any(t.is_meta for t in [*net.backbone.parameters(), *net.backbone.buffers()])
    loaded = net.backbone.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


@pytest.fixture(scope="module")
def vit_tiny() -> PerceptualNet:
    torch.manual_seed(0)
    return PerceptualNet("vit_tiny_patch16", None, "random")


@pytest.fixture(scope="module")
def resnet_loss() -> PerceptualLoss:
    torch.manual_seed(0)
    return PerceptualLoss("resnet_tiny", None, "random")


# --- perceptual_distance -------------------------------------------------------------------------


def _reference_distance(feats_a: list[Tensor], feats_b: list[Tensor]) -> float:
    """Eq. 4 by explicit loops in float64 numpy."""
    total = 0.0
    for a, b in zip(feats_a, feats_b):
        a, b = a.double().numpy(), b.double().numpy()
        batch, _, h, w = a.shape
        per_position = []
        for n in range(batch):
            for i in range(h):
                for j in range(w):
                    va, vb = a[n, :, i, j], b[n, :, i, j]
                    va = va / (np.sqrt((va ** 2).sum()) + 1e-10)
                    vb = vb / (np.sqrt((vb ** 2).sum()) + 1e-10)
                    per_position.append(((va - vb) ** 2).sum())
        total += float(np.mean(per_position))
    return total


def test_distance_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 8, 4, 4), (2, 16, 2, 3), (2, 5, 1, 1)]
    feats_a = [torch.randn(s, generator=g) for s in shapes]
    feats_b = [torch.randn(s, generator=g) for s in shapes]
    got = perceptual_distance(feats_a, feats_b)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference_distance(feats_a, feats_b), rel=1e-5)


def test_distance_zero_for_identical_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    assert perceptual_distance(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-6)
    other = [f + torch.randn(f.shape, generator=g) for f in feats]
    assert perceptual_distance(feats, other).item() > 0


def test_distance_ignores_per_position_feature_scale() -> None:
    # unit normalisation along channels: rescaling each feature vector changes nothing
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    scale = torch.rand(2, 1, 3, 3, generator=g) * 10 + 0.1
    assert perceptual_distance([a * scale], [b]).item() == pytest.approx(perceptual_distance([a], [b]).item(),
                                                                         rel=1e-5)


def test_distance_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        perceptual_distance([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="number of feature maps"):
        perceptual_distance([torch.zeros(1, 2, 3, 3)], [])


# --- frozen network, gradients ---------------------------------------------------------------------


def test_gradient_flows_to_reconstruction_only(resnet_loss: PerceptualLoss) -> None:
    x = _images(seed=0).requires_grad_(True)
    x_rec = _images(seed=1).requires_grad_(True)
    loss = resnet_loss(x, x_rec)
    loss.backward()
    assert loss.ndim == 0 and loss.item() > 0
    assert x_rec.grad is not None and torch.isfinite(x_rec.grad).all() and x_rec.grad.abs().sum() > 0
    assert x.grad is None  # target features are computed without gradient
    assert all(not p.requires_grad and p.grad is None for p in resnet_loss.parameters())


def test_parent_train_keeps_net_in_eval_and_bn_stats_fixed(resnet_loss: PerceptualLoss) -> None:
    parent = nn.ModuleDict({"decoder": nn.Conv2d(3, 3, 1), "loss": resnet_loss})
    parent.train()
    assert parent["decoder"].training
    assert not any(m.training for m in resnet_loss.net.modules())
    before = {k: v.clone() for k, v in resnet_loss.state_dict().items() if "running" in k or "batches" in k}
    assert before  # resnet18 has BatchNorm buffers
    resnet_loss(_images(seed=2), _images(seed=3))
    after = resnet_loss.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_loss_under_autocast_is_fp32_and_differentiable(resnet_loss: PerceptualLoss) -> None:
    x_rec = _images(seed=5).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = resnet_loss(_images(seed=4), x_rec)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x_rec.grad is not None and torch.isfinite(x_rec.grad).all()


# --- layer outputs -----------------------------------------------------------------------------------


def test_vit_features_are_patch_grids(vit_tiny: PerceptualNet) -> None:
    feats = vit_tiny(_images(size=(64, 48)))
    assert vit_tiny.layers == [3, 6, 9, 12]
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 3)] * 4


def test_vit_last_block_matches_timm_forward(vit_tiny: PerceptualNet) -> None:
    # checks the input re-normalisation, cls-token drop and token -> grid reshape against timm's own
    # forward, whose block-12 output is captured by a hook (forward_features ends with the final norm)
    x = _images(size=(32, 48))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    captured: list[Tensor] = []
    hook = vit_tiny.backbone.blocks[11].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        vit_tiny.backbone.forward_features(((x + 1) / 2 - mean) / std)
    finally:
        hook.remove()
    expected = captured[0][:, 1:].transpose(1, 2).reshape(2, 192, 2, 3)  # drop cls, tokens are row-major
    torch.testing.assert_close(vit_tiny(x)[3], expected, rtol=1e-5, atol=1e-5)


def test_resnet_features_are_stage_outputs(resnet_loss: PerceptualLoss) -> None:
    feats = resnet_loss.net(_images(size=(64, 64)))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]


def test_vit_rejects_size_not_multiple_of_patch(vit_tiny: PerceptualNet) -> None:
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        vit_tiny(_images(size=(40, 64)))


@pytest.mark.parametrize("layers", [[0], [13], [3, 3]])
def test_bad_layers_raise(layers: list[int]) -> None:
    with pytest.raises(ValueError, match="perceptual layers"):
        PerceptualNet("vit_tiny_patch16", layers, "random")


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError, match="vit_base_patch16.*resnet50.*vgg16"):
        PerceptualNet("alexnet", None, "random")


# --- weights --------------------------------------------------------------------------------------------


def test_random_weights_warn_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="peco_scale.models.perceptual"):
        net = PerceptualNet("resnet_tiny", [2, 4], "random")
    assert "randomly initialised" in caplog.text
    assert net.description == "resnet_tiny stages [2, 4], RANDOM INIT (no weights file)"


def test_filter_state_dict_formats() -> None:
    w = torch.zeros(2)
    moco = {"state_dict": {"module.base_encoder.blocks.0.w": w, "module.base_encoder.head.0.weight": w,
                           "module.momentum_encoder.blocks.0.w": w, "module.predictor.0.weight": w}}
    assert filter_state_dict(moco, "vit_base_patch16") == {"blocks.0.w": w}
    moco_resnet = {"module.base_encoder.conv1.weight": w, "module.base_encoder.fc.0.weight": w}
    assert filter_state_dict(moco_resnet, "resnet50") == {"conv1.weight": w}
    ddp = {"model": {"module.conv1.weight": w, "module.fc.weight": w}}
    assert filter_state_dict(ddp, "resnet_tiny") == {"conv1.weight": w}
    torchvision_vgg = {"features.0.weight": w, "classifier.6.bias": w}
    assert filter_state_dict(torchvision_vgg, "vgg16") == {"0.weight": w}
    assert filter_state_dict({"module": {"pos_embed": w, "head.weight": w}}, "vit_tiny_patch16") == {"pos_embed": w}


@pytest.mark.parametrize("fmt", ["plain", "model", "moco"])
def test_load_vit_tiny_formats(tmp_path: Path, vit_tiny: PerceptualNet, fmt: str) -> None:
    sd = {k: v.clone() for k, v in vit_tiny.backbone.state_dict().items()}
    timm_sd = sd | {"head.weight": torch.randn(1000, 192), "head.bias": torch.randn(1000)}
    ckpt = {"plain": timm_sd, "model": {"model": timm_sd, "epoch": 3}, "moco": _moco_checkpoint(sd, "head")}[fmt]
    path = tmp_path / "vit_tiny.pth"
    torch.save(ckpt, path)
    net = PerceptualNet("vit_tiny_patch16", [3, 12], str(path))
    _assert_loaded(net, sd)
    assert net.description.startswith(f"vit_tiny_patch16 blocks [3, 12], weights {path} (sha256 ")
    x = _images(size=(32, 32))
    torch.testing.assert_close(net(x), [vit_tiny(x)[0], vit_tiny(x)[3]], rtol=0, atol=0)


def test_load_vit_base_moco_v3(tmp_path: Path) -> None:
    sd = _random_state_dict("vit_base_patch16")
    path = tmp_path / "moco_v3_vit_b.pth.tar"
    torch.save(_moco_checkpoint(sd, "head"), path)
    _assert_loaded(PerceptualNet("vit_base_patch16", None, str(path)), sd)


def test_load_resnet50_moco_v3_torchvision_keys(tmp_path: Path) -> None:
    # MoCo v3's ResNet base encoder is a torchvision resnet50 (with an MLP in place of fc)
    with torch.device("meta"):
        tv_keys = torchvision.models.resnet50().state_dict().keys()
    sd = _random_state_dict("resnet50")
    assert set(sd) == {k for k in tv_keys if not k.startswith("fc.")}
    path = tmp_path / "moco_v3_r50.pth.tar"
    torch.save(_moco_checkpoint(sd, "fc"), path)
    _assert_loaded(PerceptualNet("resnet50", None, str(path)), sd)


def test_load_vgg16_torchvision(tmp_path: Path) -> None:
    sd = _random_state_dict("vgg16")
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in sd.items()} | {"classifier.0.weight": torch.randn(4, 4)}, path)
    net = PerceptualNet("vgg16", None, str(path))
    _assert_loaded(net, sd)
    assert [f.shape[1] for f in net(_images(size=(32, 32)))] == [64, 128, 256, 512, 512]


def test_load_safetensors(tmp_path: Path, vit_tiny: PerceptualNet) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = {k: v.clone() for k, v in vit_tiny.backbone.state_dict().items()}
    path = tmp_path / "vit_tiny.safetensors"
    safetensors_torch.save_file(sd, str(path))
    _assert_loaded(PerceptualNet("vit_tiny_patch16", None, str(path)), sd)


def test_missing_file_fails_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never_build() -> nn.Module:
        raise AssertionError("the network must not be built when the weights file is missing")

    spec = dataclasses.replace(PERCEPTUAL_ARCHS["vit_base_patch16"], build=never_build)
    monkeypatch.setitem(PERCEPTUAL_ARCHS, "vit_base_patch16", spec)
    path = tmp_path / "nope.pth"
    with pytest.raises(PerceptualWeightsError, match=f"'{path}' not found.*perceptual.weights=random"):
        PerceptualNet("vit_base_patch16", None, str(path))


def test_wrong_arch_weights_raise(tmp_path: Path, resnet_loss: PerceptualLoss) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet_loss.net.backbone.state_dict(), path)
    with pytest.raises(PerceptualWeightsError, match=f"{path} do not match vit_tiny_patch16: missing 150 keys "
                                                     r"\(cls_token.*unexpected"):
        PerceptualNet("vit_tiny_patch16", None, str(path))


def test_shape_mismatch_raises(tmp_path: Path, vit_tiny: PerceptualNet) -> None:
    sd = vit_tiny.backbone.state_dict() | {"pos_embed": torch.zeros(1, 577, 192)}  # a 384-px checkpoint
    path = tmp_path / "vit_tiny_384.pth"
    torch.save(sd, path)
    with pytest.raises(PerceptualWeightsError, match=r"1 shape mismatches .*pos_embed \[1, 577, 192\] vs "
                                                     r"\[1, 197, 192\]"):
        PerceptualNet("vit_tiny_patch16", None, str(path))


def test_unreadable_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsError, match=f"could not read perceptual weights '{path}'"):
        PerceptualNet("resnet_tiny", None, str(path))
