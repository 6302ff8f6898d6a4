"""peco_kernels: Triton kernels for PeCo's two hot spots, with one pure-PyTorch reference each.

- ``vq_nearest``: the tokenizer's nearest-code search over K codes (+ EMA statistics).
- ``masked_linear_cross_entropy``: the MIM head's linear + softmax cross-entropy over V classes
  at masked positions, forward and backward, without materialising the logits.

Installed from the folder ``kernels/`` as the import package ``peco_kernels`` (a top-level
``kernels`` module would collide with Hugging Face's ``kernels`` package).
"""

from .functional import BACKENDS, KernelInputError, masked_linear_cross_entropy, vq_nearest
from .reference import masked_linear_cross_entropy_reference, vq_ema_stats_reference, vq_nearest_reference

__all__ = ["BACKENDS", "KernelInputError", "masked_linear_cross_entropy", "masked_linear_cross_entropy_reference",
           "vq_ema_stats_reference", "vq_nearest", "vq_nearest_reference"]
