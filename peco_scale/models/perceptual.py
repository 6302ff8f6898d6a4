"""Frozen perceptual network and the PeCo perceptual loss (paper eq. 4).

The loss compares unit-normalised features of a FROZEN network between an image and its
reconstruction. Weights come from a local file only (MoCo v3, timm or torchvision format) or
are explicitly random (``weights="random"``, demo/tests); nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
_MOCO_PREFIX = "module.base_encoder."  # MoCo v3 DDP checkpoints: the backbone lives under model.base_encoder
_DDP_PREFIX = "module."
_WRAPPER_KEYS = ("state_dict", "model", "module")  # dicts some trainers wrap the state dict in
# indices in torchvision's vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps)
_VGG16_RELU_TAPS = (3, 8, 15, 22, 29)
_EPS = 1e-10  # as LPIPS: keeps all-zero feature vectors (dead ReLUs) finite after normalisation


class PerceptualWeightsError(ValueError):
    """A perceptual-network checkpoint is missing, unreadable or of the wrong architecture."""


def _vit_features(model: nn.Module, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Raw outputs of blocks ``layers`` (1-based): patch tokens only, as [B, C, H/p, W/p] grids."""
    # timm drops the prefix (cls) tokens, reshapes to NCHW and skips the final norm; stop_early
    # avoids running blocks past the deepest requested one
    return model.forward_intermediates(x, indices=[i - 1 for i in layers], norm=False, stop_early=True,
                                       output_fmt="NCHW", intermediates_only=True)


def _resnet_features(model: nn.Module, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Outputs of stages ``layers`` (1 = layer1 ... 4 = layer4), each [B, C, h, w]."""
    # timm's intermediate 0 is the stem, so stage k is intermediate k
    return model.forward_intermediates(x, indices=list(layers), stop_early=True, intermediates_only=True)


def _vgg_features(features: nn.Module, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Outputs of the LPIPS relu taps ``layers`` (1 = relu1_2 ... 5 = relu5_3), each [B, C, h, w]."""
    taps = {_VGG16_RELU_TAPS[i - 1] for i in layers}
    out = []
    for idx, module in enumerate(features[: max(taps) + 1]):
        x = module(x)
        if idx in taps:
            out.append(x)
    return out


@dataclass(frozen=True)
class PerceptualArch:
    """How to build one supported frozen network and read its features."""

    build: Callable[[], nn.Module]  # backbone with random init, no classifier
    extract: Callable[[nn.Module, Tensor, Sequence[int]], list[Tensor]]
    num_layers: int  # selectable layers are 1..num_layers
    default_layers: tuple[int, ...]
    unit: str  # what a layer index counts, for the description
    formats: str  # checkpoint formats this arch loads, for error messages
    head_prefixes: tuple[str, ...]  # classifier / projection-head keys dropped from checkpoints
    key_prefix: str = ""  # prefix stripped from checkpoint keys (torchvision vgg16 -> vgg16.features)
    patch_size: int = 1  # input H and W must be multiples of this


def _timm_vit(name: str, formats: str) -> PerceptualArch:
    """A timm ViT-*/16 read after blocks 3, 6, 9, 12 by default."""
    # dynamic_img_size: accept any multiple of the patch size (pos_embed is interpolated)
    return PerceptualArch(lambda: timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True),
                          _vit_features, 12, (3, 6, 9, 12), "blocks", formats, ("head.",), patch_size=16)


def _timm_resnet(name: str) -> PerceptualArch:
    """A timm ResNet (torchvision-compatible key names) read after its four stages."""
    return PerceptualArch(lambda: timm.create_model(name, pretrained=False, num_classes=0), _resnet_features, 4,
                          (1, 2, 3, 4), "stages", "MoCo v3 / timm / torchvision", ("fc.",))


PERCEPTUAL_ARCHS: dict[str, PerceptualArch] = {
    "vit_base_patch16": _timm_vit("vit_base_patch16_224", "MoCo v3 / timm"),  # the paper's: MoCo v3 ViT-B/16
    "resnet50": _timm_resnet("resnet50"),
    "vgg16": PerceptualArch(
        lambda: torchvision.models.vgg16(weights=None).features, _vgg_features, 5, (1, 2, 3, 4, 5),
        "relu taps (relu1_2,relu2_2,relu3_3,relu4_3,relu5_3)", "torchvision", ("classifier.",),
        key_prefix="features."),
    "vit_tiny_patch16": _timm_vit("vit_tiny_patch16_224", "timm"),  # cheap CPU demo/test network (192 wide)
    "resnet_tiny": _timm_resnet("resnet18"),  # cheap CPU demo/test network: a plain ResNet-18
}


def _get_arch(arch: str) -> PerceptualArch:
    if arch not in PERCEPTUAL_ARCHS:
        raise ValueError(f"unknown perceptual arch '{arch}'; choose one of {', '.join(PERCEPTUAL_ARCHS)}")
    return PERCEPTUAL_ARCHS[arch]


def _resolve_layers(arch: str, spec: PerceptualArch, layers: Sequence[int] | None) -> list[int]:
    """Validated, sorted 1-based layer indices; None or empty means the arch's default."""
    if not layers:
        return list(spec.default_layers)
    bad = [i for i in layers if not 1 <= i <= spec.num_layers]
    if bad:
        raise ValueError(f"perceptual layers {bad} out of range for {arch}: {spec.unit} are numbered "
                         f"1..{spec.num_layers}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"perceptual layers {list(layers)} for {arch} contain duplicates")
    return sorted(layers)


def filter_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict[str, Tensor]:
    """Turn a checkpoint into a state dict for the backbone of ``arch`` (cf. timm's checkpoint_filter_fn).

    Accepts a plain timm / torchvision state dict, one wrapped under "state_dict", "model" or
    "module", a DistributedDataParallel one ("module." keys) or a MoCo v3 checkpoint, of which only
    the "module.base_encoder." weights are kept (momentum encoder and predictor are dropped).
    Classifier / projection-head keys and non-tensor entries are dropped.
    """
    spec = _get_arch(arch)
    sd = _unwrap(state_dict)
    if any(k.startswith(_MOCO_PREFIX) for k in sd):
        sd = {k[len(_MOCO_PREFIX):]: v for k, v in sd.items() if k.startswith(_MOCO_PREFIX)}
    elif sd and all(k.startswith(_DDP_PREFIX) for k in sd):
        sd = {k[len(_DDP_PREFIX):]: v for k, v in sd.items()}
    return {k.removeprefix(spec.key_prefix): v for k, v in sd.items()
            if isinstance(v, Tensor) and not k.startswith(spec.head_prefixes)}


def _unwrap(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    """Descend through wrapper dicts ({"state_dict": ...}, {"model": ...}, {"module": ...})."""
    while True:
        inner = next((ckpt[k] for k in _WRAPPER_KEYS if isinstance(ckpt.get(k), Mapping)), None)
        if inner is None:
            return ckpt
        ckpt = inner


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    """Load a local .pth/.pt/.bin (weights_only pickle) or .safetensors file onto the CPU."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PerceptualWeightsError(f"perceptual weights '{path}' are .safetensors but the safetensors "
                                         f"package is not installed; pip install safetensors") from None
        return load_file(str(path), device="cpu")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, non-weights pickle, ...: all get the same actionable message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PerceptualWeightsError(f"could not read perceptual weights '{path}' with torch.load("
                                     f"weights_only=True) ({reason}); re-save the bare state dict with "
                                     f"torch.save(model.state_dict(), path)") from e
    if not isinstance(ckpt, Mapping):
        raise PerceptualWeightsError(f"perceptual weights '{path}' hold a {type(ckpt).__name__}, expected a "
                                     f"state dict (a dict of tensors); re-save it with "
                                     f"torch.save(model.state_dict(), path)")
    return ckpt


def _preview(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _load_strict(backbone: nn.Module, sd: Mapping[str, Tensor], path: Path, arch: str) -> None:
    """Strictly load ``sd`` into ``backbone`` (built on the meta device), or raise one readable error
    listing what does not match."""
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {list(sd[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"missing {len(missing)} keys ({_preview(missing)})" if missing else "",
                    f"unexpected {len(unexpected)} ({_preview(unexpected)})" if unexpected else "",
                    f"{len(shapes)} shape mismatches (file vs model: {_preview(shapes)})" if shapes else ""]
        raise PerceptualWeightsError(f"perceptual weights {path} do not match {arch}: "
                                     f"{', '.join(p for p in problems if p)}; pass a "
                                     f"{_get_arch(arch).formats} checkpoint of that architecture")
    # assign=True materialises the meta-device backbone with the checkpoint tensors, cast to the model's dtypes
    backbone.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PerceptualNet(nn.Module):
    """A frozen feature network returning raw feature maps at selected layers.

    ``weights`` is a local checkpoint path, or ``"random"`` for a randomly initialised network
    (demo/tests only; logged as a warning). ``layers`` are 1-based indices (ViT blocks, ResNet
    stages, VGG relu taps); None or empty selects the arch's default. ``description`` is a one-line
    summary of arch, layers and weights source for the training log.
    """

    def __init__(self, arch: str, layers: Sequence[int] | None, weights: str):
        super().__init__()
        spec = _get_arch(arch)
        self.arch = arch
        self.layers = _resolve_layers(arch, spec, layers)
        if weights == RANDOM_WEIGHTS:
            self.backbone = spec.build()
            source = "RANDOM INIT (no weights file)"
            logger.warning("perceptual loss uses a randomly initialised %s (perceptual.weights=random): "
                           "fine for demos/tests, meaningless for real training", arch)
        else:
            path = Path(weights).expanduser()
            # cheap checks (file exists, checkpoint readable) before building a possibly large network
            if not path.is_file():
                raise PerceptualWeightsError(
                    f"perceptual weights file '{weights}' not found; pass perceptual.weights=PATH to a local "
                    f"{spec.formats} checkpoint of {arch}, or perceptual.weights=random for a randomly "
                    f"initialised network (demo only)")
            sd = filter_state_dict(_read_checkpoint(path), arch)
            with torch.device("meta"):  # skip initialising weights the checkpoint replaces (seconds for vgg16)
                self.backbone = spec.build()
            _load_strict(self.backbone, sd, path, arch)
            source = f"weights {path} (sha256 {_sha256(path)[:12]})"
        self.description = f"{arch} {spec.unit} {self.layers}, {source}"
        self.backbone.requires_grad_(False)
        # [-1, 1] images are mapped to ImageNet statistics, which all supported networks are trained on
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> PerceptualNet:
        """Stay in eval mode whatever a parent asks: frozen BatchNorm stats and no dropout."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] images in [-1, 1] -> one raw feature map [B, C_l, h_l, w_l] per layer."""
        self._check_input(x)
        x = ((x + 1) / 2 - self.mean) / self.std
        return PERCEPTUAL_ARCHS[self.arch].extract(self.backbone, x, self.layers)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"perceptual net expects [B, 3, H, W] images, got shape {list(x.shape)}")
        h, w = x.shape[-2:]
        p = PERCEPTUAL_ARCHS[self.arch].patch_size
        if h % p or w % p:
            raise ValueError(f"{self.arch} needs image sizes that are multiples of its patch size {p}, got {h}x{w}")


def perceptual_distance(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> Tensor:
    """PeCo eq. 4: sum over layers of the mean (over batch and positions) squared L2 distance
    between channel-unit-normalised features. Each feature is [B, C, h, w]; returns an fp32 scalar.
    """
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"need the same non-zero number of feature maps, got {len(feats_a)} and {len(feats_b)}")
    total = torch.zeros((), device=feats_a[0].device)
    for a, b in zip(feats_a, feats_b):
        if a.shape != b.shape:
            raise ValueError(f"feature shapes differ: {list(a.shape)} vs {list(b.shape)}")
        # fp32 so normalisation is accurate under autocast (bf16/fp16 features)
        a, b = _unit_normalise(a.float()), _unit_normalise(b.float())
        total = total + (a - b).pow(2).sum(dim=1).mean()
    return total


def _unit_normalise(f: Tensor) -> Tensor:
    """f / (||f||_2 + eps) along the channel dim of [B, C, h, w]."""
    # vector_norm has a zero (not NaN) gradient at the zero vector
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + _EPS)


class PerceptualLoss(nn.Module):
    """Perceptual loss d(x, x_rec) of PeCo eq. 4 on a frozen :class:`PerceptualNet`.

    Target features of ``x`` carry no gradient; gradient flows to ``x_rec`` only.
    """

    def __init__(self, arch: str, layers: Sequence[int] | None, weights: str):
        super().__init__()
        self.net = PerceptualNet(arch, layers, weights)

    @property
    def description(self) -> str:
        return self.net.description

    def forward(self, x: Tensor, x_rec: Tensor) -> Tensor:
        """x, x_rec: [B, 3, H, W] in [-1, 1] -> scalar loss."""
        with torch.no_grad():
            target = self.net(x)
        return perceptual_distance(self.net(x_rec), target)
