"""Tokenizer architecture: shapes, gradients, presets, the artifact round trip."""

import pytest
import torch

from peco_scale.config import apply_overrides
from peco_scale.train.tokenizer_config import tokenizer_config
from peco_scale.train.tokenizer_config import TokenizerConfig
from peco_scale.models.artifact import load_tokenizer, read_tokenizer_metadata, save_tokenizer
from peco_scale.models.tokenizer import VQTokenizer


def _tiny(**over) -> VQTokenizer:
    cfg = tokenizer_config(None, {"model.preset": "tiny", **over})
    return VQTokenizer(cfg.model, cfg.quantizer)


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2, 4, 4), 16), ((1, 2, 4, 4), 8)])
def test_shapes_and_downsample(ch_mult, factor):
    model = _tiny(**{"model.ch_mult": ch_mult}).train()
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert model.downsample == factor
    assert out["x_rec"].shape == x.shape
    assert out["indices"].shape == (2, 64 // factor, 48 // factor)
    assert out["indices"].dtype == torch.int64
    assert 0 <= out["indices"].min() and out["indices"].max() < model.quant_cfg.codebook_size


def test_gradients_reach_encoder_and_decoder():
    model = _tiny().train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    ((out["x_rec"] - x) ** 2).mean().add(out["commit_loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reached the encoder
    assert not model.quantizer.codebook.requires_grad


def test_presets_scale_channels():
    n = {}
    for preset in ("default", "lite", "tiny"):
        cfg = tokenizer_config(None, {"model.preset": preset})
        n[preset] = sum(p.numel() for p in VQTokenizer(cfg.model, cfg.quantizer).parameters())
    # half the channels -> about a quarter of the conv weights
    assert 0.2 < n["lite"] / n["default"] < 0.3
    assert n["tiny"] < n["lite"]
    default = TokenizerConfig()
    assert default.quantizer.codebook_size == 8192 and default.model.ch_mult == (1, 2, 4, 8, 16)


def test_artifact_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _tiny().train()
    model(torch.randn(4, 3, 32, 32))  # k-means init + one EMA step change the buffers
    path = save_tokenizer(model, tmp_path / "tok.safetensors", extra={"step": 1})
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file
    loaded = load_tokenizer(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    torch.testing.assert_close(loaded.decode_indices(loaded.tokenize(x)), model(x)["x_rec"])
    meta = read_tokenizer_metadata(path)
    assert meta["model"]["preset"] == "tiny" and meta["extra"]["step"] == 1


def test_artifact_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tokenizer(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a peco-scale tokenizer"):
        load_tokenizer(tmp_path / "other.safetensors")


def test_config_layering(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: tiny\nquantizer:\n  dim: 8\noptim:\n  lr: 0.1\n")
    from peco_scale.config import load_file

    cfg = tokenizer_config(load_file(f), {"optim.lr": 0.5, "optim.betas": [0.9, 0.99]})
    assert cfg.model.base_channels == 16  # from the preset named in the file
    assert cfg.quantizer.dim == 8  # file beats preset
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.99)  # command line beats file
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(TokenizerConfig(), {"optim.lrr": 1}, "test")
    with pytest.raises(ValueError, match="train.max_steps='x' must be an integer"):
        apply_overrides(TokenizerConfig(), {"train.max_steps": "x"}, "test")
