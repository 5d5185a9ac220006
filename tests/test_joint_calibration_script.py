"""benchmarks/joint_calibration.py runs end to end on a tiny setting and reports sane numbers."""
from __future__ import annotations

import json

from conftest import load_benchmark

calibration = load_benchmark("joint_calibration.py", "joint_calibration_benchmark")


def test_tiny_run_writes_every_kind_and_block(tmp_path):
    out = tmp_path / "calibration.json"
    code = calibration.main(["--n", "64", "--width", "2", "--orders", "3", "--blocks", "16", "40",
                             "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(row["kind"], row["block"]) for row in report["rows"]] == [
        ("feature", 16), ("feature", 40), ("hadamard", 16), ("hadamard", 40)]
    for row in report["rows"]:
        assert row["orders"] == 3
        assert 0 < row["rms_error"] <= row["max_error"] < 1
        assert row["rms_standard_error"] > 0 and 0 <= row["within_2se"] <= 1


def test_exact_reference_is_centred_cka():
    import torch

    from nnsim_fast import indices

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 30, 5, generator=generator, dtype=torch.float64)
    K = x @ x.transpose(1, 2)
    got = calibration.exact_cka(K)
    for i in range(4):
        for j in range(4):
            want = float(indices.cka(K[i], K[4 + j]))
            assert abs(float(got[i, j]) - want) < 1e-12
