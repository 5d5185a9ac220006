"""Layer x layer and model x model similarity, with error bars, from representations.

Which quantity each ``estimator`` estimates (``K`` is the exact ``N x N`` kernel
of the chosen ``kind`` over the data, ``H = I - 11^T/N``):

``"sketch"`` (default for sketched representations)
    the data-centred index -- CKA ``<HK_1H, HK_2H> / (|HK_1H| |HK_2H|)``
    (Cortes et al.; the paper's section 3.2), or with ``debiased=True`` the same
    ratio of Song et al.'s unbiased (U-statistic) HSIC -- estimated from the
    sketches with the CountSketch collision terms removed
    (:mod:`nnsim_fast.estimators`); comes with a standard error per entry.  NBS:
    the plug-in on data-centred sketched kernels (no unbiased estimator exists;
    biased upwards when the layers' effective rank exceeds ``m``).
``"plugin"``
    the index of the data-centred ``m x m`` sketched kernels as they are (biased:
    collision terms of order ``Tr K_1 Tr K_2 / m`` remain).
``"paper"``
    Algorithm 1 of the paper with the authors' centring of the ``m x m`` matrix
    (``centering="buckets"``): reproduces their numbers; close to the *uncentred*
    alignment of eq. 10, which is near 1 for any two post-ReLU layers.
``"exact"`` (default for :class:`~nnsim_fast.exact.ExactRepresentation`)
    all ``N x N`` pairs in float64 -- the oracle the others are judged against.

Representations of different rows (two datasets, or different subsets) have no
exact ``N x N`` counterpart; by default they are compared with ``"plugin"`` and a
:class:`DifferentRowsWarning` says so (``estimator="sketch"`` then raises).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import estimators, indices
from ._checks import check_bool, check_choice
from .options import ESTIMATORS, INDICES
from .sketch import Representation, SketchSpec

LayerSpec = Optional[Union[str, Sequence[str], Tuple[Sequence[str], Sequence[str]]]]


class ResolutionWarning(UserWarning):
    """A similarity's estimated error is too large for the sketch size ``m``."""


class DifferentRowsWarning(UserWarning):
    """The two representations hold different rows, so the default estimator fell back
    to ``estimator="plugin"``."""


class SimilarityResult(tuple):
    """``(matrix, layers_a, layers_b)`` -- unpacks like a 3-tuple -- plus:

    ``error``: ``[La, Lb]`` float64 estimated standard errors (``None`` where the
    estimator gives none; zeros for ``"exact"``); ``warnings``: messages (e.g. ``m``
    too small for some layers); ``estimator``, ``index``, ``kind``, ``debiased``.
    """

    def __new__(cls, matrix, layers_a, layers_b, *, error=None, warnings=(), estimator="sketch",
                index="cka", kind="hadamard", debiased=False):
        out = super().__new__(cls, (matrix, list(layers_a), list(layers_b)))
        out.error, out.warnings = error, list(warnings)
        out.estimator, out.index, out.kind, out.debiased = estimator, index, kind, debiased
        return out

    matrix = property(lambda self: self[0])
    layers_a = property(lambda self: self[1])
    layers_b = property(lambda self: self[2])


def check_comparable(a, b) -> None:
    """Sketched representations are comparable when they share m, seed and sparsity."""
    SketchSpec.comparable(a, b)


def _is_exact(rep) -> bool:
    from .exact import ExactRepresentation
    return isinstance(rep, ExactRepresentation)


def _pick_estimator(estimator: Optional[str], reps: Sequence) -> str:
    exact = [_is_exact(rep) for rep in reps]
    if estimator is None:
        estimator = "exact" if all(exact) else "sketch"
    if estimator == "joint":
        raise ValueError("estimator='joint' runs both models over the same batches and keeps no "
                         "representation: call nnsim_fast.compare_models(model_a, model_b, data)")
    check_choice(estimator, "estimator", ESTIMATORS)
    if (estimator == "exact") != all(exact) or any(exact) != all(exact):
        raise TypeError(f"estimator={estimator!r} needs "
                        + ("exact representations (nnsim_fast.exact_model)" if estimator == "exact"
                           else "sketched representations (nnsim_fast.sketch_model)")
                        + f", got {[type(r).__name__ for r in reps]}")
    return estimator


def _centering(estimator: str, centering: Optional[str]) -> str:
    default = {"plugin": "data", "paper": "buckets"}.get(estimator)
    if centering is None:
        return default or "data"
    if default is None:
        raise ValueError(f"centering= applies to estimator='plugin' or 'paper'; "
                         f"estimator={estimator!r} always centres over the data")
    return check_choice(centering, "centering", ("none", "buckets", "data"))


def _split_layers(layers: LayerSpec) -> Tuple:
    """``(layers_a, layers_b)``: a pair of lists is per side; a name or list is for both."""
    if isinstance(layers, tuple) and len(layers) == 2 and \
            not any(isinstance(side, str) for side in layers):
        return layers
    return layers, layers


def similarity(rep_a, rep_b, index: str = "cka", kind: str = "hadamard", layers: LayerSpec = None,
               *, estimator: Optional[str] = None, debiased: bool = False,
               centering: Optional[str] = None) -> SimilarityResult:
    """Similarity of every layer of ``rep_a`` with every layer of ``rep_b``.

    Args:
        rep_a, rep_b: two sketched representations (same m, seed and sparsity; the
            datasets may differ) or two exact ones (the same rows).
        index: ``"cka"`` or ``"nbs"``; similarities in [0, 1] (debiased CKA in [-1, 1]).
        kind: kernel kind (:mod:`nnsim_fast.kernels`); default the paper's
            ``"hadamard"``, K = K_f o K_g.
        layers: None (all layers of each), one name or a list of names for both, or a
            2-tuple of lists ``(layers_a, layers_b)``.
        estimator: see the module docstring; default ``"sketch"`` for sketched and
            ``"exact"`` for exact representations.
        debiased: target the debiased (U-statistic HSIC) CKA instead of the plain
            centred CKA (CKA only).
        centering: for ``estimator="plugin"`` / ``"paper"`` only: ``"data"``,
            ``"buckets"`` or ``"none"``.

    Returns:
        a :class:`SimilarityResult`: ``matrix, layers_a, layers_b = result``, plus
        ``result.error`` (standard errors) and ``result.warnings``.
    """
    explicit = estimator is not None
    estimator = _pick_estimator(estimator, (rep_a, rep_b))
    check_choice(index, "index", INDICES)
    debiased = check_bool(debiased, "debiased")
    centering = _centering(estimator, centering)
    spec_a, spec_b = _split_layers(layers)
    if estimator == "exact":
        from .exact import exact_similarity
        matrix, names_a, names_b = exact_similarity(rep_a, rep_b, index, kind, (spec_a, spec_b),
                                                    debiased=debiased)
        return SimilarityResult(matrix, names_a, names_b, error=torch.zeros_like(matrix),
                                estimator=estimator, index=index, kind=kind, debiased=debiased)
    check_comparable(rep_a, rep_b)
    names_a, names_b = rep_a._resolve(spec_a), rep_b._resolve(spec_b)
    notes: List[str] = []
    if estimator == "sketch" and not _same_rows(rep_a, rep_b):
        estimator, centering, notes = _different_rows(rep_a, rep_b, explicit)
    if estimator == "sketch":
        matrix, error, notes = _sketch_estimate(rep_a, rep_b, names_a, names_b, index, kind,
                                                debiased)
    else:
        matrix, error = _kernel_estimate(rep_a, rep_b, names_a, names_b, index, kind,
                                         debiased, centering), None
    return SimilarityResult(matrix, names_a, names_b, error=error, warnings=notes,
                            estimator=estimator, index=index, kind=kind, debiased=debiased)


def _same_rows(rep_a, rep_b) -> bool:
    """Both representations sketched the same row keys (the estimators' target, the exact
    CKA over N x N pairs, is defined only on one set of rows)."""
    return rep_a.n == rep_b.n and rep_a.rows.intervals == rep_b.rows.intervals


def _different_rows(rep_a, rep_b, explicit: bool) -> Tuple[str, str, List[str]]:
    """Representations of different rows (e.g. two datasets): no exact N x N counterpart
    exists, so the default falls back to the plug-in of the sketched kernels."""
    what = (f"rep_a and rep_b hold different rows (n = {rep_a.n} and {rep_b.n}, or other row "
            "keys)")
    if explicit:
        raise ValueError(f"estimator='sketch' estimates the exact CKA/NBS over one set of rows; "
                         f"{what}. Use estimator='plugin' to compare the sketched kernels of "
                         "different datasets")
    note = (f"{what}: the collision-corrected estimator needs one set of rows, so this result "
            "is estimator='plugin' (the index of the data-centred m x m sketched kernels)")
    warnings.warn(note, DifferentRowsWarning, stacklevel=3)
    return "plugin", "data", [note]


def _kernel_estimate(rep_a, rep_b, names_a, names_b, index, kind, debiased, centering):
    """``plugin`` / ``paper``: the index of the m x m sketched kernels as they are."""
    if index == "nbs" and debiased:
        raise ValueError("debiased=True applies to index='cka' only")
    Ks_a = rep_a.kernels(names_a, kind=kind, centering=centering)
    Ks_b = rep_b.kernels(names_b, kind=kind, centering=centering).to(Ks_a.device)
    # The kernels arrive centred (or deliberately uncentred): the plain index must not
    # re-centre; the debiased one U-centres, which ignores any centring done before.
    if index == "cka":
        return indices.cka_matrix(Ks_a, Ks_b, centered=debiased, debiased=debiased)
    return indices.nbs_matrix(Ks_a, Ks_b, centered=False)


def _sketch_estimate(rep_a, rep_b, names_a, names_b, index, kind, debiased):
    grams_a = rep_a.grams(names_a, kind)
    grams_b = grams_a if rep_b is rep_a and names_b == names_a else rep_b.grams(names_b, kind)
    # The psi halves (kind "hadamard" / "psi") have their own buckets, psi_buckets.
    option = "psi_buckets" if kind in ("hadamard", "psi") else "m"
    buckets = int(grams_a.ones.shape[-1])
    if index == "nbs":
        if debiased:
            raise ValueError("debiased=True applies to index='cka' only")
        return (estimators.nbs_matrix(grams_a, grams_b), None,
                _nbs_notes(grams_a, grams_b, buckets, option))
    matrix, error = estimators.cka_matrix(grams_a, grams_b, debiased=debiased)
    notes = _resolution_notes(error, names_a, names_b, buckets, option)
    return matrix, error, notes


def _resolution_notes(error: torch.Tensor, names_a, names_b, m: int, option: str = "m"
                      ) -> List[str]:
    flagged = estimators.resolution_warnings(error)
    if not bool(flagged.any()):
        return []
    worst = float(error.masked_fill(~torch.isfinite(error), math.inf).max())
    pairs = [(names_a[i], names_b[j]) for i, j in flagged.nonzero().tolist()]
    shown = ", ".join(f"({a}, {b})" for a, b in pairs[:4]) + (" ..." if len(pairs) > 4 else "")
    larger = estimators.suggested_m(worst, m)
    advice = f"a larger {option}" if larger is None else \
        f"{option}={larger} (the error falls like 1/sqrt({option}) or faster)"
    note = (f"{option}={m} is too small for {len(pairs)} layer pair(s) {shown}: standard error up to "
            f"{worst:.3g} (> {estimators.RESOLUTION_TOLERANCE}); sketch with {advice}, check "
            "a subset with estimator='exact', or, with both models at hand, use "
            "compare_models (CKA from exact within-block pairs)")
    warnings.warn(note, ResolutionWarning, stacklevel=4)
    return [note]


def _nbs_notes(grams_a, grams_b, m: int, option: str = "m") -> List[str]:
    ranks = torch.cat([estimators.effective_rank(grams_a), estimators.effective_rank(grams_b)])
    if not bool((ranks > m).any()):
        return []
    note = (f"NBS from sketches is biased upwards when a layer's effective rank exceeds "
            f"{option}={m} "
            f"(largest here: {float(ranks.max()):.0f}); prefer index='cka', or check NBS with "
            "estimator='exact' on a subset")
    warnings.warn(note, ResolutionWarning, stacklevel=4)
    return [note]


def similarity_matrix(reps: Sequence, layer: Union[str, Sequence[str]], index: str = "cka",
                      kind: str = "hadamard", *, estimator: Optional[str] = None,
                      debiased: bool = False, centering: Optional[str] = None,
                      with_error: bool = False):
    """Model x model similarity ``[R, R]`` at one layer (one name, or one name per model).

    Same options as :func:`similarity`.  Returns the matrix, or ``(matrix, error)`` with
    ``with_error=True`` (``error`` is None where the estimator gives none).
    """
    reps = list(reps)
    if not reps:
        raise ValueError("reps is empty")
    names = [layer] * len(reps) if isinstance(layer, str) else list(layer)
    if len(names) != len(reps):
        raise ValueError(f"layer names one layer per representation: got {len(names)} names "
                         f"for {len(reps)} representations")
    if _pick_estimator(estimator, reps) == "exact":
        from .exact import exact_similarity_matrix
        matrix = exact_similarity_matrix(reps, names, index, kind, debiased=debiased)
        return (matrix, torch.zeros_like(matrix)) if check_bool(with_error, "with_error") else matrix
    estimator_name = _pick_estimator(estimator, reps)
    if estimator_name == "sketch" and all(_same_rows(reps[0], rep) for rep in reps[1:]):
        matrix, error = _stacked_sketch(reps, names, index, kind, debiased, centering)
        return (matrix, error) if check_bool(with_error, "with_error") else matrix
    size = len(reps)
    matrix = torch.eye(size, dtype=torch.float64)
    error: Optional[torch.Tensor] = torch.zeros(size, size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResolutionWarning)
        for i in range(size):
            for j in range(i, size):
                result = similarity(reps[i], reps[j], index, kind, ([names[i]], [names[j]]),
                                    estimator=estimator, debiased=debiased, centering=centering)
                matrix[i, j] = matrix[j, i] = result.matrix[0, 0]
                if result.error is None:
                    error = None
                elif error is not None:
                    error[i, j] = error[j, i] = result.error[0, 0]
    return (matrix, error) if check_bool(with_error, "with_error") else matrix


def _stacked_sketch(reps, names, index: str, kind: str, debiased, centering):
    """The default estimator for many representations of one set of rows: each one's Gram
    summary built once, and every pair estimated from the stack (``[R, R]``)."""
    check_choice(index, "index", INDICES)
    debiased = check_bool(debiased, "debiased")
    _centering("sketch", centering)
    for rep in reps[1:]:
        check_comparable(reps[0], rep)
    grams = estimators.stack_grams([rep.grams([name], kind) for rep, name in zip(reps, names)])
    labels = [f"reps[{i}].{name}" for i, name in enumerate(names)]
    if index == "nbs":
        if debiased:
            raise ValueError("debiased=True applies to index='cka' only")
        _nbs_notes(grams, grams, reps[0].m)
        return estimators.nbs_matrix(grams), None
    matrix, error = estimators.cka_matrix(grams, debiased=debiased)
    _resolution_notes(error, labels, labels, reps[0].m)
    return matrix, error


def mean_embedding_norm(rep, layer: str) -> Dict[str, float]:
    """Kernel mean embedding quantities of the paper's kernel at ``layer`` (section 5.3).

    Returns a dict with
      ``norm``: ``||mu_p|| = ||(1/N) sum_i g_i f_i^T||_F`` (exact; a sketched
        representation needs ``mean_embedding=True``),
      ``trace_factor``: ``sqrt(Tr K) / N`` (exact),
      ``frobenius_factor``: ``||K||_F / N^2`` -- exact for an exact representation;
        for a sketched one an unbiased estimate of ``||K||_F^2`` from the two
        TensorSketch halves of psi with the collision terms removed (the N x N
        kernel is never formed),
      ``ratio_frobenius`` and ``ratio_trace`` (eq. 19) and ``log_ratio_frobenius``
      (eq. 48) -- with the conventions of :func:`nnsim_fast.indices.mean_embedding_ratios`
      (a zero kernel gives ratios 0.0 and a log of ``-inf``).
    """
    if _is_exact(rep):
        from .exact import exact_mean_embedding
        return exact_mean_embedding(rep, layer)
    entry = rep.layer(layer)
    if entry.mean_psi is None:
        raise ValueError("mean_embedding_norm needs the exact mean embedding; sketch with "
                         "sketch_model(..., mean_embedding=True)")
    n = rep.n
    norm = float(torch.linalg.matrix_norm(entry.mean_psi.to(torch.float64))) / n
    trace_factor = math.sqrt(max(float(entry.trace), 0.0)) / n
    frob = math.sqrt(max(_kernel_frobenius_sq(rep, layer), 0.0)) / n ** 2
    return indices.mean_embedding_scores(norm, frob, trace_factor)


def _kernel_frobenius_sq(rep: Representation, layer: str) -> float:
    """Unbiased ``||K||_F^2`` of the UNcentred paper kernel from the psi halves."""
    from .estimators import centred_gram
    stats = rep.layer(layer)
    if stats.sketch_psi is None:
        raise ValueError("the Frobenius factor needs the psi statistics; sketch with psi=True")
    # Zero column sums: "centring" by a zero mean leaves the kernel uncentred.
    gram = centred_gram(stats.sketch_psi.to(torch.float64), torch.zeros_like(stats.sum_psi),
                        stats.psi_ones,
                        rep.n, stats.sketch_sqnorm_psi.expand(2, -1),
                        stats.trace.reshape(1).expand(2), rep.sparsity)
    return float(estimators.hsic_matrix(gram)[0, 0]) * (rep.n - 1) ** 2
