"""Layer x layer and model x model similarity from sketched representations."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import indices
from .kernels import check_centering, check_kind
from .sketch import Representation

INDICES = ("cka", "nbs")
LayerSpec = Optional[Union[str, Sequence[str], Tuple[Sequence[str], Sequence[str]]]]


def _check_index(index: str) -> str:
    if index not in INDICES:
        raise ValueError(f"index must be one of {INDICES}, got {index!r}")
    return index


def check_comparable(a: Representation, b: Representation) -> None:
    """Representations are comparable when they share m, seed and sparsity (one sketch)."""
    for rep, name in ((a, "rep_a"), (b, "rep_b")):
        if not isinstance(rep, Representation):
            raise TypeError(f"{name} must be a Representation, got {type(rep).__name__}")
    for key in ("m", "seed", "sparsity"):
        if getattr(a, key) != getattr(b, key):
            raise ValueError(f"cannot compare representations sketched with different {key} "
                             f"({getattr(a, key)} vs {getattr(b, key)}): their buckets do not "
                             "correspond; sketch both with the same m, seed and sparsity")


def _index_matrix(Ks_a: torch.Tensor, Ks_b: torch.Tensor, index: str) -> torch.Tensor:
    # Kernels arrive centred (or deliberately uncentred); the index must not re-centre.
    if index == "cka":
        return indices.cka_matrix(Ks_a, Ks_b, centered=False)
    return indices.nbs_matrix(Ks_a, Ks_b, centered=False)


def similarity(rep_a: Representation, rep_b: Representation, index: str = "cka",
               kind: str = "hadamard", layers: LayerSpec = None, centering: str = "buckets"
               ) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Similarity of every layer of ``rep_a`` with every layer of ``rep_b``.

    Args:
        rep_a, rep_b: representations sketched with the same m, seed and sparsity
            (datasets and sizes may differ).
        index: ``"cka"`` or ``"nbs"``; both are similarities in [0, 1].
        kind: kernel kind (see :mod:`nnsim_fast.kernels`); default the paper's
            ``"hadamard"`` (features o gradients).
        layers: None (all layers of each), one name or list used for both, or a
            2-tuple ``(layers_a, layers_b)`` (each a name or a list).
        centering: ``"buckets"`` (default), ``"data"`` or ``"none"``.

    Returns:
        ``(matrix [La, Lb] float64, layers_a, layers_b)``.
    """
    check_comparable(rep_a, rep_b)
    _check_index(index)
    check_kind(kind)
    check_centering(centering)
    if isinstance(layers, tuple) and len(layers) == 2:
        names_a, names_b = rep_a._resolve(layers[0]), rep_b._resolve(layers[1])
    else:
        names_a, names_b = rep_a._resolve(layers), rep_b._resolve(layers)
    Ks_a = rep_a.kernels(names_a, kind=kind, centering=centering)
    Ks_b = rep_b.kernels(names_b, kind=kind, centering=centering).to(Ks_a.device)
    return _index_matrix(Ks_a, Ks_b, index), names_a, names_b


def similarity_matrix(reps: Sequence[Representation], layer: Union[str, Sequence[str]],
                      index: str = "cka", kind: str = "hadamard", centering: str = "buckets"
                      ) -> torch.Tensor:
    """Model x model similarity ``[R, R]`` at one layer (one name, or one name per model)."""
    reps = list(reps)
    if not reps:
        raise ValueError("reps is empty")
    for rep in reps[1:]:
        check_comparable(reps[0], rep)
    _check_index(index)
    names = [layer] * len(reps) if isinstance(layer, str) else list(layer)
    if len(names) != len(reps):
        raise ValueError(f"layer names one layer per representation: got {len(names)} names "
                         f"for {len(reps)} representations")
    Ks = torch.stack([rep.kernel(name, kind=kind, centering=centering).to(reps[0].device)
                      for rep, name in zip(reps, names)])
    return _index_matrix(Ks, Ks, index)


def mean_embedding_norm(rep: Representation, layer: str) -> Dict[str, float]:
    """Kernel mean embedding quantities of the paper's kernel at ``layer`` (section 5.3).

    Returns a dict with
      ``norm``: ``||mu_p|| = ||(1/N) sum_i g_i f_i^T||_F`` (exact; needs the
        representation built with ``mean_embedding=True``),
      ``trace_factor``: ``sqrt(Tr K) / N`` (exact),
      ``frobenius_factor``: ``||K||_F / N^2`` estimated from the sketched kernel
        ``||K~||_F`` (the N x N kernel is never formed),
      ``ratio_frobenius`` and ``ratio_trace`` (eq. 19) and ``log_ratio_frobenius``
      (eq. 48).
    """
    entry = rep.layer(layer)
    if entry.mean_psi is None:
        raise ValueError("mean_embedding_norm needs the exact mean embedding; sketch with "
                         "sketch_model(..., mean_embedding=True)")
    n = rep.n
    norm = float(torch.linalg.matrix_norm(entry.mean_psi.to(torch.float64))) / n
    trace_factor = math.sqrt(max(float(entry.trace), 0.0)) / n
    frob = float(torch.linalg.matrix_norm(rep.kernel(layer, kind="hadamard"))) / n ** 2
    ratio_f = norm / frob if frob > 0 else float("inf")
    return {"norm": norm, "trace_factor": trace_factor, "frobenius_factor": frob,
            "ratio_frobenius": ratio_f,
            "ratio_trace": norm / trace_factor if trace_factor > 0 else float("inf"),
            "log_ratio_frobenius": math.log(ratio_f) if 0 < ratio_f < float("inf") else float("nan")}
