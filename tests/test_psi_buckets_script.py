"""benchmarks/psi_buckets.py --quick: it runs, and its configurations reach the sketch.

Not a benchmark: a tiny ResNet on 128 inputs in a fresh process (seconds).  With far more
buckets than rows and exact psi (width >= df * dg) the script's estimate must land on the exact
CKA, which it could not if the configured buckets did not reach the representation.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import load_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "psi_buckets.py")


def test_many_buckets_and_exact_psi_give_the_exact_cka():
    bench = load_benchmark("psi_buckets.py", "psi_buckets_benchmark")
    reference = load_benchmark("control_variate.py", "control_variate_benchmark")
    gen = torch.Generator().manual_seed(3)
    rows = {f"m{i}:l": (torch.relu(torch.randn(40, 5, generator=gen)) + 0.5,
                        torch.randn(40, 3, generator=gen)) for i in range(3)}
    exact = reference.exact_cka(rows, "hadamard")
    # 40 rows in 8192 buckets: about 0.1 expected collisions; psi (15 coordinates) kept exactly.
    for table in bench.estimates(rows, 40, 8192, 64, 2):
        np.testing.assert_allclose(table, exact, atol=0.02)


def test_bad_configuration_is_refused():
    bench = load_benchmark("psi_buckets.py", "psi_buckets_benchmark")
    assert bench.parse_config("2048x1024") == (2048, 1024)
    for text in ("2048", "ax4", "2x8"):
        with pytest.raises(Exception, match="BUCKETSxWIDTH|buckets must be"):
            bench.parse_config(text)


def test_quick_run_writes_every_configuration(tmp_path):
    out = tmp_path / "pb.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out)], check=True, env=env,
                   cwd=ROOT, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] and (data["n"], data["seeds"]) == (128, 3)
    assert set(data["results"]) == {"16x64", "64x16"}
    models = {name.split(":")[0] for name in data["layers"]}
    per_model = len(data["layers"]) // len(models)
    cross = len(data["layers"]) ** 2 - len(models) * per_model ** 2
    for key, entry in data["results"].items():
        buckets, width = map(int, key.split("x"))
        assert entry["halves_mib_per_layer"] == 2 * buckets * width * 4 / 2 ** 20
        assert entry["entries"] == cross * data["seeds"] and entry["estimate_seconds"] > 0
        assert 0.0 <= entry["pooled_sd"] <= entry["max_sd"]
        assert abs(entry["mean_error"]) <= entry["max_abs_error"] <= 2.0
