"""benchmarks/accuracy.py --quick: what it writes, and that its numbers mean what they say.

Not a benchmark: tiny networks on a few hundred inputs, one run of the script in a fresh process
(about half a minute).  The checks go past the file layout: the exact column is recomputed here
from dense kernels, the default estimator's errors are held against its own standard errors, the
statistics are recomputed from the raw estimates, and the report's numbers are read back and
compared with the JSON.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import nnsim_fast
from conftest import load_benchmark
from nnsim_fast.extract import features_and_gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accuracy.py")


bench = load_benchmark("accuracy.py", "accuracy_benchmark")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    paths = {"json": out / "results" / "accuracy.json", "markdown": out / "ACCURACY.md",
             "plot": out / "results" / "accuracy.png"}
    args = [arg for key, path in paths.items() for arg in (f"--{key}", str(path))]
    done = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(paths["json"].read_text()), paths["markdown"].read_text(), paths


def _sizes(report):
    for name, network in report["networks"].items():
        for n, size in network["sizes"].items():
            yield name, int(n), size


def _matrix(rows):
    return np.array([[math.inf if v is None else v for v in row] for row in rows], dtype=np.float64)


def test_records_the_run_and_every_planned_estimate(quick):
    report, _, paths = quick
    assert report["command"] == "python benchmarks/accuracy.py --quick"
    assert report["seconds"] > 0 and report["quick"] is True
    host = report["host"]
    assert host["cpu_model"] and host["torch_version"] == torch.__version__ and host["torch_threads"] == 1
    assert set(report["networks"]) == {"cnn", "resnet18"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plans = {size["n"]: size for size in report["plan"]["sizes"]}
    assert len(plans) == 2
    for _, n, size in _sizes(report):
        plan = plans[n]
        assert set(size["exact"]) == set(plan["exact_targets"])
        for m, keys in plan["variants"].items():
            for key in keys:
                entry = size["results"][key][m]
                assert entry["seeds"] == len(size["seeds"][m]) >= 2
                assert entry["vs_target"]["sd"] is not None and entry["vs_target"]["max_abs"] >= 0
                assert ("coverage" in entry) == (key.endswith("|sketch") and not key.startswith("nbs"))
    every = set(plans[min(plans)]["variants"][str(min(plans[min(plans)]["full_m"]))])
    for kind in ("hadamard", "feature"):
        for estimator in ("sketch", "plugin/data", "plugin/none", "paper/buckets"):
            assert f"cka|{kind}|{estimator}" in every
        for estimator in ("sketch", "plugin/data", "paper/buckets"):
            assert {f"cka-debiased|{kind}|{estimator}", f"nbs|{kind}|{estimator}"} <= every


def test_merged_and_rows_fed_sketches_are_the_users_sketches(quick):
    report, _, _ = quick
    for network in report["networks"].values():
        assert network["sketch_model_agreement"] < 1e-6
        for size in network["sizes"].values():
            assert size["separate_vs_merged"] < 1e-9


def _kernels(rows, layers, kind):
    def kernel(layer):
        f, g = rows[layer]
        K = f @ f.T
        return K * (g @ g.T) if kind == "hadamard" else K
    return [kernel(layer) for layer in layers]


def _mean_share(K):
    """||H K H||_F^2 / ||K||_F^2: how little of a kernel is left once its mean is removed."""
    return float(nnsim_fast.indices.center_kernel(K).square().sum() / K.square().sum())


@pytest.mark.parametrize("network_index", [0, 1])
def test_exact_column_matches_dense_kernels_computed_here(quick, network_index):
    """The exact values come from all N x N pairs: rebuilt here from the untrained model (the same
    seed, data, batches and layers) with dense float64 kernels and ``nnsim_fast.cka``.

    Layers whose centred kernel keeps less than 1e-6 of the kernel's squared norm are left out:
    the library centres streamed sums, which loses the digits the mean takes (3e-4 for the
    debiased CKA at the untrained quick ResNet's head, whose share is 4e-12); the report's
    dense-kernel check covers them."""
    report, _, _ = quick
    network = bench.make_plan(True, 2).networks[network_index]
    result = report["networks"][network.name]
    torch.manual_seed(0)
    model = network.build().eval()
    n_max = max(n for _, n, _ in _sizes(report))
    x = torch.cat([batch[0] for batch in bench.evaluation_batches(network, n_max, 64)])
    layers = result["layers"]
    compared = 0
    for n, size in result["sizes"].items():
        rows = features_and_gradients(model, x[:int(n)], layers, batch=64)
        for key in size["exact"]:
            index, kind, mode = key.split("|")
            if index != "cka":
                continue
            kernels = _kernels(rows, layers, kind)
            kept = np.array([_mean_share(K) > 1e-6 for K in kernels])
            dense = np.array([[nnsim_fast.cka(a, b, centered=mode != "uncentred", debiased=mode == "debiased")
                               for b in kernels] for a in kernels])
            stored = _matrix(size["exact"][key])[:len(layers), :len(layers)]     # the init x init block
            mask = np.outer(kept, kept)
            np.testing.assert_allclose(stored[mask], dense[mask], atol=2e-6,
                                       err_msg=f"{network.name} N={n} {key}")
            compared += int(mask.sum())
    assert compared >= 2 * len(layers) ** 2


def test_statistics_are_those_of_the_raw_estimates(quick):
    report, _, _ = quick
    models = len(report["plan"]["models"])
    for name, _, size in _sizes(report):
        raw = size["default_raw"]
        values = np.array([_matrix(seed) for seed in raw["estimate"]])
        exact = _matrix(size["exact"]["cka|hadamard|centred"])
        layers = values.shape[-1] // models
        errors = bench.blocks(values - exact, models, layers)
        entry = size["results"][bench.DEFAULT_KEY][str(raw["m"])]
        assert entry["vs_target"]["max_abs"] == pytest.approx(np.abs(errors).max(), abs=1e-5), name
        stderr = bench.blocks(np.array([_matrix(seed) for seed in raw["stderr"]]), models, layers)
        finite = np.isfinite(stderr)
        within = (np.abs(errors[finite]) <= 2 * stderr[finite]).mean()
        assert entry["coverage"]["within_2se"] == pytest.approx(within, abs=1e-9), name
        assert entry["coverage"]["infinite_se"] == (~finite).sum(), name


def test_default_errors_are_within_their_reported_standard_errors(quick):
    """The default estimate must be as close to the independently computed exact value as its own
    error bar says.  Checked on the small CNN: the quick ResNet (width 2, barely trained) has layers
    whose psi features are dominated by their mean, where the estimator's error bars are known to
    miss the feature-axis sketch's error."""
    report, _, _ = quick
    models = len(report["plan"]["models"])
    for n, size in report["networks"]["cnn"]["sizes"].items():
        raw = size["default_raw"]
        values = np.array([_matrix(seed) for seed in raw["estimate"]])
        stderr = np.array([_matrix(seed) for seed in raw["stderr"]])
        layers = values.shape[-1] // models
        errors = bench.blocks(values - _matrix(size["exact"]["cka|hadamard|centred"]), models, layers)
        stderr = bench.blocks(stderr, models, layers)
        assert np.isfinite(stderr).all() and (stderr > 0).all(), n
        assert (np.abs(errors) <= 3 * stderr).mean() >= 0.9, n
        assert np.abs(errors).max() > 0            # an "exact" copied from the estimate would be 0


def _table_rows(markdown, header_start):
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_report_numbers_are_the_json_numbers(quick):
    report, markdown, _ = quick
    verdict = report["verdict"]
    assert f"**Verdict: {'met' if verdict['met'] else 'NOT met'}.**" in markdown
    assert markdown.index("## Target") < markdown.index("## Setup")
    m = str(report["target_m"])
    rows = _table_rows(markdown, "| network | N | model pair |")
    pairs = [f"{a} vs {b}" for a, b in ((report["plan"]["models"][i], report["plan"]["models"][j])
                                        for i, j in bench.model_pairs(len(report["plan"]["models"])))]
    expected = []
    for name, n, size in _sizes(report):
        results = size["results"]
        for p, pair in enumerate(pairs):
            cells = [name, str(n), pair]
            for key in (bench.DEFAULT_KEY, "cka|hadamard|paper/buckets", "cka|hadamard|plugin/data"):
                cells.append(f"{results[key][m]['vs_target']['max_abs_by_model_pair'][p]:.3f}")
            expected.append(cells)
    assert [[r[0], r[1], r[2], r[3], r[5], r[6]] for r in rows] == expected
    for row in rows:
        assert row[4] == ("yes" if float(row[3]) <= report["tolerance"] else "**no**")
    assert f"wall time of the run: {report['seconds']} s" in markdown
    assert f"Command: `{report['command']}`" in markdown


def test_order_agreement_counts_flips_and_their_exact_gaps():
    exact = np.array([[0.9], [0.5], [0.1]])                   # three model pairs, one layer
    same = bench.order_agreement(exact, np.array([[[0.8], [0.6], [0.2]]]), ["l"])
    assert same["preserved"] and same["flips"] == 0 and same["min_kendall_tau"] == 1.0
    flipped = bench.order_agreement(exact, np.array([[[0.8], [0.1], [0.3]]]), ["l"])
    assert not flipped["preserved"] and flipped["flips"] == 1 and flipped["flipped_layers"] == ["l"]
    assert flipped["largest_flipped_gap"] == pytest.approx(0.4)
    assert not flipped["preserved_beyond_tolerance"]
    assert flipped["min_kendall_tau"] == pytest.approx(1 / 3)


def test_blocks_pick_each_model_pair_in_order():
    matrix = np.arange(36.0).reshape(6, 6)                    # three models of two layers
    picked = bench.blocks(matrix, 3, 2)
    assert picked.shape == (3, 2, 2)
    np.testing.assert_array_equal(picked[0], matrix[0:2, 2:4])      # models 0 and 1
    np.testing.assert_array_equal(picked[2], matrix[2:4, 4:6])      # models 1 and 2
    np.testing.assert_array_equal(bench.matched(matrix, 3, 2)[1], [matrix[0, 4], matrix[1, 5]])


def test_verdict_counts_only_flips_beyond_the_tolerance():
    """Close couples (exact gap <= tolerance) swapped are ties; a wider swap or an error above
    the tolerance fails the target."""
    def results(max_abs, strict, beyond):
        order = {"preserved": strict, "preserved_beyond_tolerance": beyond, "flips": 0 if strict else 2,
                 "largest_flipped_gap": 0.0 if strict else 0.005}
        entry = {"vs_target": {"max_abs": max_abs}, "order": order}
        return {"target_m": 512, "networks": {"net": {"sizes": {"100": {
            "results": {bench.DEFAULT_KEY: {"512": entry}}}}}}}
    tol = bench.TOLERANCE
    assert bench.verdict(results(tol / 2, True, True))["met"]
    close = bench.verdict(results(tol / 2, False, True))
    assert close["met"] and close["rows"][0]["strict_flips"] == 2
    assert not bench.verdict(results(tol / 2, False, False))["met"]
    assert not bench.verdict(results(tol * 1.5, True, True))["met"]
