"""The tokenizer artifact: one safetensors file holding the weights and their own config.

Later stages load it with one call, :func:`load_tokenizer`. The config travels in the file's
metadata, so the artifact needs nothing else to rebuild the network; its sha256 is the
tokenizer's identity (stage 2 records it in its checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import from_dict, to_dict
from .quantizer import QuantizerConfig
from .tokenizer import TokenizerModelConfig, VQTokenizer

FORMAT = "peco-tokenizer/1"


def save_tokenizer(model: VQTokenizer, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights + config) to ``path`` atomically (tmp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model": json.dumps(to_dict(model.model_cfg)),
        "quantizer": json.dumps(to_dict(model.quant_cfg)),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def tokenizer_identity(path: str | Path) -> str:
    """sha256 of the artifact file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The artifact's config and extra info, without loading weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer artifact '{path}' not found; train one with launch/train_tokenizer.py "
                                f"(it writes <output_dir>/tokenizer.safetensors)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a peco-scale tokenizer artifact (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); pass the tokenizer.safetensors written by train_tokenizer")
    return {k: json.loads(meta[k]) for k in ("model", "quantizer", "extra")}


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu", kernels: str = "auto") -> VQTokenizer:
    """Rebuild the tokenizer from its artifact, frozen and in eval mode; ``kernels`` is the
    nearest-code backend of this process (``peco_kernels.BACKENDS``)."""
    meta = read_tokenizer_metadata(path)
    quant = {k: v for k, v in meta["quantizer"].items() if k != "kernels"}  # older artifacts saved the runtime choice
    model = VQTokenizer(from_dict(TokenizerModelConfig, meta["model"]), from_dict(QuantizerConfig, quant), kernels)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)
