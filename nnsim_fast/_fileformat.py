"""Field-by-field validation of a representation file's metadata and tensors.

A file is trusted only after every field has its type and range, every
tensor its expected name, shape and dtype (from the statistics table), every
value is finite, the row intervals are canonical and count exactly ``n`` rows,
and layer indices are unique -- so a crafted or corrupted file is refused with
a message naming the field instead of loading as wrong numbers or asking for a
huge allocation later.
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping

import torch

from .state import LayerStats, RowSet, enabled_stats, stat_shape

_MAX_ROW = (1 << 62) - 1
_MAX_WIDTH = 1 << 40
_OPTION_TYPES = {"gradients": bool, "psi_dim": int, "psi_buckets": int, "product": bool,
                 "mean_embedding": bool}
#: Older formats this version reads (upgraded in memory by :func:`upgrade`).
READABLE_FORMATS = (2,)


class _Bad(ValueError):
    pass


def _int(value, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Bad(f"{field} must be an integer in [{low}, {high}], got {value!r}")
    return value


def parse_metadata(header: Mapping[str, str], path, version: int, key: str) -> Dict:
    from ._version import __version__
    if key not in header:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a nnsim_fast representation")
    try:
        meta = json.loads(header[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r}: corrupt representation metadata ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r}: corrupt representation metadata (not a mapping)")
    if meta.get("format") != version and meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{str(path)!r} has representation format {meta.get('format')!r}; this "
                         f"nnsim_fast (version {__version__}) reads format {version}; re-sketch "
                         "with this version")
    return meta


def upgrade(tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
    """Bring format-2 ``(tensors, meta)`` to the current format, in place (after the checksums
    were verified).  Format 2 kept the psi halves at the ``m`` buckets of ``S``: they become
    ``psi_buckets = m`` with ``S_p 1 = S 1`` and the bucket loads of ``S``; the sketched
    diagonal of ``K`` moves to the psi group."""
    if meta.get("format") != 2:
        return
    options, layers = meta.get("options"), meta.get("layers")
    if not isinstance(options, dict) or not isinstance(layers, dict):
        return                          # the validation of the rebuild reports it
    psi_on = bool(options.get("psi_dim")) and bool(options.get("gradients"))
    options["psi_buckets"] = meta.get("m") if psi_on else 0
    ones = tensors.get("sketch_ones")
    for info in layers.values():
        index = info.get("index") if isinstance(info, dict) else None
        prefix = f"layer{index}."
        if not psi_on:
            tensors.pop(prefix + "sketch_sqnorm_psi", None)
        elif ones is not None and prefix + "counts" in tensors:
            tensors[prefix + "psi_ones"] = ones.reshape(-1)
            tensors[prefix + "psi_counts"] = tensors[prefix + "counts"].clone()
    meta["format"] = 3


def _check_options(options) -> Dict:
    if not isinstance(options, dict) or set(options) != set(_OPTION_TYPES):
        raise _Bad(f"options must be a mapping with keys {sorted(_OPTION_TYPES)}, got {options!r}")
    for name, kind in _OPTION_TYPES.items():
        value = options[name]
        if kind is bool and not isinstance(value, bool):
            raise _Bad(f"option {name} must be true or false, got {value!r}")
        if kind is int:
            _int(value, f"option {name}", 0, (1 << 31) - 1 if name == "psi_buckets" else 1 << 24)
    return options


def _check_rows(meta: Dict) -> RowSet:
    n = _int(meta["n"], "n", 0, _MAX_ROW)
    intervals = meta["row_intervals"]
    if not isinstance(intervals, list):
        raise _Bad("row_intervals must be a list")
    previous = -1
    for item in intervals:
        if not (isinstance(item, list) and len(item) == 2):
            raise _Bad(f"row interval {item!r} is not a [start, stop) pair")
        start = _int(item[0], "row interval start", 0, _MAX_ROW)
        stop = _int(item[1], "row interval stop", 1, _MAX_ROW + 1)
        if stop <= start or start <= previous:
            raise _Bad("row intervals must be non-empty, sorted, disjoint and non-adjacent")
        previous = stop
    rows = RowSet(intervals)
    if rows.count() != n:
        raise _Bad(f"the row intervals hold {rows.count()} rows but n is {n}")
    if meta["row_keys"] not in (None, "stream", "index") or (meta["row_keys"] is None) != (n == 0):
        raise _Bad(f"row_keys {meta['row_keys']!r} does not fit n = {n}")
    return rows


def _check_dims(name: str, info, options: Dict) -> Dict[str, int]:
    dims = info.get("dims") if isinstance(info, dict) else None
    if not isinstance(dims, dict) or set(dims) != {"df", "dg", "w"}:
        raise _Bad(f"layer {name!r}: dims must be a mapping with df, dg and w")
    df = _int(dims["df"], f"layer {name!r} df", 1, _MAX_WIDTH)
    dg = _int(dims["dg"], f"layer {name!r} dg", 0, _MAX_WIDTH)
    w = _int(dims["w"], f"layer {name!r} w", 0, _MAX_WIDTH)
    if (dg > 0) != options["gradients"]:
        raise _Bad(f"layer {name!r}: dg = {dg} does not fit gradients = {options['gradients']}")
    if (w > 0) != bool(options["psi_dim"] and options["gradients"]) or \
            w > max(options["psi_dim"], 0) and w != df * dg:
        raise _Bad(f"layer {name!r}: psi width {w} does not fit psi_dim = {options['psi_dim']}")
    shape = info.get("feature_shape")
    if not isinstance(shape, list) or len(shape) > 8 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= _MAX_WIDTH
                    for d in shape):
        raise _Bad(f"layer {name!r}: feature_shape {shape!r} is not a list of positive sizes")
    return {"df": df, "dg": dg, "w": w}


def _layer_tensors(name: str, index: int, dims: Dict[str, int], stats, dtype, m: int, mp: int,
                   tensors: Mapping[str, torch.Tensor], used: List[str]) -> Dict[str, torch.Tensor]:
    values = {}
    for stat in stats:
        key = f"layer{index}.{stat.name}"
        if key not in tensors:
            raise _Bad(f"layer {name!r} lacks {stat.name}")
        value = tensors[key]
        want_shape = stat_shape(stat, dict(dims, m=m, mp=mp))
        want_dtype = torch.float64 if stat.exact else dtype
        if tuple(value.shape) != want_shape or value.dtype != want_dtype:
            raise _Bad(f"layer {name!r}: {stat.name} is {value.dtype} {tuple(value.shape)}, "
                       f"expected {want_dtype} {want_shape}")
        if not bool(torch.isfinite(value).all()):
            raise _Bad(f"layer {name!r}: {stat.name} holds non-finite values")
        values[stat.name] = value
        used.append(key)
    return values


def rebuild(cls, tensors: Mapping[str, torch.Tensor], meta, device):
    """A representation from validated ``(tensors, meta)``; ``ValueError`` names what is wrong."""
    def bad(why: str) -> ValueError:
        return ValueError(f"corrupt representation: {why}")

    if not isinstance(meta, dict):
        raise bad(f"metadata is a {type(meta).__name__}, not a mapping")
    required = ("m", "seed", "sparsity", "n", "dtype", "options", "row_keys", "row_intervals",
                "layers")
    missing = [key for key in required if key not in meta]
    if missing:
        raise bad(f"metadata lacks {missing}")
    try:
        return _rebuild(cls, tensors, meta, device)
    except _Bad as error:
        raise bad(str(error)) from None


def _rebuild(cls, tensors, meta, device):
    if meta["dtype"] not in ("float32", "float64"):
        raise _Bad(f"accumulator dtype {meta['dtype']!r}")
    options = _check_options(meta["options"])
    user_meta = meta.get("meta") or {}
    if not isinstance(user_meta, dict):
        raise _Bad("meta must be a mapping")
    try:
        rep = cls(_int(meta["m"], "m", 1, (1 << 31) - 1), _int(meta["seed"], "seed", 0, (1 << 63) - 1),
                  _int(meta["sparsity"], "sparsity", 1, 32), dtype=getattr(torch, meta["dtype"]),
                  device=device, gradients=options["gradients"], psi=bool(options["psi_dim"]),
                  psi_dim=options["psi_dim"] or None, psi_buckets=options["psi_buckets"] or None,
                  product=options["product"],
                  mean_embedding=options["mean_embedding"], meta=user_meta)
    except (TypeError, ValueError) as error:
        raise _Bad(str(error)) from None
    if rep.options != options:
        raise _Bad(f"options {options} are inconsistent (they imply {rep.options})")
    rep.meta = dict(user_meta)
    rep.rows, rep.n, rep.row_keys = _check_rows(meta), meta["n"], meta["row_keys"]
    ones = tensors.get("sketch_ones")
    if ones is None or tuple(ones.shape) != (rep.m, 1) or ones.dtype != torch.float64 or \
            not bool(torch.isfinite(ones).all()):
        raise _Bad(f"sketch_ones missing or not a finite float64 tensor of shape ({rep.m}, 1)")
    rep.sketch_ones = ones.to(rep.device)
    rep.layers = _rebuild_layers(rep, tensors, meta["layers"], options)
    return rep


def _rebuild_layers(rep, tensors, layers, options) -> Dict[str, LayerStats]:
    if not isinstance(layers, dict):
        raise _Bad("the layer table is not a mapping")
    indices = [info.get("index") if isinstance(info, dict) else None for info in layers.values()]
    if sorted(i for i in indices if isinstance(i, int)) != list(range(len(layers))):
        raise _Bad(f"layer indices {indices} are not 0..{len(layers) - 1}, each used once")
    stats = enabled_stats(options)
    used: List[str] = ["sketch_ones"]
    out: Dict[str, LayerStats] = {}
    for name, info in sorted(layers.items(), key=lambda item: item[1]["index"]):
        if not isinstance(name, str) or not name:
            raise _Bad(f"layer name {name!r}")
        dims = _check_dims(name, info, options)
        values = _layer_tensors(name, info["index"], dims, stats, rep.dtype, rep.m,
                                rep.options["psi_buckets"], tensors, used)
        out[name] = LayerStats({k: v.to(rep.device) for k, v in values.items()}, dims,
                               tuple(info["feature_shape"]))
    extra = sorted(set(tensors) - set(used))
    if extra:
        raise _Bad(f"unexpected tensors {extra[:5]}")
    if rep.n == 0 and out:
        raise _Bad("layers without any rows")
    return out
