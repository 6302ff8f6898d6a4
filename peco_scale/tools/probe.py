"""Linear probes: a frozen stage-2 ViT backbone, or a stage-1 tokenizer's codewords.

    python -m peco_scale.tools.probe linear --backbone runs/pretrain/backbone.safetensors \\
        --data /path/to/imagenet/train --val /path/to/imagenet/val [--out linear.json]
    python -m peco_scale.tools.probe codeword --tokenizer runs/tokenizer/tokenizer.safetensors \\
        --data /path/to/imagenet/train --val /path/to/imagenet/val [--img_size 224] [--out codeword.json]

``linear`` is the MAE/BEiT linear probe of a frozen backbone. It reads the file written by
``python -m peco_scale.tools.export RUN`` (export a stage-2 run first), loads it into timm with
strict=True and uses the mean of the final (normed) patch tokens as the feature: MIM never
trains the class token. Images are taken at the backbone's own img_size.

``codeword`` measures how semantic a codebook is (PeCo, Table 4): the tokenizer maps each
image to a grid of token ids, and the feature is the mean over that h x w grid of the ids'
codebook vectors (so D = the code dimension). ``--img_size`` must be a multiple of the
tokenizer's downsample factor.

Design:

* Features are extracted once, deterministically, with the evaluation transform fine-tuning
  uses (``peco_scale.data.eval.eval_transform``, timm/BEiT style): the shorter side resized to
  round(size / 0.875) (bicubic; 256 for 224), a centre crop of ``size``, then ImageNet mean/std
  for the ViT or [-1, 1] for the tokenizer (as it was trained). They are cached in host memory
  as fp32 (N x D x 4 bytes: 3.9 GB for ImageNet-1k train at D = 768). Unreadable images are
  skipped and counted, never substituted.
* The classifier is MAE's linprobe head, ``BatchNorm1d(D, affine=False)`` + ``Linear(D, C)``:
  the BN standardises each feature channel (running statistics at evaluation) and has no
  parameters, so the probe stays linear in the features.
* It is trained with mini-batch AdamW (weight decay 0, as MAE's probe) and a per-step cosine
  learning rate from ``--lr`` to 0, not with MAE's LARS or plain SGD: LARS exists for MAE's
  16k-image batches, and SGD's lr has to be retuned with the feature width and batch size,
  while Adam's per-parameter normalised steps keep one default lr usable. The defaults (lr
  1e-3, batch 256, 100 epochs) are sized for ImageNet-scale sets; a set of a few hundred images
  gets only a few hundred steps from them and needs a smaller ``--batch_size`` or a larger
  ``--lr`` (a low ``train_top1`` is the sign). Shuffling and initialisation come from a
  generator seeded by ``--seed`` (nothing touches the global RNG), so a CPU run is exactly
  reproducible.
* Accuracies are fractions in [0, 1]; ``top5`` is reported when there are at least 5 classes.

Exit status 0 on success; bad input prints one ``error:`` line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data import DataError, ImageListDataset, collate_readable, scan_image_folder
from ..data.eval import eval_transform
from ..models.artifact import load_tokenizer
from ..models.tokenizer import VQTokenizer
from .export import create_timm_model

TOKENIZER_MEAN = TOKENIZER_STD = (0.5, 0.5, 0.5)  # [0, 1] -> [-1, 1]
DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_BATCH = 100, 1e-3, 256

Samples = list[tuple[str, int]]
Features = tuple[torch.Tensor, torch.Tensor, list[str], int]  # feats [N, D], labels [N], classes, skipped
# (batch of images -> features, the PIL transform that makes its images)
Encoder = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[Image.Image], torch.Tensor]]


# ----------------------------------------------------------------------------- features


def _extract(encoder: Encoder, samples: Samples, root: str | Path, *, batch_size: int, device: str | torch.device,
             workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fp32 features [N, D] on the CPU, int64 labels [N], skipped) of the readable samples, in order."""
    encode, transform = encoder
    device = torch.device(device)
    loader = DataLoader(ImageListDataset(samples, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_readable, pin_memory=device.type == "cuda")
    feats, labels, skipped = [], [], 0
    with torch.no_grad():
        for x, y, _, bad in loader:
            skipped += bad
            if x is not None:
                feats.append(encode(x.to(device)).float().cpu())
                labels.append(y)
    if not feats:
        raise DataError(f"none of the {len(samples)} images under '{root}' could be decoded; check the files "
                        f"(e.g. open one with PIL) or point to another folder")
    return torch.cat(feats), torch.cat(labels), skipped


def _vit_encoder(model: nn.Module, device: str | torch.device) -> Encoder:
    """Mean of the final normed patch tokens, at the backbone's own (square) img_size."""
    model.eval().to(device)
    size = int(model.patch_embed.img_size[0])

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)[:, model.num_prefix_tokens:].mean(1)

    return encode, eval_transform(size)


def _check_img_size(img_size: int, factor: int) -> None:
    if img_size <= 0 or img_size % factor:
        raise ConfigError(f"--img_size {img_size} is not a positive multiple of the tokenizer's downsample factor "
                          f"{factor}; use {max(factor, round(img_size / factor) * factor)}")


def _codeword_encoder(tokenizer: VQTokenizer, img_size: int, device: str | torch.device) -> Encoder:
    """Mean over the token grid of the tokens' codebook vectors."""
    tokenizer.eval().to(device)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return tokenizer.quantizer.lookup(tokenizer.tokenize(x)).mean((2, 3))

    return encode, eval_transform(img_size, mean=TOKENIZER_MEAN, std=TOKENIZER_STD)


def extract_vit_features(model: nn.Module, root: str | Path, *, batch_size: int, device: str | torch.device,
                         workers: int = 0) -> Features:
    """Patch-token-mean features of a timm ViT over an ImageFolder tree (model set to eval, moved to device)."""
    samples, classes, _ = scan_image_folder(root)
    feats, labels, skipped = _extract(_vit_encoder(model, device), samples, root, batch_size=batch_size,
                                      device=device, workers=workers)
    return feats, labels, classes, skipped


def extract_codeword_features(tokenizer: VQTokenizer, root: str | Path, *, img_size: int, batch_size: int,
                              device: str | torch.device, workers: int = 0) -> Features:
    """Averaged-codeword features of a tokenizer over an ImageFolder tree (tokenizer set to eval, moved to device)."""
    _check_img_size(img_size, tokenizer.downsample)
    samples, classes, _ = scan_image_folder(root)
    feats, labels, skipped = _extract(_codeword_encoder(tokenizer, img_size, device), samples, root,
                                      batch_size=batch_size, device=device, workers=workers)
    return feats, labels, classes, skipped


# ----------------------------------------------------------------------------- classifier


def _check_training_args(epochs: int, lr: float, batch_size: int) -> None:
    if epochs <= 0:
        raise ConfigError(f"--epochs {epochs} must be positive; pass e.g. --epochs {DEFAULT_EPOCHS}")
    if not lr > 0:  # also rejects nan
        raise ConfigError(f"--lr {lr} must be positive; pass e.g. --lr {DEFAULT_LR}")
    if batch_size < 2:
        raise ConfigError(f"--batch_size {batch_size} must be at least 2 (the probe's BatchNorm needs two samples "
                          f"per batch); pass e.g. --batch_size {DEFAULT_BATCH}")


def make_head(feature_dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's linprobe head: BatchNorm1d(affine=False) + Linear (weight ~ trunc_normal(0.01), bias 0)."""
    head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One shuffled epoch of index batches; a trailing batch of one sample (BatchNorm cannot take it) is dropped."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    return batches if len(batches[-1]) > 1 else batches[:-1]


def fit_linear_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
                    batch_size: int, seed: int, device: str | torch.device) -> nn.Sequential:
    """Train the probe head on cached features [N, D] with AdamW and a per-step cosine lr; returns it in eval mode."""
    _check_training_args(epochs, lr, batch_size)
    n, dim = feats.shape
    if n < 2:
        raise DataError(f"the probe needs at least 2 training images, got {n}")
    generator = torch.Generator().manual_seed(seed)
    head = make_head(dim, num_classes, generator).to(device).train()
    x, y = feats.to(device), labels.to(device)
    batch_size = min(batch_size, n)
    total = epochs * (n // batch_size + int(n % batch_size > 1))  # batches per epoch, as _epoch_batches makes them
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total)))
    with torch.enable_grad():  # callers may hold a no_grad context (e.g. around feature extraction)
        for _ in range(epochs):
            for idx in _epoch_batches(n, batch_size, generator):
                idx = idx.to(device)
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


@torch.no_grad()
def predict(head: nn.Module, feats: torch.Tensor, device: str | torch.device, chunk: int = 8192) -> torch.Tensor:
    """Logits [N, C] (fp32, CPU) of an eval-mode head, in chunks."""
    return torch.cat([head(c.to(device)).float().cpu() for c in feats.split(chunk)])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item()


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                       val_labels: torch.Tensor, num_classes: int, *, epochs: int = DEFAULT_EPOCHS,
                       lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, seed: int = 0,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fit the probe on the training features, evaluate on the held-out ones; the result dict (fractions)."""
    head = fit_linear_head(train_feats, train_labels, num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
                           seed=seed, device=device)
    val_logits = predict(head, val_feats, device)
    result: dict[str, Any] = {"top1": topk_accuracy(val_logits, val_labels, 1)}
    if num_classes >= 5:
        result["top5"] = topk_accuracy(val_logits, val_labels, 5)
    train_top1 = topk_accuracy(predict(head, train_feats, device), train_labels, 1)
    result.update(chance=1.0 / num_classes, train_top1=train_top1, num_train=len(train_labels),
                  num_val=len(val_labels), feature_dim=int(train_feats.shape[1]), num_classes=num_classes,
                  epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return result


# ----------------------------------------------------------------------------- probes


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when visible), 'cpu' or 'cuda' -> a torch.device; ConfigError if CUDA is asked for but absent."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_backbone(path: str | Path) -> nn.Module:
    """The timm ViT of an exported backbone file, strict-loaded, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file '{path}' not found; export a stage-2 run first with "
                                f"`python -m peco_scale.tools.export RUN` (it writes RUN/backbone.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("kind") == "finetune":  # its timm model pools differently and has a head
                raise ConfigError(f"'{path}' is a fine-tuned classifier export; the linear probe takes the backbone "
                                  f"of a pre-training run (`python -m peco_scale.tools.export RUN` on a stage-2 run)")
        return create_timm_model(path).eval()
    except SafetensorError as exc:
        raise ConfigError(f"'{path}' is not a safetensors file ({exc}); pass the backbone.safetensors written by "
                          f"`python -m peco_scale.tools.export RUN`") from None


def _load_tokenizer(path: str | Path) -> VQTokenizer:
    """load_tokenizer, with a file that is not a tokenizer artifact turned into a ConfigError."""
    try:
        return load_tokenizer(path)
    except SafetensorError as exc:
        raise ConfigError(f"'{path}' is not a safetensors file ({exc}); pass the tokenizer.safetensors written by "
                          f"launch/train_tokenizer.py") from None
    except ValueError as exc:  # wrong format: read_tokenizer_metadata's message names the file and the fix
        raise ConfigError(str(exc)) from None


def _scan_pair(train_root: str | Path, val_root: str | Path) -> tuple[Samples, Samples, list[str]]:
    """Both folders' samples and their (identical) class list; DataError naming the first difference otherwise."""
    for flag, root in (("--data", train_root), ("--val", val_root)):
        if not Path(root).is_dir():
            what = "is not a directory" if Path(root).exists() else "does not exist"
            raise DataError(f"{flag} folder '{root}' {what}; pass an ImageFolder tree (root/<class>/<image> or "
                            f"root/train/<class>/<image>)")
    train, classes, _ = scan_image_folder(train_root)
    val, val_classes, _ = scan_image_folder(val_root)
    if classes != val_classes:
        common = min(len(classes), len(val_classes))
        i = next((i for i, (a, b) in enumerate(zip(classes, val_classes)) if a != b), common)
        if i < common:
            diff = f"first difference at position {i}: '{classes[i]}' vs '{val_classes[i]}'"
        else:
            diff = (f"'{classes[i]}' is missing from --val" if len(classes) > i
                    else f"'{val_classes[i]}' is missing from --data")
        raise DataError(f"class lists differ: --data '{train_root}' has {len(classes)} classes, --val '{val_root}' "
                        f"has {len(val_classes)}; {diff}; give both folders the same class sub-folders")
    return train, val, classes


def _check_run_args(epochs: int, lr: float, batch_size: int, extract_batch_size: int, workers: int,
                    device: str) -> torch.device:
    """Every cheap check of a probe's numeric arguments; the resolved device."""
    _check_training_args(epochs, lr, batch_size)
    if extract_batch_size <= 0:
        raise ConfigError(f"--extract_batch_size {extract_batch_size} must be positive; pass e.g. "
                          f"--extract_batch_size 64")
    if workers < 0:
        raise ConfigError(f"--workers {workers} must be 0 (decode in this process) or more")
    return resolve_device(device)


def _run_probe(encoder: Encoder, train_root: str | Path, val_root: str | Path, *, epochs: int, lr: float,
               batch_size: int, seed: int, device: torch.device, extract_batch_size: int,
               workers: int) -> dict[str, Any]:
    """Scan both folders, extract both sets once, train and evaluate."""
    train, val, classes = _scan_pair(train_root, val_root)
    kw = {"batch_size": extract_batch_size, "device": device, "workers": workers}
    train_feats, train_labels, train_skipped = _extract(encoder, train, train_root, **kw)
    val_feats, val_labels, val_skipped = _extract(encoder, val, val_root, **kw)
    result = train_linear_probe(train_feats, train_labels, val_feats, val_labels, len(classes), epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed, device=device)
    result["skipped"] = train_skipped + val_skipped
    return result


def linear_probe(backbone_path: str | Path, train_root: str | Path, val_root: str | Path, *,
                 epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, seed: int = 0,
                 device: str = "auto", extract_batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """Linear probe of an exported stage-2 backbone (``python -m peco_scale.tools.export RUN`` writes it)."""
    dev = _check_run_args(epochs, lr, batch_size, extract_batch_size, workers, device)
    model = load_backbone(backbone_path)
    result = _run_probe(_vit_encoder(model, dev), train_root, val_root, epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=seed, device=dev, extract_batch_size=extract_batch_size, workers=workers)
    return {"probe": "linear", "model": str(backbone_path), "img_size": int(model.patch_embed.img_size[0]), **result}


def codeword_probe(tokenizer_path: str | Path, train_root: str | Path, val_root: str | Path, *, img_size: int = 224,
                   epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, seed: int = 0,
                   device: str = "auto", extract_batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """Linear probe of a stage-1 tokenizer's averaged codewords (PeCo Table 4)."""
    dev = _check_run_args(epochs, lr, batch_size, extract_batch_size, workers, device)
    tokenizer = _load_tokenizer(tokenizer_path)
    _check_img_size(img_size, tokenizer.downsample)
    result = _run_probe(_codeword_encoder(tokenizer, img_size, dev), train_root, val_root, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, device=dev, extract_batch_size=extract_batch_size,
                        workers=workers)
    return {"probe": "codeword", "model": str(tokenizer_path), "img_size": img_size, **result}


# ----------------------------------------------------------------------------- command line


def _prepare_out(path: str | None) -> Path | None:
    """The --out path, its folder created now, so a bad path fails before the extraction."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a directory; pass a file name such as {out / 'probe.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out '{out}': cannot create its folder ({exc.strerror}); pass a writable path") from None
    return out


def write_json(result: dict[str, Any], out: Path) -> None:
    """Write the result atomically (temp file in the same folder, then os.replace)."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)


def summary(result: dict[str, Any]) -> str:
    """One line: 'codeword probe: top-1 41.2%, top-5 80.1% (chance 10.0%) on 300 val images, ...'."""
    top5 = f", top-5 {result['top5']:.1%}" if "top5" in result else ""
    skipped = f"; {result['skipped']} unreadable images skipped" if result["skipped"] else ""
    return (f"{result['probe']} probe: top-1 {result['top1']:.1%}{top5} (chance {result['chance']:.1%}) on "
            f"{result['num_val']} val images, {result['num_classes']} classes, {result['feature_dim']}-d features"
            f"{skipped}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="training ImageFolder (root/<class>/ or root/train/<class>/)")
    common.add_argument("--val", required=True, help="held-out ImageFolder with the same class folders")
    common.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="classifier epochs over the cached features")
    common.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW peak lr (cosine to 0 per step)")
    common.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="classifier mini-batch size")
    common.add_argument("--seed", type=int, default=0, help="seed of the classifier's init and shuffling")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument("--extract_batch_size", type=int, default=64, help="images per feature-extraction batch")
    common.add_argument("--workers", type=int, default=2, help="image decoding processes")
    common.add_argument("--out", default=None, help="write the result dict to this .json file")
    p = argparse.ArgumentParser(prog="python -m peco_scale.tools.probe", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    linear = sub.add_parser("linear", parents=[common], help="linear probe of an exported ViT backbone")
    linear.add_argument("--backbone", required=True,
                        help="backbone.safetensors written by `python -m peco_scale.tools.export RUN`")
    codeword = sub.add_parser("codeword", parents=[common], help="linear probe of a tokenizer's averaged codewords")
    codeword.add_argument("--tokenizer", required=True, help="tokenizer.safetensors written by train_tokenizer")
    codeword.add_argument("--img_size", type=int, default=224,
                          help="input size; a multiple of the tokenizer's downsample factor")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kw = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
          "device": args.device, "extract_batch_size": args.extract_batch_size, "workers": args.workers}
    try:
        out = _prepare_out(args.out)
        if args.probe == "linear":
            result = linear_probe(args.backbone, args.data, args.val, **kw)
        else:
            result = codeword_probe(args.tokenizer, args.data, args.val, img_size=args.img_size, **kw)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        write_json(result, out)
    print(summary(result) + (f"; wrote {out}" if out is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
