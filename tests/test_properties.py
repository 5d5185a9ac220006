"""Property tests (hypothesis): op arguments, memory layouts, dtypes, and file mutations.

For any valid arguments the native ops equal a dense float64 ``S @ X`` built
from the hash within the dtype's rounding; invalid arguments raise
``TypeError``/``ValueError`` (never a crash); streaming equals one-shot; and any
mutation of a saved representation either loads to exactly the same
representation or raises ``ValueError`` -- never a silently different number.
Bounded to well under a minute.
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import assert_same_representation  # noqa: E402
from nnsim_fast import Representation, ops  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}


@st.composite
def sketch_cases(draw):
    sparsity = draw(st.sampled_from([1, 2, 4]))
    m = sparsity * draw(st.integers(1, 16))
    n = draw(st.integers(0, 200))
    d = draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    with_rows = draw(st.booleans())
    offset = draw(st.integers(0, 2 ** 40)) if not with_rows else draw(st.integers(0, 2 ** 20))
    seed = draw(st.integers(0, 2 ** 63 - 1))
    data_seed = draw(st.integers(0, 2 ** 31))
    return dict(sparsity=sparsity, m=m, n=n, d=d, dtype=dtype, layout=layout,
                with_rows=with_rows, offset=offset, seed=seed, data_seed=data_seed)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1] + 1, dtype=x.dtype)
        wide[:, 1::2] = x
        return wide[:, 1::2]
    return x


def _data(case):
    gen = torch.Generator().manual_seed(case["data_seed"])
    x = torch.randn(case["n"], case["d"], generator=gen, dtype=torch.float64).to(case["dtype"])
    rows = (torch.randperm(4 * case["n"] + 1, generator=gen)[:case["n"]] * 3 + 7
            if case["with_rows"] else None)
    return _layout(x, case["layout"]), rows


@SETTINGS
@given(sketch_cases())
def test_countsketch_equals_dense_sketch(case):
    x, rows = _data(case)
    m, seed, offset, s = case["m"], case["seed"], case["offset"], case["sparsity"]
    out = ops.countsketch(x, m, seed, offset, s, rows=rows)
    S = ops.sketch_matrix(case["n"], m, seed, offset, s, rows=rows)
    reference = S @ x.double()
    # Each output sums at most n terms of |x| / sqrt(s): a forward-error bound.
    bound = (S.abs() @ x.double().abs()) * (case["n"] + 2) * UNIT_ROUNDOFF[
        torch.float64 if x.dtype == torch.float64 else torch.float32]
    assert out.shape == (m, case["d"])
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert bool(((out.double() - reference).abs() <= bound + 1e-300).all())


@SETTINGS
@given(sketch_cases(), st.integers(0, 200))
def test_streaming_in_two_pieces_equals_one_shot(case, split):
    case = dict(case, dtype=torch.float64, with_rows=False)
    x, _ = _data(case)
    split = min(split, case["n"])
    m, seed, offset, s = case["m"], case["seed"], case["offset"], case["sparsity"]
    acc = torch.zeros(m, case["d"], dtype=torch.float64)
    ops.countsketch_(acc, x[:split], seed, offset, s)
    ops.countsketch_(acc, x[split:], seed, offset + split, s)
    torch.testing.assert_close(acc, ops.sketch_matrix(case["n"], m, seed, offset, s) @ x,
                               rtol=1e-12, atol=1e-12)


BAD_VALUES = st.one_of(st.integers(-5, 0), st.just(True), st.floats(allow_nan=True),
                       st.just("8"), st.just(None), st.integers(2 ** 31, 2 ** 64))


@SETTINGS
@given(st.sampled_from(["m", "seed", "offset", "sparsity"]), BAD_VALUES)
def test_bad_arguments_raise_errors_naming_them(name, value):
    args = dict(m=8, seed=1, offset=0, sparsity=1)
    args[name] = value
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value < 2 ** 63:
        return                                   # a valid seed
    if name == "offset" and isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value < 2 ** 63:
        return
    with pytest.raises((TypeError, ValueError)) as error:
        ops.countsketch(torch.randn(5, 2), **args)
    assert name in str(error.value) or "sparsity" in str(error.value)


# --------------------------------------------------------------------------- files

def _saved(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    rep = Representation(8, 2, beta=0.5, dtype=torch.float64)
    rep.update({"a": torch.randn(6, 3, generator=gen, dtype=torch.float64)},
               {"a": torch.randn(6, 2, generator=gen, dtype=torch.float64)})
    path = tmp_path_factory.mktemp("prop") / "rep.safetensors"
    rep.save(path)
    return rep, path.read_bytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _saved(tmp_path_factory)


@SETTINGS
@given(st.data())
def test_any_mutation_of_a_file_loads_identically_or_raises(saved, tmp_path_factory, data):
    rep, good = saved
    mutation = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    blob = bytearray(good)
    if mutation == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.integers(0, len(blob) - 1))
            blob[position] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif mutation == "append":
        blob += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        start = data.draw(st.integers(0, len(blob) - 1))
        piece = data.draw(st.binary(min_size=1, max_size=16))
        blob[start:start + len(piece)] = piece
    path = tmp_path_factory.mktemp("mutated") / "rep.safetensors"
    path.write_bytes(bytes(blob))
    try:
        loaded = Representation.load(path)
    except ValueError:
        return
    assert_same_representation(rep, loaded, rtol=0, atol=0)
    assert math.isfinite(float(loaded.layers["a"].trace))
