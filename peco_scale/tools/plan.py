"""FLOPs and a per-GPU memory plan for masked-image-modeling pre-training under DeepSpeed ZeRO.

    python -m peco_scale.tools.plan --model vit_huge_patch14 --img_size 448 --gpus 64 --gpu_mem_gb 80

FLOPs: the analytic counts of ``peco_scale.models.cost`` (backbone, MIM head, one training
image), the same ones the trainer's MFU column uses. One multiply-accumulate (MAC) is 2 FLOPs.

Memory: model state (bf16 params + bf16 grads + fp32 master/exp_avg/exp_avg_sq, partitioned
as ZeRO 1/2/3 do), the activations autograd saves per image (with and without timm's
activation checkpointing), the head's logits, and a fixed allowance; from these, the largest
micro-batch that fits for every ZeRO stage x checkpointing. The activation model counts the
tensors each op of timm's ``Block`` saves for backward; a test measures the same with
``torch.autograd.graph.saved_tensors_hooks`` and agrees to the byte on the CPU.

GB here means 1e9 bytes (as docs/method.md: "ViT-H ~10.1 GB" of model state). An "80 GB" H100 has
about 85e9 bytes (79.2 GiB), so ``--gpu_mem_gb 80`` is slightly conservative.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ..config import ConfigError
from ..data.masking import default_num_masked
from ..models.cost import (count_forward_flops, grid, head_flops, hidden_dim, mim_train_flops,  # noqa: F401
                           vit_forward_flops)
from ..models.vit import ViTPreset, parse_model_name

GB = 1e9
MB = 1e6
DEFAULT_RESERVE_GB = 3.5
# bf16 mixed precision as DeepSpeed runs it: bf16 working params and grads, fp32 master
# weights and both Adam moments (16 bytes/param in all)
BYTES_PARAM, BYTES_GRAD, BYTES_OPTIM = 2, 2, 12
STATS_BYTES = 4  # LayerNorm mean/rstd and the attention logsumexp are fp32 on CUDA
HEAD_IMPLS = ("torch", "fused")
ATTENTION_IMPLS = ("flash", "math")


# ----------------------------------------------------------------------------- parameters

def param_numels(preset: ViTPreset, img_size: int) -> dict[str, int]:
    """numel of every parameter of ``MaskedViT(preset, img_size)``, by timm's names."""
    n, t = grid(preset, img_size)
    d, h, p = preset.embed_dim, hidden_dim(preset), preset.patch_size
    out = {"cls_token": d, "pos_embed": t * d, "mask_token": d,
           "patch_embed.proj.weight": d * 3 * p * p, "patch_embed.proj.bias": d}
    block = {"norm1.weight": d, "norm1.bias": d, "attn.qkv.weight": 3 * d * d, "attn.qkv.bias": 3 * d,
             "attn.proj.weight": d * d, "attn.proj.bias": d, "norm2.weight": d, "norm2.bias": d,
             "mlp.fc1.weight": h * d, "mlp.fc1.bias": h, "mlp.fc2.weight": d * h, "mlp.fc2.bias": d}
    if preset.layer_scale > 0:
        block |= {"ls1.gamma": d, "ls2.gamma": d}
    for i in range(preset.depth):
        out |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    out |= {"norm.weight": d, "norm.bias": d}
    return out


def head_params(embed_dim: int, vocab: int) -> int:
    return embed_dim * vocab + vocab  # nn.Linear(D, V) with bias


# ----------------------------------------------------------------------------- activations

def activation_breakdown(preset: ViTPreset, img_size: int, *, dtype_bytes: int = 2,
                         attention: str = "flash") -> dict[str, float]:
    """Bytes autograd saves for backward per image, by part (see ``activation_bytes_per_image``).

    Per timm ``Block`` (T tokens, D width, H heads, hidden r*D), elements of the compute dtype:
      norm1 input (the block input) T*D, qkv input T*D, qkv output 3*T*D (q, k, v are views of
      it that SDPA saves), SDPA output T*D (proj's input is a view of it: the flash kernels
      write [B, T, H, hd] so transpose+reshape copies nothing), proj output T*D (saved by layer
      scale's multiply, since gamma needs a grad), norm2 input T*D, fc1 input T*D, GELU input
      r*T*D, fc2 input r*T*D, fc2 output T*D (layer scale) = (10 + 2r) * T*D;
      plus fp32 LayerNorm mean/rstd (2 x 2T) and, for flash, the logsumexp H*T.
    ``attention="math"`` (timm with fused_attn off): no qkv output, SDPA output or logsumexp,
      but q*scale, k and v copies (3 T*D), attn@v output copied by the reshape (T*D) and the
      softmax output H*T^2 (the N^2 matrix): (10 + 2r) * T*D + H*T^2.
    Outside the blocks: the image (conv input, 3*H*W), the mask weights w and 1-w (2N), and
    the final norm's input T*D + stats. Drop-path keep masks (a scalar per image and block)
    and parameters (saved by every op that uses them, but not activations) are not counted.
    """
    if attention not in ATTENTION_IMPLS:
        raise ConfigError(f"attention='{attention}' is not one of {', '.join(ATTENTION_IMPLS)}")
    n, t = grid(preset, img_size)
    d, r, heads, b = preset.embed_dim, preset.mlp_ratio, preset.num_heads, dtype_bytes
    td = t * d * b
    ln_stats = 2 * t * STATS_BYTES
    if attention == "flash":
        attn = heads * t * STATS_BYTES
    else:
        attn = heads * t * t * b
    block = (10 + 2 * r) * td + 2 * ln_stats + attn
    return {"embed": 3 * img_size * img_size * b + 2 * n * b, "block": block, "block_input": td,
            "final_norm": td + ln_stats, "depth": preset.depth}


def activation_bytes_per_image(preset: ViTPreset, img_size: int, *, checkpointing: bool, dtype_bytes: int = 2,
                               attention: str = "flash") -> float:
    """Peak bytes of saved activations per image for training (default bf16, flash/efficient SDPA).

    Without checkpointing: every block's saved tensors (``activation_breakdown``) + embedding
    + final norm. With timm's checkpointing (each block a segment): the input of every block,
    plus one block's full activations while it is recomputed in backward (its input, already
    counted, not twice). Gradient buffers in flight are not included (see
    ``backward_workspace_bytes_per_image``); nor is the MIM head (``head_activation_bytes_per_image``).
    """
    a = activation_breakdown(preset, img_size, dtype_bytes=dtype_bytes, attention=attention)
    if checkpointing:
        blocks = a["depth"] * a["block_input"] + a["block"] - a["block_input"]
    else:
        blocks = a["depth"] * a["block"]
    return a["embed"] + blocks + a["final_norm"]


def head_activation_bytes_per_image(embed_dim: int, vocab: int, num_masked: int, *, head_impl: str = "torch",
                                    dtype_bytes: int = 2) -> float:
    """The MIM head per image: its input [M, D] (saved by the linear) and, for the reference
    torch head, the [M, V] fp32 logits kept for backward plus their grad (8 bytes each; a lower
    bound: a bf16 copy of the logits, if kept, adds 2 more). A fused linear+cross-entropy never
    stores logits (its fixed fp32 dW accumulator, D*V*4 bytes, is within the allowance)."""
    if head_impl not in HEAD_IMPLS:
        raise ConfigError(f"head_impl='{head_impl}' is not one of {', '.join(HEAD_IMPLS)}")
    logits = num_masked * vocab * (4 + 4) if head_impl == "torch" else 0
    return float(num_masked * embed_dim * dtype_bytes + logits)


def backward_workspace_bytes_per_image(preset: ViTPreset, img_size: int, *, dtype_bytes: int = 2) -> float:
    """Gradient buffers alive while one block runs backward (estimate, not measured): the
    grads of fc2's and GELU's inputs (2 r T*D) and of the residual stream in and out (2 T*D)."""
    _, t = grid(preset, img_size)
    return (2 * preset.mlp_ratio + 2) * t * preset.embed_dim * dtype_bytes


# ----------------------------------------------------------------------------- model state

def model_state_bytes(num_params: int, gpus: int, zero_stage: int, *, block_params: int = 0,
                      persistent_params: int = 0, prefetch_blocks: int = 2) -> dict[str, float]:
    """Per-GPU model state under DeepSpeed bf16 + ZeRO ``zero_stage`` (1, 2 or 3).

    ZeRO-1 partitions the fp32 optimizer states (master, exp_avg, exp_avg_sq) over ``gpus``;
    ZeRO-2 also the bf16 grads; ZeRO-3 also the bf16 params. ``working`` is ZeRO-3's gathered
    set: ``prefetch_blocks`` blocks of bf16 params in flight (prefetch) and their bf16 grads
    before the reduce-scatter, plus the params below ``stage3_param_persistence_threshold``
    kept whole in bf16 on every rank.
    """
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"zero_stage={zero_stage} must be 1, 2 or 3")
    p = float(num_params)
    out = {"params": BYTES_PARAM * p / (gpus if zero_stage == 3 else 1),
           "grads": BYTES_GRAD * p / (gpus if zero_stage >= 2 else 1),
           "optimizer": BYTES_OPTIM * p / gpus,
           "working": (prefetch_blocks * block_params * (BYTES_PARAM + BYTES_GRAD)
                       + persistent_params * BYTES_PARAM) if zero_stage == 3 else 0.0}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- plan

def plan(model_name: str, img_size: int | None = None, gpus: int = 1, gpu_mem_gb: float = 80.0, *,
         vocab: int = 8192, mask_ratio: float | None = None, micro_batch: int | None = None,
         head_impl: str = "torch", attention: str = "flash", reserve_gb: float = DEFAULT_RESERVE_GB,
         prefetch_blocks: int = 2, persistence_threshold: float = 1e5) -> dict[str, Any]:
    """Per-GPU memory plan (bytes) and the largest micro-batch for ZeRO 1/2/3 x checkpointing.

    ``model_state[stage]``, ``activations[checkpointing]`` (per image: ``backbone``, ``head``,
    ``backward_workspace``, ``total``), ``max_micro_batch[stage][checkpointing]`` and, with
    ``micro_batch``, ``at_micro_batch[stage][checkpointing]`` (bytes in use). ``img_size=None``
    takes the model name's suffix (``vit_huge_patch14_448``) or 224.
    """
    if img_size is not None and img_size <= 0:  # parse_model_name reads 0 as "not given"
        raise ConfigError(f"img_size={img_size} must be positive (e.g. 224 or 448)")
    name, preset, size = parse_model_name(model_name, img_size)
    n, t = grid(preset, size)
    if gpus < 1:
        raise ConfigError(f"gpus={gpus} must be at least 1")
    if not 0 < gpu_mem_gb < math.inf:
        raise ConfigError(f"gpu_mem_gb={gpu_mem_gb} must be a positive number of GB per GPU (e.g. 80 for an H100)")
    if vocab < 1:
        raise ConfigError(f"vocab={vocab} must be at least 1 (the tokenizer's codebook size, e.g. 8192)")
    if mask_ratio is not None and not 0 < mask_ratio < 1:
        raise ConfigError(f"mask_ratio={mask_ratio} must be in (0, 1), e.g. 0.4, or 'default' (75/196)")
    if micro_batch is not None and micro_batch < 1:
        raise ConfigError(f"micro_batch={micro_batch} must be at least 1")
    if reserve_gb < 0:
        raise ConfigError(f"reserve_gb={reserve_gb} must be >= 0")
    if head_impl not in HEAD_IMPLS:
        raise ConfigError(f"head_impl='{head_impl}' is not one of {', '.join(HEAD_IMPLS)}")

    num_masked = default_num_masked(n) if mask_ratio is None else max(1, round(n * mask_ratio))
    numels = param_numels(preset, size)
    backbone = sum(numels.values())
    head = head_params(preset.embed_dim, vocab)
    block = sum(v for k, v in numels.items() if k.startswith("blocks.0."))
    # DeepSpeed keeps params with numel <= threshold whole on every rank (the head's bias too)
    persistent = sum(v for v in [*numels.values(), vocab] if v <= persistence_threshold)
    params = {"backbone": backbone, "head": head, "total": backbone + head, "per_block": block,
              "persistent": persistent}

    states = {s: model_state_bytes(params["total"], gpus, s, block_params=block, persistent_params=persistent,
                                   prefetch_blocks=prefetch_blocks) for s in (1, 2, 3)}
    head_act = head_activation_bytes_per_image(preset.embed_dim, vocab, num_masked, head_impl=head_impl)
    workspace = backward_workspace_bytes_per_image(preset, size)
    acts = {}
    for ckpt in (False, True):
        bb = activation_bytes_per_image(preset, size, checkpointing=ckpt, attention=attention)
        acts[ckpt] = {"backbone": bb, "head": head_act, "backward_workspace": workspace,
                      "total": bb + head_act + workspace}
    mem, reserve = gpu_mem_gb * GB, reserve_gb * GB
    fits = {s: {c: max(0, math.floor((mem - reserve - states[s]["total"]) / acts[c]["total"])) for c in (False, True)}
            for s in (1, 2, 3)}
    out = {"model": name, "img_size": size, "preset": preset, "patches": n, "tokens": t, "num_masked": num_masked,
           "mask_ratio": num_masked / n, "vocab": vocab, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb,
           "head_impl": head_impl, "attention": attention, "params": params,
           "flops": {c: mim_train_flops(preset, size, vocab=vocab, num_masked=num_masked, checkpointing=c)
                     for c in (False, True)},
           "model_state": states, "activations": acts, "reserve": reserve, "max_micro_batch": fits,
           "micro_batch": micro_batch, "prefetch_blocks": prefetch_blocks}
    if micro_batch is not None:
        out["at_micro_batch"] = {s: {c: reserve + states[s]["total"] + micro_batch * acts[c]["total"]
                                     for c in (False, True)} for s in (1, 2, 3)}
    return out


def max_micro_batch(model_name: str, img_size: int | None, gpus: int, gpu_mem_gb: float, *, zero_stage: int,
                    checkpointing: bool, **opts: Any) -> int:
    """Largest micro-batch per GPU that fits (0: not even one image). ``opts`` as for ``plan``."""
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"zero_stage={zero_stage} must be 1, 2 or 3")
    return plan(model_name, img_size, gpus, gpu_mem_gb, **opts)["max_micro_batch"][zero_stage][bool(checkpointing)]


# ----------------------------------------------------------------------------- printing

def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def format_plan(p: dict[str, Any]) -> str:
    pr, par, acts = p["preset"], p["params"], p["activations"]
    f0, f1 = p["flops"][False], p["flops"][True]
    lines = [
        f"{p['model']} @ {p['img_size']}: patch {pr.patch_size}, {p['patches']} patches + cls = {p['tokens']} tokens, "
        f"width {pr.embed_dim}, depth {pr.depth}, heads {pr.num_heads}",
        f"parameters: backbone {par['backbone'] / 1e6:.1f} M + head {par['head'] / 1e6:.1f} M "
        f"({pr.embed_dim} x {p['vocab']} + bias) = {par['total'] / 1e6:.1f} M",
        f"masked: {p['num_masked']} of {p['patches']} patches per image (ratio {p['mask_ratio']:.3f}); "
        f"vocab {p['vocab']}; head {p['head_impl']}; attention {p['attention']}",
        f"GPUs: {p['gpus']} x {p['gpu_mem_gb']:g} GB (GB = 1e9 bytes)",
        "",
        f"FLOPs per image: backbone forward {f0['backbone_forward'] / 2e9:.1f} GMAC, head forward "
        f"{f0['head_forward'] / 2e9:.1f} GMAC; train {f0['model'] / 1e12:.2f} TFLOP "
        f"(model, for MFU), {f1['hardware'] / 1e12:.2f} TFLOP run with checkpointing",
        "",
        "Model state per GPU, GB (bf16 params 2 + bf16 grads 2 + fp32 master/exp_avg/exp_avg_sq 12 B/param)",
        f"  {'stage':<8}{'params':>9}{'grads':>9}{'optim':>9}{'z3 work':>9}{'total':>9}",
    ]
    for s, st in p["model_state"].items():
        work = _gb(st["working"]) if s == 3 else "-"
        lines.append(f"  ZeRO-{s:<3}{_gb(st['params']):>9}{_gb(st['grads']):>9}{_gb(st['optimizer']):>9}"
                     f"{work:>9}{_gb(st['total']):>9}")
    head_what = (f"[{p['num_masked']}, {p['vocab']}] fp32 logits + grad" if p["head_impl"] == "torch"
                 else "fused: no logits stored")
    lines += [
        f"  z3 work: {p['prefetch_blocks']} blocks of bf16 params + grads in flight "
        f"({par['per_block'] / 1e6:.1f} M params each) + {par['persistent'] / 1e6:.2f} M persistent small params",
        "",
        "Activations per image, MB (bf16, flash SDPA)" + ("" if p["attention"] == "flash" else " [math attention]"),
        f"  {'':<22}{'no ckpt':>10}{'ckpt':>10}",
        f"  {'backbone (saved)':<22}{acts[False]['backbone'] / MB:>10.1f}{acts[True]['backbone'] / MB:>10.1f}",
        f"  {'MIM head':<22}{acts[False]['head'] / MB:>10.1f}{acts[True]['head'] / MB:>10.1f}   {head_what}",
        f"  {'backward workspace':<22}{acts[False]['backward_workspace'] / MB:>10.1f}"
        f"{acts[True]['backward_workspace'] / MB:>10.1f}",
        f"  {'total':<22}{acts[False]['total'] / MB:>10.1f}{acts[True]['total'] / MB:>10.1f}",
        "",
        f"Fixed allowance: {p['reserve'] / GB:g} GB per GPU (CUDA context, cuBLAS/NCCL workspaces, "
        "ZeRO comm buckets, allocator fragmentation)",
        "",
        f"Largest micro-batch per GPU (global batch at {p['gpus']} GPUs)",
        f"  {'stage':<8}{'no ckpt':>16}{'ckpt':>16}",
    ]
    for s, row in p["max_micro_batch"].items():
        cells = [f"{row[c]} ({row[c] * p['gpus']})" if row[c] else "does not fit" for c in (False, True)]
        lines.append(f"  ZeRO-{s:<3}{cells[0]:>16}{cells[1]:>16}")
    if p.get("at_micro_batch"):
        lines += ["", f"At micro-batch {p['micro_batch']}: GB in use per GPU of {p['gpu_mem_gb']:g}",
                  f"  {'stage':<8}{'no ckpt':>16}{'ckpt':>16}"]
        for s, row in p["at_micro_batch"].items():
            cells = [f"{_gb(row[c])}{'' if row[c] <= p['gpu_mem_gb'] * GB else ' OOM'}" for c in (False, True)]
            lines.append(f"  ZeRO-{s:<3}{cells[0]:>16}{cells[1]:>16}")
    lines += ["",
              "Not counted: the frozen tokenizer (token ids precomputed, or add its weights and forward);",
              "the fp32 grad partition cast at the optimizer step (4 B/param/GPUs, after activations are freed).",
              "DeepSpeed's default grad_accum_dtype (bf16) is assumed: fp32 with ZeRO-1 switches to",
              "BF16_Optimizer, which keeps an unpartitioned fp32 grad buffer (+4 B/param)."]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own prints the usage first)
        self.exit(2, f"error: {message}\n")


def _mask_ratio(value: str) -> float | None:
    if value.lower() == "default":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mask ratio {value!r}; use a number in (0, 1) or 'default'") from None


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m peco_scale.tools.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="ViT preset, optionally with a resolution suffix (vit_huge_patch14_448)")
    ap.add_argument("--img_size", type=int, default=None, help="image size (default: the suffix, else 224)")
    ap.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs that ZeRO partitions over")
    ap.add_argument("--gpu_mem_gb", type=float, default=80.0, help="memory per GPU in GB (1e9 bytes)")
    ap.add_argument("--vocab", type=int, default=8192, help="tokenizer codebook size (head classes)")
    ap.add_argument("--mask_ratio", type=_mask_ratio, default=None,
                    help="fraction of masked patches, or 'default' (75/196)")
    ap.add_argument("--micro_batch", type=int, default=None, help="also show memory in use at this micro-batch")
    ap.add_argument("--head_impl", choices=HEAD_IMPLS, default="torch", help="torch: materialised logits; fused: none")
    ap.add_argument("--attention", choices=ATTENTION_IMPLS, default="flash", help="SDPA kernel (math stores T^2)")
    ap.add_argument("--reserve_gb", type=float, default=DEFAULT_RESERVE_GB, help="fixed allowance per GPU in GB")
    args = ap.parse_args(argv)
    try:
        result = plan(args.model, args.img_size, args.gpus, args.gpu_mem_gb, vocab=args.vocab,
                      mask_ratio=args.mask_ratio, micro_batch=args.micro_batch, head_impl=args.head_impl,
                      attention=args.attention, reserve_gb=args.reserve_gb)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
