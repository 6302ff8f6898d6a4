"""FLOP and memory planner: analytic counts against real measurements and docs/method.md."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from peco_scale.config import ConfigError
from peco_scale.models.vit import VIT_PRESETS, MaskedViT
from peco_scale.tools.plan import (GB, activation_breakdown, activation_bytes_per_image, count_forward_flops,
                                   head_flops, main, max_micro_batch, mim_train_flops, model_state_bytes, param_numels,
                                   plan, vit_forward_flops)


def _mask(model: MaskedViT, batch: int) -> torch.Tensor:
    mask = torch.zeros(batch, model.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    return mask


def saved_bytes(fn, *inputs, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn(*inputs)``.

    Tensors sharing a storage (q/k/v views of the qkv output, a reshape of the SDPA output)
    count once, at the storage's size; storages of ``exclude`` (parameters) not at all.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


# ----------------------------------------------------------------------------- FLOPs

@pytest.fixture(scope="module")
def tiny() -> MaskedViT:
    """vit_tiny_patch16 at 112 (49 patches), shared: building it takes a second or two."""
    torch.manual_seed(0)
    return MaskedViT(VIT_PRESETS["vit_tiny_patch16"], 112)


@pytest.mark.parametrize("name", ["vit_pico_patch16", "vit_tiny_patch16"])
def test_forward_flops_match_flop_counter(name, tiny):
    model = tiny.eval() if name == "vit_tiny_patch16" else MaskedViT(VIT_PRESETS[name], 64).eval()
    size = model.patch_embed.img_size[0]
    measured = count_forward_flops(model.forward_masked, torch.randn(1, 3, size, size), _mask(model, 1))
    assert measured == pytest.approx(vit_forward_flops(VIT_PRESETS[name], size), rel=0.01)


@pytest.mark.parametrize("name,size,gmacs,train_gflop", [
    ("vit_large_patch16", 224, 61.6, 369), ("vit_large_patch16", 448, 268.0, 1608),
    ("vit_huge_patch14", 224, 167.3, 1004), ("vit_huge_patch14", 448, 731.7, 4390),
])
def test_forward_flops_reproduce_peco_table(name, size, gmacs, train_gflop):
    flops = vit_forward_flops(VIT_PRESETS[name], size)
    assert flops / 2e9 == pytest.approx(gmacs, abs=0.06)
    assert 3 * flops / 1e9 == pytest.approx(train_gflop, rel=0.005)


@pytest.mark.parametrize("name,size", [("vit_tiny_patch16", 224), ("vit_large_patch16", 224),
                                       ("vit_huge_patch14", 448)])
def test_flop_counter_on_meta_device_matches(name, size):
    with torch.device("meta"):
        model = MaskedViT(VIT_PRESETS[name], size)
        x = torch.empty(1, 3, size, size)
    measured = count_forward_flops(model.forward_masked, x, None)
    assert measured == pytest.approx(vit_forward_flops(VIT_PRESETS[name], size), rel=0.005)


def test_mim_train_flops_conventions():
    preset = VIT_PRESETS["vit_huge_patch14"]
    backbone = vit_forward_flops(preset, 224)
    head = head_flops(1280, 8192, 98)
    assert head == 2 * 98 * 1280 * 8192
    plain = mim_train_flops(preset, 224, num_masked=98)
    ckpt = mim_train_flops(preset, 224, num_masked=98, checkpointing=True, tokenizer_forward_flops=1e9)
    assert plain["model"] == pytest.approx(3 * (backbone + head))
    assert plain["hardware"] == plain["model"]
    assert ckpt["model"] == plain["model"]  # recomputation is not model FLOPs
    # the blocks (not the patch embedding) run once more: just under one backbone forward
    assert 0.99 * backbone < ckpt["hardware"] - ckpt["model"] < backbone
    assert ckpt["tokenizer"] == 1e9 and ckpt["total"] == ckpt["hardware"] + 1e9
    assert mim_train_flops(preset, 224)["head_forward"] == head_flops(1280, 8192, 98)  # default: 75/196


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("name,size", [("vit_pico_patch16", 64), ("vit_large_patch16", 448),
                                       ("vit_huge_patch14", 448)])
def test_param_count_matches_meta_model(name, size):
    with torch.device("meta"):
        model = MaskedViT(VIT_PRESETS[name], size)
    assert param_numels(VIT_PRESETS[name], size) == {n: p.numel() for n, p in model.named_parameters()}
    p = plan(name, size, 8, 80)["params"]
    assert p["backbone"] == sum(q.numel() for q in model.parameters())
    assert p["total"] == p["backbone"] + VIT_PRESETS[name].embed_dim * 8192 + 8192


def test_model_state_16_bytes_per_param_and_zero3_shrinks():
    # docs/method.md: model state ViT-L ~4.9 GB, ViT-H ~10.1 GB (16 B/param, backbone)
    for name, gb in [("vit_large_patch16", 4.9), ("vit_huge_patch14", 10.1)]:
        n = plan(name, 224, 1, 80)["params"]["backbone"]
        assert model_state_bytes(n, 1, 1)["total"] / GB == pytest.approx(gb, rel=0.02)
    one = plan("vit_huge_patch14", 448, 1, 80)["model_state"]
    many = plan("vit_huge_patch14", 448, 64, 80)["model_state"]
    partitioned = lambda s: s["params"] + s["grads"] + s["optimizer"]  # noqa: E731
    assert partitioned(many[3]) == pytest.approx(partitioned(one[3]) / 64)
    assert many[3]["working"] == one[3]["working"] > 0  # gathered blocks do not shrink
    assert many[1]["total"] > many[2]["total"] > many[3]["total"]
    assert one[1]["total"] == pytest.approx(one[2]["total"])  # nothing to partition over at 1 GPU


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("name,attention", [("vit_tiny_patch16", "flash"), ("vit_pico_patch16", "flash"),
                                            ("vit_pico_patch16", "math")])
def test_activation_model_matches_saved_tensors(name, attention, tiny):
    """fp32 on CPU: SDPA takes the CPU flash kernel, which saves what the CUDA flash/efficient
    kernels save (out + logsumexp, q/k/v as views of the qkv output); timm's eager path
    (fused_attn off) saves the T^2 softmax output - the ``math`` formula."""
    model = tiny.train() if name == "vit_tiny_patch16" else MaskedViT(VIT_PRESETS[name], 64).train()
    size = model.patch_embed.img_size[0]
    for block in model.blocks:
        block.attn.fused_attn = attention == "flash"
    batch = 2
    measured = saved_bytes(model.forward_masked, torch.randn(batch, 3, size, size), _mask(model, batch),
                           exclude=list(model.parameters()))
    expected = batch * activation_bytes_per_image(VIT_PRESETS[name], size, checkpointing=False, dtype_bytes=4,
                                                  attention=attention)
    # residual: drop-path keep masks (4 bytes per image and block) are not modelled
    assert measured == pytest.approx(expected, rel=0.01)


def test_activation_model_bf16():
    torch.manual_seed(0)
    model = MaskedViT(VIT_PRESETS["vit_pico_patch16"], 64).train().to(torch.bfloat16)
    measured = saved_bytes(model.forward_masked, torch.randn(2, 3, 64, 64, dtype=torch.bfloat16), _mask(model, 2),
                           exclude=list(model.parameters()))
    expected = 2 * activation_bytes_per_image(VIT_PRESETS["vit_pico_patch16"], 64, checkpointing=False)
    # residual: CPU keeps LayerNorm mean/rstd in bf16 (the model: fp32, as CUDA does), ~1%
    assert measured == pytest.approx(expected, rel=0.03)


def test_checkpointed_activations_match_saved_tensors(tiny):
    """With checkpointing the forward keeps every block's input; backward adds one block's
    activations while it is recomputed. Reentrant checkpointing saves its inputs through
    save_for_backward, so the hook sees them (the non-reentrant default keeps them elsewhere)."""
    import timm.layers.config as timm_cfg

    preset = VIT_PRESETS["vit_tiny_patch16"]
    model = tiny.train()
    x = torch.randn(2, 3, 112, 112)
    before = timm_cfg.use_reentrant_ckpt()
    timm_cfg.set_reentrant_ckpt(True)
    model.set_grad_checkpointing(True)
    try:
        stored = saved_bytes(model.forward_masked, x, _mask(model, 2), exclude=list(model.parameters()))
    finally:
        timm_cfg.set_reentrant_ckpt(before)
        model.set_grad_checkpointing(False)
    one_block = saved_bytes(model.blocks[3], torch.randn(2, 50, 192, requires_grad=True),
                            exclude=list(model.parameters()))
    parts = activation_breakdown(preset, 112, dtype_bytes=4)
    assert one_block == pytest.approx(2 * parts["block"], rel=0.01)
    total = activation_bytes_per_image(preset, 112, checkpointing=True, dtype_bytes=4)
    assert stored == pytest.approx(2 * (total - parts["block"] + parts["block_input"]), rel=0.01)
    assert total < activation_bytes_per_image(preset, 112, checkpointing=False, dtype_bytes=4) / 4


# ----------------------------------------------------------------------------- plan

def test_checkpointing_and_memory_set_the_micro_batch():
    p = plan("vit_huge_patch14_448", None, 64, 80)
    assert p["img_size"] == 448 and p["num_masked"] == round(1024 * 75 / 196)
    acts = p["activations"]
    assert acts[True]["backbone"] < acts[False]["backbone"] / 5
    for stage in (1, 2, 3):
        assert p["max_micro_batch"][stage][True] > p["max_micro_batch"][stage][False] > 0
    sizes = [max_micro_batch("vit_large_patch16", 448, 8, mem, zero_stage=2, checkpointing=False)
             for mem in (4, 8, 16, 24, 40, 80, 141)]
    assert sizes == sorted(sizes) and sizes[0] == 0 and sizes[-1] > sizes[-2]
    # the reported batch fits, one more does not
    best = p["max_micro_batch"][3][False]
    assert plan("vit_huge_patch14", 448, 64, 80, micro_batch=best)["at_micro_batch"][3][False] <= 80 * GB
    assert plan("vit_huge_patch14", 448, 64, 80, micro_batch=best + 1)["at_micro_batch"][3][False] > 80 * GB
    # a fused head drops the [M, 8192] fp32 logits and their grad
    fused = plan("vit_huge_patch14", 448, 64, 80, head_impl="fused")["activations"][True]
    assert acts[True]["head"] - fused["head"] == 392 * 8192 * 8


def test_cli_prints_the_table():
    res = subprocess.run([sys.executable, "-m", "peco_scale.tools.plan", "--model", "vit_huge_patch14", "--img_size",
                          "448", "--gpus", "64", "--gpu_mem_gb", "80", "--micro_batch", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    for text in ("ZeRO-1", "ZeRO-2", "ZeRO-3", "Largest micro-batch", "ckpt", "1025 tokens", "At micro-batch 16"):
        assert text in res.stdout


@pytest.mark.parametrize("argv,words", [
    (["--model", "vit_gigantic"], "unknown model"),
    (["--model", "vit_huge_patch14", "--img_size", "450"], "patch size 14"),
    (["--model", "vit_huge_patch14", "--img_size", "0"], "img_size=0"),
    (["--model", "vit_large_patch16", "--gpus", "0"], "gpus=0"),
    (["--model", "vit_large_patch16", "--gpu_mem_gb", "0"], "gpu_mem_gb=0"),
    (["--model", "vit_large_patch16", "--gpu_mem_gb", "-8"], "gpu_mem_gb=-8"),
    (["--model", "vit_large_patch16", "--mask_ratio", "1.5"], "mask_ratio"),
    (["--model", "vit_large_patch16", "--gpus", "many"], "--gpus"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, words, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1 and words in err


def test_bad_input_from_the_command_line():
    res = subprocess.run([sys.executable, "-m", "peco_scale.tools.plan", "--model", "vit_huge_patch14", "--img_size",
                          "450"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and res.stderr.startswith("error:") and res.stdout == ""
    with pytest.raises(ConfigError):
        plan("vit_huge_patch14", 448, 1, 80, micro_batch=0)
