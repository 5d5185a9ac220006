"""benchmarks/control_variate.py --quick: it runs, and its exact reference is the exact CKA.

Not a benchmark: a tiny ResNet on 128 inputs in a fresh process (seconds).  The script's dense
reference is checked against the library's own exact index on random kernels, and the JSON's
statistics against their definitions.
"""
import json
import math
import os
import subprocess
import sys

import torch

from conftest import load_benchmark
from nnsim_fast import indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "control_variate.py")


def test_exact_reference_is_the_centred_cka():
    bench = load_benchmark("control_variate.py", "control_variate_benchmark")
    gen = torch.Generator().manual_seed(0)
    rows = {f"m{i}:l": (torch.relu(torch.randn(40, 5, generator=gen)) + 1.0,
                        torch.randn(40, 3, generator=gen)) for i in range(3)}
    for kind in ("hadamard", "feature"):
        table = bench.exact_cka(rows, kind)
        kernels = [(f.double() @ f.double().T) * (1.0 if kind == "feature" else g.double() @ g.double().T)
                   for f, g in rows.values()]
        for i in range(3):
            for j in range(3):
                # the script keeps the centred kernels in float32: agreement to float32 rounding
                assert math.isclose(table[i, j], indices.cka(kernels[i], kernels[j]), abs_tol=1e-5)


def test_quick_run_writes_every_variant(tmp_path):
    out = tmp_path / "cv.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out)], check=True, env=env,
                   cwd=ROOT, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] and (data["n"], data["m"], data["seeds"]) == (128, 32, 3)
    models = {name.split(":")[0] for name in data["layers"]}
    per_model = len(data["layers"]) // len(models)
    cross = len(data["layers"]) ** 2 - len(models) * per_model ** 2
    assert set(data["results"]) == {f"{k}|{v}" for k in ("hadamard", "feature")
                                    for v in ("estimated", "fixed", "none", "exact-norms")}
    for entry in data["results"].values():
        assert entry["entries"] == cross * data["seeds"]
        assert 0.0 <= entry["pooled_sd"] <= entry["max_sd"]
        assert abs(entry["mean_error"]) <= entry["max_abs_error"] <= 2.0
        assert 0 <= entry["entries_over_0.03"] <= entry["entries"]
