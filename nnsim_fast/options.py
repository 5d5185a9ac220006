"""The choice lists the library and the command line both read (one place each).

Every public function that takes one of these options checks it against the
tuple here (``nnsim_fast._checks.check_choice``), and the CLI builds its
``choices=`` from the same tuples, so the two can never disagree.
"""
from __future__ import annotations

#: Similarity indices (``similarity(index=...)``).
INDICES = ("cka", "nbs")

#: Kernel kinds (``similarity(kind=...)``, ``Representation.kernel(kind=...)``);
#: see :mod:`nnsim_fast.kernels` for what each one is.
KINDS = ("feature", "gradient", "hadamard", "sum", "khatri_rao", "psi", "transport")

#: Kinds whose ``b x b`` block on a batch follows from that batch alone, which the joint
#: path (:func:`nnsim_fast.compare_models`) needs: not ``transport`` (matrix functions of
#: the whole ``N x N`` kernel).
JOINT_KINDS = tuple(kind for kind in KINDS if kind != "transport")

#: Kinds computed from features alone (a representation sketched with
#: ``gradients=False`` offers only these).
FEATURE_KINDS = ("feature",)

#: How ``similarity`` estimates an index:
#: ``"sketch"``  the default: the data-centred index, with the CountSketch collision
#:               terms removed (see :mod:`nnsim_fast.estimators`);
#: ``"plugin"``  the index of the data-centred sketched kernels as they are (biased);
#: ``"paper"``   Algorithm 1 of the paper with the authors' centring of the m x m
#:               matrix (reproduces their numbers; close to the uncentred alignment);
#: ``"exact"``   all N x N pairs in float64 (needs exact representations).
ESTIMATORS = ("sketch", "plugin", "paper", "exact")

#: ``nnsim-fast compare --estimator`` also takes ``"joint"``: both models run over the
#: same batches and CKA comes from the exact within-block kernel entries
#: (:func:`nnsim_fast.compare_models`; no representation is kept).
COMPARE_ESTIMATORS = ESTIMATORS + ("joint",)
#: The demo's: ``joint`` (its default) takes CKA from one pass of every model over the same
#: batches and NBS from the sketches; ``exact`` needs unsketched representations, which the
#: demo does not keep.
DEMO_ESTIMATORS = ("joint",) + tuple(name for name in ESTIMATORS if name != "exact")

#: Centring of an ``m x m`` sketched kernel (``Representation.kernel(centering=...)``).
CENTERINGS = ("none", "buckets", "data")

#: Gradient targets of ``sketch_model``.
TARGETS = ("expected", "labels")

#: Pooling of conv feature maps ``[B, C, H, W]`` (``sketch_model(spatial=...)``).
SPATIAL = ("flatten", "mean")

#: Pooling of token outputs ``[B, T, D]`` (``sketch_model(tokens=...)``).
TOKENS = ("mean", "first", "flatten")
