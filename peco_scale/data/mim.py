"""Stage-2 sample transform: two views of one random-resized crop, plus the block mask.

BEiT's recipe: colour jitter and horizontal flip, then ONE crop box resized twice: the patch
view at the model resolution with ImageNet normalisation, and the tokenizer view sized so that
its token grid equals the patch grid, normalised to [-1, 1] as the tokenizer was trained.
The mask is drawn here, in the data workers, from the sample's seeded RNG.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MIMTransform:
    """PIL image -> {"patch": [3, S, S], "tokenizer": [3, S_t, S_t], "mask": bool [h, w]}.

    Randomness comes from torch's global RNG (seeded per sample by ImageFolderDataset); the
    mask generator gets a numpy Generator seeded from it, so a sample is a pure function of
    its (index, sample_seed).
    """

    def __init__(self, img_size: int, tokenizer_size: int, mask_generator: Callable[[np.random.Generator], np.ndarray],
                 *, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, jitter: float = 0.4):
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.mask_generator = mask_generator
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.jitter = T.ColorJitter(jitter, jitter, jitter) if jitter > 0 else None
        self.patch_norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def crop_params(self, img: Image.Image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) drawn from the global torch RNG."""
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(()) < self.hflip)
        return top, left, h, w, flip

    def __call__(self, img: Image.Image) -> dict[str, Any]:
        top, left, h, w, flip = self.crop_params(img)
        crop = img.crop((left, top, left + w, top + h))
        if self.jitter is not None:
            crop = self.jitter(crop)
        if flip:
            crop = TF.hflip(crop)
        bicubic = T.InterpolationMode.BICUBIC
        patch = TF.to_tensor(TF.resize(crop, [self.img_size, self.img_size], bicubic, antialias=True))
        out = {"patch": self.patch_norm(patch)}
        if self.tokenizer_size:  # 0: no tokenizer view (the MAE tasks)
            size = [self.tokenizer_size, self.tokenizer_size]
            out["tokenizer"] = TF.to_tensor(TF.resize(crop, size, bicubic, antialias=True)) * 2.0 - 1.0
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        out["mask"] = torch.from_numpy(np.ascontiguousarray(self.mask_generator(rng), dtype=bool))
        return out


def denormalize_patch(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the patch view's ImageNet normalisation -> [0, 1] (any leading dims)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
