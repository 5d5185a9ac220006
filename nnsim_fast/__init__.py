"""nnsim_fast: similarity of neural networks with gradients, fast.

One forward and one backward pass per batch give each probed layer's features
and expected loss gradients; a CountSketch of the sample axis (native, fused
kernels) turns any dataset into per-layer ``m x m`` kernels; CKA and NBS
compare them.  See README.md.
"""
from ._version import __version__  # noqa: F401  (re-exported)

from . import ops
from .compare import mean_embedding_norm, similarity, similarity_matrix
from .extract import IndexedDataset, compare_models, sketch_model
from .indices import cka, linear_cka, nbs
from .ops import countsketch, countsketch_pair, countsketch_pair_, hadamard_gram, sketch_hash
from .sketch import Representation

__all__ = [
    "IndexedDataset", "Representation", "cka", "compare_models", "countsketch", "countsketch_pair",
    "countsketch_pair_", "hadamard_gram", "linear_cka", "mean_embedding_norm", "nbs", "ops", "similarity",
    "similarity_matrix", "sketch_hash", "sketch_model",
]
