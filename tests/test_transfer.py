"""Stage-3 building blocks: layer decay, position-embedding resizing, weight loading, EMA (no DeepSpeed)."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from peco_scale.config import ConfigError
from peco_scale.engine.ema import ShardedEMA
from peco_scale.engine.weights import load_pretrained
from peco_scale.models.transfer import adapt_state_dict, build_classifier, layer_decay_groups, scale_residual_stream
from peco_scale.models.vit import VIT_PRESETS, MaskedViT, export_timm_state_dict, resize_pos_embed, timm_spec
from peco_scale.tools.export import FORMAT


def test_layer_decay_groups_cover_every_parameter_once_with_the_beit_scale():
    model = build_classifier("vit_pico_patch16", 64, 10, drop_path=0.0, layer_scale=0.1)
    decay = 0.65
    groups = layer_decay_groups(model, 0.05, decay)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == sum(1 for _ in model.parameters())
    depth = len(model.blocks)
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            # independent rule, written from BEiT's description: embeddings are layer 0, block i is
            # layer i + 1, everything after the blocks is layer depth + 1
            parts = name.split(".")
            if parts[0] == "blocks":
                layer = int(parts[1]) + 1
            elif parts[0] in ("cls_token", "pos_embed", "patch_embed"):
                layer = 0
            else:
                assert parts[0] in ("norm", "fc_norm", "head"), name
                layer = depth + 1
            assert math.isclose(g["lr_scale"], decay ** (depth + 1 - layer), rel_tol=1e-12), name
            no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_wd else 0.05), name
    head = next(g for g in groups if "head.weight" in g["names"])
    assert head["lr_scale"] == 1.0
    emb = next(g for g in groups if "patch_embed.proj.weight" in g["names"])
    assert math.isclose(emb["lr_scale"], decay ** (depth + 1))


def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _resize_1d_matrix(n_in, n_out):
    """PIL's antialiased bicubic resampling (a = -0.5; the window widened by the scale when
    shrinking, clipped at the borders and renormalised), written from PIL's precompute_coeffs: [n_out, n_in]."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.array([_cubic((j - center + 0.5) / filterscale) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


def trained_like(layer_scale: float | None) -> torch.nn.Module:
    """A classifier whose parameters all have trained-like sizes: a residual stream of rms about 1
    (trained MAE/PeCo ones are 10 or more; a fresh class token is ~1e-6, where LayerNorm's eps, not
    the token, would set the scale)."""
    torch.manual_seed(0)
    model = build_classifier("vit_pico_patch16", 32, 5, drop_path=0.0, layer_scale=layer_scale).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.05))
        model.cls_token.normal_()
        model.pos_embed.normal_()
    return model


@pytest.mark.parametrize("layer_scale", [0.1, None])
def test_stream_scale_multiplies_every_block_output_and_keeps_the_logits(layer_scale):
    model, factor = trained_like(layer_scale), 0.08
    x = torch.randn(3, 3, 32, 32)

    def stream(m):  # every block's output, as the dense necks read them
        out, h = [], m._pos_embed(m.patch_embed(x))
        for block in m.blocks:
            h = block(h)
            out.append(h)
        return out

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref_stream, ref_logits = stream(model), model(x)
        changed = scale_residual_stream(model, factor)
        new_stream, new_logits = stream(model), model(x)
    for ref, new in zip(ref_stream, new_stream):
        assert (new / factor - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (new_logits - ref_logits).abs().max() <= 1e-3 * ref_logits.abs().max()
    # what moved is exactly the embeddings and what each branch writes, each by the factor
    branch = ("ls1.gamma", "ls2.gamma") if layer_scale else ("attn.proj.weight", "attn.proj.bias",
                                                             "mlp.fc2.weight", "mlp.fc2.bias")
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"}
    expected |= {f"blocks.{i}.{b}" for i in range(len(model.blocks)) for b in branch}
    assert set(changed) == expected
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k] * factor if k in expected else before[k]), k
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="must be positive and finite"):
            scale_residual_stream(model, bad)


def test_transfer_stage_scales_loaded_weights_only():
    from types import SimpleNamespace

    from peco_scale.train.transfer import TransferStage

    source = trained_like(0.1)
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    for scale, weights in ((0.5, sd), (1.0, sd), (0.5, {})):
        torch.manual_seed(1)
        vit, info = build_classifier("vit_pico_patch16", 32, 5, drop_path=0.0, layer_scale=0.1), {}
        fresh = vit.pos_embed.detach().clone()
        stage = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(init="x", stream_scale=scale)))
        TransferStage.load_vit(stage, vit, weights, info)
        want = sd["pos_embed"] * scale if weights else fresh  # random init is left as built
        assert torch.equal(vit.pos_embed.detach(), want)
        assert torch.equal(vit.blocks[0].attn.qkv.weight.detach(),
                           sd["blocks.0.attn.qkv.weight"] if weights else vit.blocks[0].attn.qkv.weight.detach())
        assert ("stream_scale" in info) == (bool(weights) and scale != 1)


@pytest.mark.parametrize("old,new", [(4, 7), (14, 32), (32, 14), (4, 4)])
def test_pos_embed_resize_matches_an_independent_bicubic(old, new):
    """Fine-tuning at 448 resizes 14x14 (or 16x16) grids bicubically, antialiased like PIL (timm's resampler)."""
    torch.manual_seed(0)
    d = 6
    pe = torch.randn(1, 1 + old * old, d, dtype=torch.float64)
    got = resize_pos_embed(pe.float(), (new, new)).double()
    grid = pe[0, 1:].reshape(old, old, d).numpy()
    r = _resize_1d_matrix(old, new)
    ref = np.einsum("ij,jkd,lk->ild", r, grid, r).reshape(new * new, d)
    assert torch.equal(got[0, :1], pe[0, :1].float().double())  # the class token is untouched
    np.testing.assert_allclose(got[0, 1:].numpy(), ref, atol=1e-5)


def _export_file(path, name="vit_pico_patch16", img_size=64, seed=0):
    torch.manual_seed(seed)
    backbone = MaskedViT(VIT_PRESETS[name], img_size, drop_path=0.0)
    timm_name, kwargs = timm_spec(VIT_PRESETS[name], img_size)
    import json

    save_file(export_timm_state_dict(backbone), str(path), metadata={
        "format": FORMAT, "timm_name": timm_name, "timm_kwargs": json.dumps(kwargs), "preset": name, "step": "0"})
    return backbone


def test_pretrained_export_loads_and_resizes_into_the_classifier(tmp_path):
    backbone = _export_file(tmp_path / "b.safetensors")
    sd, info = load_pretrained(tmp_path / "b.safetensors")
    assert info["kind"] == "export" and info["preset"] == "vit_pico_patch16"
    model = build_classifier("vit_pico_patch16", 96, 7, drop_path=0.0)  # 6x6 grid from a 4x4 one
    weights = adapt_state_dict(sd, model)
    assert not any(k.startswith(("head.", "norm.", "fc_norm.")) or k == "mask_token" for k in weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and not unexpected
    assert model.pos_embed.shape == (1, 37, 128)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(backbone.pos_embed.detach(), (6, 6)))
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, backbone.blocks[1].mlp.fc1.weight)


def test_timm_checkpoint_files_nested_and_plain(tmp_path):
    backbone = _export_file(tmp_path / "b.safetensors")
    sd = export_timm_state_dict(backbone)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    for f in ("ckpt.pth", "ddp.pth"):
        got, info = load_pretrained(tmp_path / f)
        assert info["kind"] == "timm" and got.keys() == sd.keys()
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ConfigError, match="no tensor state dict"):
        load_pretrained(tmp_path / "empty.pth")
    with pytest.raises(ConfigError, match="do not exist"):
        load_pretrained(tmp_path / "nope.pth")


def test_architecture_mismatch_is_one_line_listing_keys(tmp_path):
    _export_file(tmp_path / "pico.safetensors")
    sd, _ = load_pretrained(tmp_path / "pico.safetensors")
    model = build_classifier("vit_tiny_patch16", 64, 10, drop_path=0.0)  # 12 blocks of width 192
    with pytest.raises(ConfigError) as e:
        adapt_state_dict(sd, model, source="model.init 'pico.safetensors'")
    msg = str(e.value)
    assert "\n" not in msg and "96 missing (blocks." in msg and "52 shape mismatch (blocks.0.attn.proj.bias(128,)->(192,)" in msg and "--model" in msg, msg


@pytest.mark.parametrize("marker", ['{"step": 2, "files": {}}', "2\n"])  # this version's marker, an older one
@pytest.mark.parametrize("given", ["step", "run"])
def test_export_of_a_folder_with_only_a_completion_marker_is_one_line(marker, given, tmp_path, capsys):
    from peco_scale.tools.export import main

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(marker)
    assert main([str(step if given == "step" else tmp_path / "run"), "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f"'{step}'" in lines[0] and "missing state.json and the 'model' engine folder" in lines[0], err
    assert "only a COMPLETE marker" in lines[0], err
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(ConfigError, match="missing state.json"):  # model.init reads folders the same way
        load_pretrained(step)


def test_ema_matches_the_formula_and_swaps_back():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = ShardedEMA(net, 0.9)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        ema.update()
        for n, p in net.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach().double()
    full = ema.full_state_dict()
    for n in ref:
        torch.testing.assert_close(full[n].double(), ref[n], atol=1e-6, rtol=0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped():
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), full[n])
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n])
        assert not torch.allclose(p.detach(), full[n])  # the EMA really lags the weights
    state = ema.state_dict()
    other = ShardedEMA(net, 0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
