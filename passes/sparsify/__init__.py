"""Weight sparsification: the ``sparsify`` pass (patterns, allocation, sequential OBS stages) and ``pack-sparse``."""
from __future__ import annotations

from optc.passes.sparsify.pack_sparse import PackSparse
from optc.passes.sparsify.sparsify import Sparsify

__all__ = ["PackSparse", "Sparsify"]
