"""Python face of the native ops: checks, autograd, fake kernels, reference path.

Every op has a pure-PyTorch reference (``reference_*``) that computes the same
sketch as the native kernels, bucket for bucket and sign for sign.  It serves
as the test oracle and as the fallback when the extension is missing.

The sketch matrix S (m x n) is a CountSketch (``sparsity=1``) or an OSNAP-style
sparse embedding with ``sparsity`` blocks of ``m // sparsity`` buckets, values
``sign / sqrt(sparsity)``.  Row ``i`` of a call has global index
``offset + i``, or ``offset + rows[i]`` when ``rows`` is given; the hash of the
global index alone decides its buckets and signs, so the same seed gives the
same S on any device, batch size, thread count or sharding.  No ``1/sqrt(m)``
scaling is applied (similarity indices are scale invariant).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Tuple

import torch

from ._checks import check_int as _check_int

__all__ = [
    "native_available", "sketch_hash", "countsketch", "countsketch_pair",
    "countsketch_pair_", "countsketch_", "hadamard_gram", "sketch_matrix",
    "reference_sketch_hash", "reference_countsketch", "reference_countsketch_pair_",
    "reference_hadamard_gram",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_BLOCK_STRIDE = 0xD1B54A32D192ED03
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
MAX_SPARSITY = 32
MAX_BUCKETS = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1
SKETCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:
    from . import _C  # noqa: F401  (registers torch.ops.nnsim_fast.*)
    _NATIVE = True
    _NATIVE_ERROR: Optional[BaseException] = None
except Exception as error:  # ImportError, or an ABI mismatch surfacing as OSError
    _NATIVE = False
    _NATIVE_ERROR = error
    warnings.warn(
        f"nnsim_fast: native extension unavailable ({error}); using the pure-PyTorch "
        "reference ops, which are correct but slower. Rebuild with "
        "`pip install --no-build-isolation -e .` to get the native kernels.",
        RuntimeWarning, stacklevel=2)


def native_available() -> bool:
    """True when the C++/CUDA extension loaded and the ``torch.ops.nnsim_fast`` ops exist."""
    return _NATIVE


def cuda_ops_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _NATIVE and bool(getattr(_C, "built_with_cuda", False))


# --------------------------------------------------------------------------- checks

def _check_sketch_args(m, seed, offset, sparsity) -> Tuple[int, int, int, int]:
    m = _check_int(m, "m", 1, MAX_BUCKETS)
    seed = _check_int(seed, "seed", 0, MAX_SEED)
    offset = _check_int(offset, "offset", 0, MAX_SEED)
    sparsity = _check_int(sparsity, "sparsity", 1, MAX_SPARSITY)
    if m % sparsity:
        raise ValueError(f"sparsity ({sparsity}) must divide m ({m})")
    return m, seed, offset, sparsity


def _check_row_range(n: int, offset: int, rows) -> None:
    """Stream rows offset .. offset + n - 1 must be valid int64 row numbers."""
    if rows is None and n and offset > MAX_SEED - (n - 1):
        raise ValueError(f"offset ({offset}) + n ({n}) exceeds the int64 row range")


def _check_matrix(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in SKETCH_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_rows(rows, n: int, device: torch.device) -> None:
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a torch.Tensor of int64 row indices, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if rows.dim() != 1 or rows.shape[0] != n:
        raise ValueError(f"rows must be a 1-D tensor of length {n}, got shape {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"rows is on {rows.device} but the data is on {device}")
    # Reading device values would make the host wait for the GPU on every call:
    # the native CUDA ops check the values themselves, once per rows tensor.
    # Only CPU values (and any values on the pure-PyTorch path) are read here,
    # and never while tracing: that would break a torch.compile graph.
    if rows.device.type != "cpu" and _NATIVE:
        return
    if n and not torch.compiler.is_compiling() and bool((rows < 0).any()):
        raise ValueError("rows must be non-negative row indices")


def _check_pair(f, g) -> None:
    _check_matrix(f, "f")
    _check_matrix(g, "g")
    if f.shape[0] != g.shape[0]:
        raise ValueError(f"f and g must have the same number of rows, got {tuple(f.shape)} and "
                         f"{tuple(g.shape)}")
    if f.dtype != g.dtype:
        raise TypeError(f"f and g must have the same dtype, got {f.dtype} and {g.dtype}")
    if f.device != g.device:
        raise ValueError(f"f is on {f.device} but g is on {g.device}")


def _check_accumulator(acc, x: torch.Tensor, name: str) -> None:
    """A streaming accumulator for ``x``: contiguous float32/float64 ``[m, d]`` on x's device."""
    if not isinstance(acc, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(acc).__name__}")
    if acc.dim() != 2 or acc.shape[1] != x.shape[1]:
        raise ValueError(f"{name} must have shape [m, {x.shape[1]}], got {tuple(acc.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {acc.dtype}")
    if not acc.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if acc.device != x.device:
        raise ValueError(f"{name} is on {acc.device} but the data is on {x.device}")


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    start = t.storage_offset() * t.element_size()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory a and b may touch intersects (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _check_no_aliasing(acc_f, acc_g, f, g, rows) -> None:
    """An accumulator written while it is read (or written twice) gives garbage, silently."""
    if torch.compiler.is_compiling():   # storage pointers cannot be traced; eager calls check
        return
    named = (("acc_f", acc_f), ("acc_g", acc_g), ("f", f), ("g", g), ("rows", rows))
    for i, (name_a, a) in enumerate(named[:2]):
        for name_b, b in named[i + 1:]:
            if b is not None and _overlap(a, b):
                raise ValueError(f"{name_a} shares memory with {name_b}; the accumulators must "
                                 "not overlap each other or the inputs (pass a copy)")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _dispatch_context(*tensors: torch.Tensor):
    """Skip the (Python) autograd kernel when no gradient can flow: it costs a few
    microseconds per call, which small calls notice.  Eager mode only."""
    if (_BELOW_AUTOGRAD is None or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return contextlib.nullcontext()
    return _BELOW_AUTOGRAD()


def _deterministic(flag: Optional[bool]) -> bool:
    if flag is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic must be a bool or None, got {type(flag).__name__}")
    return flag


# --------------------------------------------------------------------------- reference

def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64, so this matches the uint64 code in csrc/hash.h.
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def block_keys(seed: int, sparsity: int) -> list:
    """The per-block hash keys (as Python ints in [0, 2^64)) of csrc/hash.h."""
    return [_mix64(seed ^ ((_BLOCK_STRIDE * (j + 1)) & _MASK64)) for j in range(sparsity)]


def reference_sketch_hash(rows: torch.Tensor, m: int, seed: int, sparsity: int = 1
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64 [n, s]) and signs (float32 +-1, [n, s]) of global rows ``rows``."""
    width = m // sparsity
    counter = (rows.to(torch.int64) + 1) * _signed(_GOLDEN)
    buckets, signs = [], []
    for j, key in enumerate(block_keys(seed, sparsity)):
        h = _mix64_tensor(counter + _signed(key))
        buckets.append(j * width + ((_srl(h, 32) * width) >> 32))
        signs.append(1.0 - 2.0 * (h & 1).to(torch.float32))
    return torch.stack(buckets, dim=1), torch.stack(signs, dim=1)


def _global_rows(n: int, offset: int, rows: Optional[torch.Tensor], device) -> torch.Tensor:
    if rows is None:
        return torch.arange(n, dtype=torch.int64, device=device) + offset
    return rows + offset


def reference_countsketch_pair_(acc_f: torch.Tensor, acc_g: Optional[torch.Tensor],
                                f: torch.Tensor, g: Optional[torch.Tensor], seed: int,
                                offset: int = 0, sparsity: int = 1,
                                rows: Optional[torch.Tensor] = None) -> None:
    """acc += S x for x in (f, g), in place, in the accumulators' dtype (index_add_)."""
    m = acc_f.shape[0]
    buckets, signs = reference_sketch_hash(_global_rows(f.shape[0], offset, rows, f.device),
                                           m, seed, sparsity)
    scale = 1.0 / math.sqrt(sparsity)
    for acc, x in ((acc_f, f), (acc_g, g)):
        if acc is None or x.shape[0] == 0:
            continue
        xs = x.to(acc.dtype)
        for j in range(sparsity):
            values = (signs[:, j].to(acc.dtype) * scale).unsqueeze(1)
            acc.index_add_(0, buckets[:, j], xs * values)


def reference_countsketch(x: torch.Tensor, m: int, seed: int, offset: int = 0,
                          sparsity: int = 1, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S x with S the m x n sketch; differentiable through index_add_."""
    out = torch.zeros(m, x.shape[1], dtype=_accumulate_dtype(x.dtype), device=x.device)
    reference_countsketch_pair_(out, None, x, None, seed, offset, sparsity, rows)
    return out


def reference_hadamard_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a a^T) o (b b^T), batched, with torch.bmm."""
    dtype = _accumulate_dtype(a.dtype)
    a, b = a.to(dtype), b.to(dtype)
    return torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))


# --------------------------------------------------------------------------- public ops

def sketch_hash(n: int, m: int, seed: int, offset: int = 0, sparsity: int = 1, *,
                rows: Optional[torch.Tensor] = None, device=None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of ``n`` rows: ``(buckets int64 [n, s], signs float32 [n, s])``.

    Row ``i`` has global index ``offset + i`` (or ``offset + rows[i]``); its ``s``
    buckets are one per block of ``m // s`` buckets.  Signs are +-1 (the ops
    additionally scale values by ``1/sqrt(s)``).
    """
    n = _check_int(n, "n", 0, MAX_SEED)
    m, seed, offset, sparsity = _check_sketch_args(m, seed, offset, sparsity)
    device = torch.device(device) if device is not None else (
        rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu"))
    _check_rows(rows, n, device)
    if rows is not None and n and bool((rows < 0).any()):   # any device: not a hot path
        raise ValueError("rows must be non-negative row indices")
    _check_row_range(n, offset, rows)
    global_rows = _global_rows(n, offset, rows, device)
    if _NATIVE:
        return torch.ops.nnsim_fast.sketch_hash.default(global_rows, m, seed, sparsity)
    return reference_sketch_hash(global_rows, m, seed, sparsity)


def sketch_matrix(n: int, m: int, seed: int, offset: int = 0, sparsity: int = 1, *,
                  rows: Optional[torch.Tensor] = None, dtype=torch.float64, device=None
                  ) -> torch.Tensor:
    """The dense m x n sketch matrix S (for tests and small problems)."""
    buckets, signs = sketch_hash(n, m, seed, offset, sparsity, rows=rows, device=device)
    S = torch.zeros(m, n, dtype=dtype, device=buckets.device)
    cols = torch.arange(n, device=buckets.device).unsqueeze(1).expand_as(buckets)
    S.index_put_((buckets, cols), signs.to(dtype) / math.sqrt(sparsity), accumulate=True)
    return S


def countsketch(x: torch.Tensor, m: int, seed: int, offset: int = 0, sparsity: int = 1, *,
                rows: Optional[torch.Tensor] = None, deterministic: Optional[bool] = None
                ) -> torch.Tensor:
    """CountSketch of the rows of ``x``: ``S x``, shape ``[m, d]``.

    ``y[b] = sum over rows i hashed to b of sign(i) * x[i]`` (times ``1/sqrt(s)``
    per block when ``sparsity = s > 1``).  float16/bfloat16/float32 inputs give
    float32, float64 gives float64.  Differentiable in ``x``.
    """
    _check_matrix(x, "x")
    m, seed, offset, sparsity = _check_sketch_args(m, seed, offset, sparsity)
    _check_rows(rows, x.shape[0], x.device)
    _check_row_range(x.shape[0], offset, rows)
    det = _deterministic(deterministic)
    if _NATIVE:
        with _dispatch_context(x):
            return torch.ops.nnsim_fast.countsketch.default(x, m, seed, offset, sparsity, rows=rows,
                                                            deterministic=det)
    return reference_countsketch(x, m, seed, offset, sparsity, rows)


def countsketch_pair(f: torch.Tensor, g: torch.Tensor, m: int, seed: int, offset: int = 0,
                     sparsity: int = 1, *, rows: Optional[torch.Tensor] = None,
                     deterministic: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(S f, S g)`` with one hash evaluation per row and one pass over the data."""
    _check_pair(f, g)
    m, seed, offset, sparsity = _check_sketch_args(m, seed, offset, sparsity)
    _check_rows(rows, f.shape[0], f.device)
    _check_row_range(f.shape[0], offset, rows)
    det = _deterministic(deterministic)
    if _NATIVE:
        with _dispatch_context(f, g):
            return torch.ops.nnsim_fast.countsketch_pair.default(f, g, m, seed, offset, sparsity,
                                                                 rows=rows, deterministic=det)
    return (reference_countsketch(f, m, seed, offset, sparsity, rows),
            reference_countsketch(g, m, seed, offset, sparsity, rows))


def countsketch_pair_(acc_f: torch.Tensor, acc_g: torch.Tensor, f: torch.Tensor,
                      g: torch.Tensor, seed: int, offset: int = 0, sparsity: int = 1, *,
                      rows: Optional[torch.Tensor] = None, deterministic: Optional[bool] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Streaming update ``acc_f += S f``, ``acc_g += S g`` in place; returns the accumulators.

    ``acc_f`` [m, df] and ``acc_g`` [m, dg] are contiguous float32 or float64
    (the caller chooses the accumulation precision).  Not differentiable.
    """
    _check_pair(f, g)
    _check_accumulator(acc_f, f, "acc_f")
    _check_accumulator(acc_g, g, "acc_g")
    if acc_f.shape[0] != acc_g.shape[0]:
        raise ValueError(f"acc_f and acc_g must have the same m, got {tuple(acc_f.shape)} and "
                         f"{tuple(acc_g.shape)}")
    if acc_f.dtype != acc_g.dtype:
        raise TypeError(f"acc_f and acc_g must have the same dtype, got {acc_f.dtype} and "
                        f"{acc_g.dtype}")
    _, seed, offset, sparsity = _check_sketch_args(acc_f.shape[0], seed, offset, sparsity)
    _check_rows(rows, f.shape[0], f.device)
    _check_row_range(f.shape[0], offset, rows)
    _check_no_aliasing(acc_f, acc_g, f, g, rows)
    det = _deterministic(deterministic)
    if _NATIVE:
        torch.ops.nnsim_fast.countsketch_pair_.default(acc_f, acc_g, f, g, seed, offset, sparsity,
                                                       rows=rows, deterministic=det)
        # The op writes through raw pointers: tell autograd the accumulators changed,
        # so a graph that saved them refuses to backpropagate through stale values.
        for acc in (acc_f, acc_g):
            torch.autograd.graph.increment_version(acc)
    else:
        with torch.no_grad():
            reference_countsketch_pair_(acc_f, acc_g, f, g, seed, offset, sparsity, rows)
    return acc_f, acc_g


def countsketch_(acc: torch.Tensor, x: torch.Tensor, seed: int, offset: int = 0,
                 sparsity: int = 1, *, rows: Optional[torch.Tensor] = None,
                 deterministic: Optional[bool] = None) -> torch.Tensor:
    """Streaming update ``acc += S x`` in place for a single input; returns ``acc``."""
    _check_matrix(x, "x")
    _check_accumulator(acc, x, "acc")
    countsketch_pair_(acc, acc.new_zeros(acc.shape[0], 0), x, x[:, :0], seed, offset, sparsity,
                      rows=rows, deterministic=deterministic)
    return acc


def hadamard_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a a^T) o (b b^T)``: a [B, m, da], b [B, m, db] -> [B, m, m] (2-D inputs give [m, m]).

    float16/bfloat16 inputs give float32; float32/float64 keep their dtype.
    """
    for t, name in ((a, "a"), (b, "b")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SKETCH_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if a.dim() != b.dim() or a.dim() not in (2, 3):
        raise ValueError(f"a and b must both be 2-D [m, d] or 3-D [B, m, d], got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"a and b must agree in all but the last dimension, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if _NATIVE:
        with _dispatch_context(a, b):
            out = torch.ops.nnsim_fast.hadamard_gram.default(a, b)
    else:
        out = reference_hadamard_gram(a, b)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------- registration
# Fake (meta) kernels and autograd formulas, registered at import when the
# native library is present.  Fake kernels only compute output metadata.

def _fake_sketch_hash(rows, m, seed, sparsity=1):
    n = rows.shape[0]
    return (rows.new_empty((n, sparsity), dtype=torch.int64),
            rows.new_empty((n, sparsity), dtype=torch.float32))


def _fake_countsketch(x, m, seed, offset=0, sparsity=1, rows=None, deterministic=False):
    return x.new_empty((m, x.shape[1]), dtype=_accumulate_dtype(x.dtype))


def _fake_countsketch_pair(f, g, m, seed, offset=0, sparsity=1, rows=None, deterministic=False):
    dtype = _accumulate_dtype(f.dtype)
    return (f.new_empty((m, f.shape[1]), dtype=dtype), g.new_empty((m, g.shape[1]), dtype=dtype))


def _fake_countsketch_pair_(acc_f, acc_g, f, g, seed, offset=0, sparsity=1, rows=None,
                            deterministic=False):
    return None


def _fake_countsketch_backward(grad_y, n, seed, offset=0, sparsity=1, rows=None):
    return grad_y.new_empty((n, grad_y.shape[1]))


def _fake_hadamard_gram(a, b):
    return a.new_empty((a.shape[0], a.shape[1], a.shape[1]), dtype=_accumulate_dtype(a.dtype))


def _save_hash(ctx, rows, seed, offset, sparsity) -> None:
    ctx.rows, ctx.seed, ctx.offset, ctx.sparsity = rows, seed, offset, sparsity


def _gather(ctx, grad, n: int, dtype):
    """S is linear, so d(Sx)/dx is the gather x_grad[i] = S^T grad_y."""
    if grad is None:
        return None
    grad_x = torch.ops.nnsim_fast.countsketch_backward.default(
        grad.contiguous(), n, ctx.seed, ctx.offset, ctx.sparsity, ctx.rows)
    return grad_x.to(dtype)


def _setup_countsketch(ctx, inputs, output):
    x, m, seed, offset, sparsity, rows, _ = inputs
    _save_hash(ctx, rows, seed, offset, sparsity)
    ctx.n, ctx.x_dtype = x.shape[0], x.dtype


def _backward_countsketch(ctx, grad):
    return (_gather(ctx, grad, ctx.n, ctx.x_dtype),) + (None,) * 6


def _setup_countsketch_pair(ctx, inputs, output):
    f, g, m, seed, offset, sparsity, rows, _ = inputs
    _save_hash(ctx, rows, seed, offset, sparsity)
    ctx.n, ctx.dtype = f.shape[0], f.dtype


def _backward_countsketch_pair(ctx, grad_f, grad_g):
    return (_gather(ctx, grad_f, ctx.n, ctx.dtype), _gather(ctx, grad_g, ctx.n, ctx.dtype)) + \
        (None,) * 6


def _setup_gather(ctx, inputs, output):
    grad_y, n, seed, offset, sparsity, rows = inputs
    _save_hash(ctx, rows, seed, offset, sparsity)
    ctx.m, ctx.dtype = grad_y.shape[0], grad_y.dtype


def _backward_gather(ctx, grad):
    # The gather is linear too: its gradient is the scatter (double backward).
    grad_y = torch.ops.nnsim_fast.countsketch.default(
        grad.contiguous(), ctx.m, ctx.seed, ctx.offset, ctx.sparsity, ctx.rows,
        torch.are_deterministic_algorithms_enabled())
    return (grad_y.to(ctx.dtype),) + (None,) * 5


def _setup_gram(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_gram(ctx, grad):
    # d/da <G, (a a^T) o (b b^T)> = (G o Kb + (G o Kb)^T) a, and likewise for b.
    a, b = ctx.saved_tensors
    dtype = _accumulate_dtype(a.dtype)
    a_acc, b_acc = a.to(dtype), b.to(dtype)
    gram_a = torch.bmm(a_acc, a_acc.transpose(1, 2))
    gram_b = torch.bmm(b_acc, b_acc.transpose(1, 2))
    weight_a, weight_b = grad * gram_b, grad * gram_a
    grad_a = torch.bmm(weight_a + weight_a.transpose(1, 2), a_acc)
    grad_b = torch.bmm(weight_b + weight_b.transpose(1, 2), b_acc)
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


if _NATIVE:
    for _name, _fake in (("sketch_hash", _fake_sketch_hash), ("countsketch", _fake_countsketch),
                         ("countsketch_pair", _fake_countsketch_pair),
                         ("countsketch_pair_", _fake_countsketch_pair_),
                         ("countsketch_backward", _fake_countsketch_backward),
                         ("hadamard_gram", _fake_hadamard_gram)):
        torch.library.register_fake(f"nnsim_fast::{_name}", _fake)
    for _name, _backward, _setup in (
            ("countsketch", _backward_countsketch, _setup_countsketch),
            ("countsketch_pair", _backward_countsketch_pair, _setup_countsketch_pair),
            ("countsketch_backward", _backward_gather, _setup_gather),
            ("hadamard_gram", _backward_gram, _setup_gram)):
        torch.library.register_autograd(f"nnsim_fast::{_name}", _backward, setup_context=_setup)
