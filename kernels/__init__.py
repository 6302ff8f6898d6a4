"""peco_kernels: Triton kernels for PeCo's two hot spots, with one pure-PyTorch reference each.

- ``vq_nearest``: the tokenizer's nearest-code search over K codes (+ EMA statistics).
- ``masked_linear_cross_entropy``: the MIM head's linear + softmax cross-entropy over V classes
  at masked positions, forward and backward, without materialising the logits.

Installed from the folder ``kernels/`` as the import package ``peco_kernels`` (a top-level
``kernels`` module would collide with Hugging Face's ``kernels`` package). Where the repository
root is on ``sys.path`` (``python -m`` run from it, DeepSpeed's launcher, which puts the working
directory on PYTHONPATH) this folder would still shadow that package under the name ``kernels``
(transformers imports it): imported by that name, it hands the name to the installed package.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (this folder is peco_kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_module)
else:
    from .functional import BACKENDS, KernelInputError, masked_linear_cross_entropy, vq_nearest
    from .reference import masked_linear_cross_entropy_reference, vq_ema_stats_reference, vq_nearest_reference

__all__ = ["BACKENDS", "KernelInputError", "masked_linear_cross_entropy", "masked_linear_cross_entropy_reference",
           "vq_ema_stats_reference", "vq_nearest", "vq_nearest_reference"]
