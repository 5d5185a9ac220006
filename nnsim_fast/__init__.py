"""nnsim_fast: similarity of neural networks with gradients, fast.

See README.md for the method and the API.
"""
from . import ops
from .ops import countsketch, countsketch_pair, countsketch_pair_, hadamard_gram, sketch_hash

__version__ = "0.1.0"
