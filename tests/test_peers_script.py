"""benchmarks/peers.py: errors judged against the exact run, time and memory from fresh
processes, targets from the numbers, and a Markdown report drawn from the JSON alone.

Not a benchmark.  The unit tests feed the driver's summary functions made-up runs whose
errors are known; one end-to-end run uses a width-2 ResNet-18 on 48 images (one fresh
worker process per tool, seconds each).  Peer packages that are not installed are left
out of that run, and their checks skip; the nnsim_fast and exact paths are always run.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "peers.py")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
_spec = importlib.util.spec_from_file_location("peers_benchmark", SCRIPT)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

N = 48
PEER_MODULES = {"pytorch_cka": "cka", "torch_cka": "torch_cka", "ckatorch": "ckatorch"}
INSTALLED = [tool for tool, module in PEER_MODULES.items() if importlib.util.find_spec(module)]
OURS = ["exact", "exact_hadamard", "joint", "joint_hadamard", "nnsim", "nnsim_hadamard", "forward"]
TINY = ["--sizes", str(N), "--repeats", "1", "--width", "2", "--batch", "16", "--m", "16",
        "--train-samples", "32", "--threads", "1", "--timeout", "300", "--quiet"]
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


# --------------------------------------------------------------------------- made-up runs

def _matrix(base: float, step: float = 0.01):
    return [[base + step * (i - j) for j in range(4)] for i in range(4)]


def _run(tool, n, seconds, matrix=None, **extra):
    run = {"tool": tool, "n": n, "status": "ok", "seconds": seconds, "cpu_seconds": 1.5 * seconds,
           "peak_rss_mib": 100.0 + seconds,
           "baseline_rss_mib": 50.0, "working_mib": 50.0 + seconds, "peak_during_setup": False,
           "feature_dims": {name: 8 for name in LAYERS}}
    if matrix is not None:
        run.update({"matrix": matrix, "layers_a": LAYERS, "layers_b": LAYERS})
    run.update(extra)
    return run


def _made_up_runs():
    centred, debiased = _matrix(0.5), _matrix(0.48)
    ours = [[v + 0.02 for v in line] for line in centred]
    bars = [[0.015] * 4 for _ in range(4)]
    nan_peer = [line[:] for line in centred]
    nan_peer[1][2] = None                                  # a NaN entry, as JSON writes it
    joint = [_run("joint", 10, seconds, ours, standard_errors=bars, debiased_matrix=debiased,
                  debiased_standard_errors=bars, block=16) for seconds in (4.0, 6.0, 5.0)]
    sketch = [[v + 0.05 for v in line] for line in centred]
    return joint + [
        _run("joint", 20, 5.0, ours, standard_errors=bars, debiased_matrix=debiased,
             debiased_standard_errors=bars, block=16),
        _run("exact", 10, 9.0, centred, debiased_matrix=debiased),
        _run("exact_hadamard", 10, 20.0, _matrix(0.3), debiased_matrix=_matrix(0.29)),
        _run("nnsim", 10, 4.0, sketch, standard_errors=bars, debiased_matrix=debiased,
             debiased_standard_errors=bars, warnings=["m too small"]),
        _run("nnsim", 10, 6.0, sketch, standard_errors=bars, debiased_matrix=debiased,
             debiased_standard_errors=bars),
        _run("nnsim", 10, 5.0, sketch, standard_errors=bars, debiased_matrix=debiased,
             debiased_standard_errors=bars),
        _run("nnsim_hadamard", 10, 8.0, _matrix(0.35), standard_errors=bars,
             debiased_matrix=_matrix(0.29), debiased_standard_errors=bars),
        _run("pytorch_cka", 10, 5.0, [[v - 0.01 for v in line] for line in debiased]),
        _run("torch_cka", 10, 7.0, nan_peer, peer_error="AssertionError: NaN"),
        _run("forward", 10, 3.0),
        {"tool": "ckatorch", "n": 10, "status": "error", "message": "ValueError: no"},
        _run("nnsim", 20, 5.0, sketch, standard_errors=bars, debiased_matrix=debiased,
             debiased_standard_errors=bars),
    ]


def _summary():
    rows = peers.summarise(_made_up_runs(), [10, 20], peers.TOOLS)
    return {(row["tool"], row["n"]): row for row in rows}, rows


def test_errors_are_against_the_exact_run_of_the_same_n_and_kernel():
    by_key, _ = _summary()
    ours = by_key[("joint", 10)]
    assert ours["reference"] == "exact"
    assert ours["error_vs_centred"] == {"max": 0.02, "mean": 0.02, "non_finite": 0}
    assert ours["error_vs_debiased"]["max"] == pytest.approx(0.04)
    assert ours["seconds"] == 5.0 and ours["seconds_samples"] == [4.0, 6.0, 5.0]   # the median
    assert ours["error_bars"]["max_z"] == pytest.approx(1.33) and ours["error_bars"]["within_2se"] == 1.0
    paper = by_key[("nnsim_hadamard", 10)]
    assert paper["reference"] == "exact_hadamard"
    assert paper["error_vs_centred"]["max"] == pytest.approx(0.05)           # not against "exact"
    assert by_key[("pytorch_cka", 10)]["error_vs_debiased"]["max"] == pytest.approx(0.01)
    assert by_key[("pytorch_cka", 10)]["error_vs_centred"]["max"] == pytest.approx(0.03)
    nan_row = by_key[("torch_cka", 10)]
    assert nan_row["error_vs_centred"]["max"] is None and nan_row["error_vs_centred"]["non_finite"] == 1
    assert nan_row["peer_error"] == "AssertionError: NaN"
    assert by_key[("ckatorch", 10)]["status"] == "error"
    assert "matrix" not in by_key[("forward", 10)] and by_key[("forward", 10)]["seconds"] == 3.0
    assert by_key[("nnsim", 10)]["error_vs_centred"]["max"] == pytest.approx(0.05)
    assert by_key[("nnsim", 20)]["error_vs_centred"] is None                 # no exact run at N=20


def test_error_bars_count_a_zero_standard_error_that_is_off():
    bars = [[0.0, math.inf], [0.01, 0.01]]
    z = peers._z_scores([[0.5, 0.5], [0.5, 0.5]], [[0.6, 0.9], [0.5, 0.53]], bars)
    assert z["zero_se_off"] == 1 and z["infinite_se"] == 1
    assert z["max_z"] == pytest.approx(3.0) and z["within_2se"] == pytest.approx(0.5)


def test_targets_follow_the_numbers():
    _, rows = _summary()
    targets = {t["target"].split(":")[0]: t for t in peers.evaluate_targets(rows, [10, 20])}
    speed = targets["speed at N=10"]
    assert speed["met"] is True and "pytorch-cka 5.0 s (1 run): 1.00x" in speed["detail"]  # equal is enough
    assert "above the 3.0 s of the forward passes alone: nnsim_fast 2.0 s" in speed["detail"]
    accuracy = targets["accuracy at N=10"]          # 0.02 against pytorch-cka's 0.03 (torch-cka: NaN)
    assert accuracy["met"] is True
    assert "most accurate peer pytorch-cka max abs err 0.0300" in accuracy["detail"]
    assert "one model at a time: max abs err 0.0500" in accuracy["detail"]
    assert targets["speed at N=20"]["met"] is None and targets["accuracy at N=20"]["met"] is None
    memory = targets["memory flat in N (nnsim_fast compare_models)"]
    assert memory["met"] is True                    # 55 MiB above the baseline at both sizes

    runs = _made_up_runs()
    for run in runs:
        if run["tool"] == "pytorch_cka":            # more accurate than nnsim_fast, 1.25x faster
            run["matrix"] = [[v - 0.01 for v in line] for line in _matrix(0.5)]
            run["seconds"] = 4.0
    rows = peers.summarise(runs, [10], peers.TOOLS)
    verdicts = {t["target"].split(":")[0]: t["met"] for t in peers.evaluate_targets(rows, [10])}
    assert verdicts["accuracy at N=10"] is False and verdicts["speed at N=10"] is False
    why = peers.format_why(_report(rows))          # each missed target explained in numbers
    assert "- Accuracy at N=10: nnsim_fast compare_models's entries are off by up to 0.0200" in why
    assert "- Speed at N=10: both models' forward passes alone take 3.0 s" in why
    assert ("nnsim_fast compare_models spends 2.0 s (its Gram products over blocks of 16 samples) "
            "and pytorch-cka 1.0 s") in why


def test_markdown_of_made_up_runs_shows_the_summary_numbers():
    _, rows = _summary()
    report = _report(rows)
    text = peers.format_report(report)
    cells = _table(text)
    ours = "nnsim_fast compare_models (both models at hand)"
    assert cells[(ours, "10")][2:5] == ["5.0", "3 (4.0-6.0)", "1.00x"]
    assert cells[(ours, "10")][5:7] == ["2.0", "7.5"]   # 5.0 - 3.0 floor; CPU
    assert cells[("nnsim_fast sketch (one model at a time, m=16)", "10")][9] == "0.0500"
    assert cells[("torch-cka", "10")][9] == "non-finite (1 entries)"
    assert cells[("ckatorch", "10")][2] == "error: ValueError: no"
    assert "`AssertionError: NaN`" in text


def _report(rows):
    host = {"cpu_model": "test cpu", "cores_usable": 2, "cores_online": 2, "memory_total_gib": 1.0,
            "torch_version": torch.__version__, "torch_threads": 1, "python_version": "3",
            "load_average": [0.0], "date_utc": "today"}
    return {"command": "python benchmarks/peers.py --sizes 10 20", "host": host, "load_average_end": [0.0],
            "run_seconds": 1.0, "versions": {"nnsim": "0", "pytorch_cka": "1", "torch_cka": "2",
                                             "ckatorch": "3"},
            "settings": {"sizes": [10, 20], "repeats": [3, 1], "m": 16, "batch": 4, "threads": 1,
                         "eval_data_seed": 1, "exact_hadamard_max_n": 10},
            "models": {"model_a": "A", "model_b": "B"}, "rows": rows,
            "targets": peers.evaluate_targets(rows, [10, 20])}


def _table(text):
    """The main table's cells, keyed by (tool label, N)."""
    lines = text.split("\n| tool | N |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return {(row[0], row[1]): row for row in cells}


# --------------------------------------------------------------------------- one real run

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    out_json, out_md = out / "peers.json", out / "PEERS.md"
    done = subprocess.run([sys.executable, SCRIPT, *TINY, "--exact-hadamard-max-n", str(N),
                           "--tools", ",".join(OURS + INSTALLED), "--json", str(out_json),
                           "--markdown", str(out_md)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out_json.read_text()), out_md.read_text(), out


def _rows(report):
    return {row["tool"]: row for row in report["rows"]}


def _max_abs_diff(a, b) -> float:
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())


def test_every_tool_ran_in_its_own_process_with_time_and_memory(real):
    report, _, _ = real
    rows = _rows(report)
    assert set(rows) == set(OURS + INSTALLED)
    for tool, row in rows.items():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0
        assert row["peak_rss_mib"] > 0 and row["baseline_rss_mib"] > 0
        assert row["working_mib"] == pytest.approx(row["peak_rss_mib"] - row["baseline_rss_mib"], abs=0.2)
        assert row["feature_dims"] == {"layer1": 2 * 32 * 32, "layer2": 4 * 16 * 16,
                                       "layer3": 8 * 8 * 8, "layer4": 16 * 4 * 4}
        if tool != "forward":
            assert row["layers_a"] == row["layers_b"] == LAYERS
            assert len(row["matrix"]) == 4 and all(len(line) == 4 for line in row["matrix"])
    for tool in ("nnsim", "nnsim_hadamard"):        # the passes over the data, then the estimator
        assert 0 < rows[tool]["pass_seconds"] <= rows[tool]["seconds"]
    assert report["source"] is None or len(report["source"]["commit"]) == 12
    runs = report["runs"]
    assert sorted(run["tool"] for run in runs) == sorted(OURS + INSTALLED)
    assert all(run["peak_reset_after_setup"] in (True, False) and run["torch_threads"] == 1 for run in runs)


def test_errors_are_computed_against_the_exact_run(real):
    rows = _rows(real[0])
    exact, paper_exact = rows["exact"], rows["exact_hadamard"]
    for tool in ["joint", "nnsim", *INSTALLED]:
        row = rows[tool]
        assert row["reference"] == "exact"
        errors = row["error_vs_centred"]
        if errors["max"] is not None:                # a float32 peer may give NaN on tiny layers
            assert errors["max"] == pytest.approx(_max_abs_diff(row["matrix"], exact["matrix"]), abs=1e-5)
            assert row["error_vs_debiased"]["max"] == pytest.approx(
                _max_abs_diff(row["matrix"], exact["debiased_matrix"]), abs=1e-5)
    assert rows["nnsim_hadamard"]["reference"] == "exact_hadamard"
    assert rows["nnsim_hadamard"]["error_vs_centred"]["max"] == pytest.approx(
        _max_abs_diff(rows["nnsim_hadamard"]["matrix"], paper_exact["matrix"]), abs=1e-5)
    assert all(0.0 <= v <= 1.0 + 1e-9 for line in exact["matrix"] for v in line)
    assert rows["nnsim"]["error_bars"]["max_standard_error"] > 0
    assert rows["joint_hadamard"]["reference"] == "exact_hadamard"
    assert rows["joint"]["block"] == 48                  # every batch of 16 pooled into one block
    assert rows["joint"]["error_vs_centred"]["max"] < 1e-4   # one block holding all N: exact


def test_markdown_numbers_are_the_json_numbers(real):
    report, text, _ = real
    cells = _table(text)
    m = report["settings"]["m"]
    for row in report["rows"]:
        line = cells[(peers._label(row["tool"], m), str(row["n"]))]
        assert float(line[2]) == pytest.approx(row["seconds"], abs=0.051)
        assert float(line[6]) == pytest.approx(row["cpu_seconds"], abs=0.051)
        assert float(line[7]) == pytest.approx(row["peak_rss_mib"], abs=0.51)
        assert float(re.sub(r" \(setup\)$", "", line[8])) == pytest.approx(row["working_mib"], abs=0.51)
        errors = row.get("error_vs_centred")
        if row["tool"] not in peers.NOT_ESTIMATES and errors and errors["max"] is not None:
            assert float(line[9]) == pytest.approx(errors["max"], abs=5e-5)
            assert float(line[11]) == pytest.approx(row["error_vs_debiased"]["max"], abs=5e-5)
    host = report["host"]
    assert report["command"] in text and host["cpu_model"] in text
    assert f"torch {host['torch_version']} (1 threads)" in text
    assert ROOT not in text and ROOT not in json.dumps(report["rows"])        # no machine paths


def test_render_rewrites_the_same_markdown_from_the_json(real):
    report, text, out = real
    rendered = out / "again.md"
    done = subprocess.run([sys.executable, SCRIPT, "--render", "--json", str(out / "peers.json"),
                           "--markdown", str(rendered)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rendered.read_text() == text


def test_installed_peers_are_judged_and_timed(real):
    if not INSTALLED:
        pytest.skip("no peer package installed (pip install --no-deps pytorch-cka torch-cka ckatorch)")
    report, _, _ = real
    rows = _rows(report)
    for tool in INSTALLED:
        assert report["versions"][tool]
        assert rows[tool]["error_vs_centred"] is not None
    if "ckatorch" in INSTALLED:                      # how its own CKA class fails is recorded
        assert rows["ckatorch"]["class_check"] != "ran"
    speed = next(t for t in report["targets"] if t["target"].startswith(f"speed at N={N}"))
    assert speed["met"] in (True, False) and "forward passes alone" in speed["detail"]


def test_without_peers_the_targets_are_not_measured(real):
    report, _, _ = real
    if INSTALLED:
        verdicts = [t["met"] for t in report["targets"] if t["n"] == N]
        assert all(v in (True, False) for v in verdicts)
    else:
        assert all(t["met"] is None for t in report["targets"])
