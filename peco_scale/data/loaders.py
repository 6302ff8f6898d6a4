"""``make_loader``: a backend's loader by name.

In a module of its own rather than the package ``__init__`` (which only re-exports): modules of
the package (``bench``) import it from here without depending on the order in which ``__init__``
imports things, and the ffcv and dali modules (and their optional dependencies) are imported only
when that backend is chosen.
"""

from __future__ import annotations

from .folder import FolderLoader
from .spec import BACKENDS, AugmentSpec, BatchLoader, DataError


def make_loader(backend: str, source, spec: AugmentSpec, **kwargs) -> BatchLoader:
    """``backend`` folder (source: ImageFolder root), ffcv (source: .beton), dali (source: root)."""
    if backend == "folder":
        return FolderLoader(source, spec, **kwargs)
    if backend == "ffcv":
        from .ffcv_backend import FFCVLoader

        return FFCVLoader(source, spec, **kwargs)
    if backend == "dali":
        from .dali_backend import DALILoader

        return DALILoader(source, spec, **kwargs)
    raise DataError(f"data backend '{backend}' is unknown; choose one of {', '.join(BACKENDS)}")
