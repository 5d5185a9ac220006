"""Tests of the nnsim-fast command line: compare against a dense reference, and every error path."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
import torch

import nnsim_fast
from nnsim_fast import cli, ops
from nnsim_fast.app import bench as bench_command
from nnsim_fast.app import scores
from nnsim_fast.app.errors import UsageError

FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    def tiny(width=7):
        return Tiny(width)

    class Tiny(nn.Module):
        def __init__(self, width=7):
            super().__init__()
            self.fc1 = nn.Linear(5, width)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(width, 6)
            self.act2 = nn.Tanh()
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.act2(self.fc2(self.act(self.fc1(x)))))

    def not_a_module():
        return 42

    def broken():
        raise RuntimeError("factory exploded")

    def counted(width=7):
        with open("built.txt", "a") as handle:
            handle.write("built\\n")
        return Tiny(width)
''')

LAYERS = ["fc1", "act", "fc2", "act2"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with a factory module, two weight files and a data file, as the cwd."""
    module = f"cli_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {}
    exec(FACTORY_SOURCE, namespace)
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = namespace["Tiny"]()
        path = tmp_path / f"model{seed}.pt"
        torch.save(model.state_dict(), path)
        weights.append(str(path))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    torch.save(x, tmp_path / "inputs_only.pt")
    yield types.SimpleNamespace(path=tmp_path, module=module, weights=weights, x=x, y=y,
                                Tiny=namespace["Tiny"])
    sys.modules.pop(module, None)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_usage_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    assert lines[0].startswith("nnsim-fast")


# ------------------------------------------------------------------------------ dense reference

def dense_features_and_gradients(model, x, beta=0.5):
    """Per-layer features and expected gradients, by hand with autograd on separate tensors."""
    model.eval()
    x = x.to(torch.float64)
    model = model.double()
    h1 = model.fc1(x)
    a1 = model.act(h1)
    h2 = model.fc2(a1)
    a2 = model.act2(h2)
    logits = model.head(a2)
    p = torch.softmax(logits, 1)
    q = torch.softmax(beta * torch.log_softmax(logits, 1), 1)
    # d/dlogits of E_q[cross-entropy] is p - q.
    grads = torch.autograd.grad(logits, [h1, a1, h2, a2], grad_outputs=(p - q).detach())
    feats = [t.detach() for t in (h1, a1, h2, a2)]
    return feats, [g.detach() for g in grads]


def dense_cka(K1, K2):
    K1 = K1 - K1.mean(0, keepdims=True) - K1.mean(1, keepdims=True) + K1.mean()
    K2 = K2 - K2.mean(0, keepdims=True) - K2.mean(1, keepdims=True) + K2.mean()
    return float((K1 * K2).sum() / np.sqrt((K1 * K1).sum() * (K2 * K2).sum()))


def test_compare_matches_a_dense_reference(workdir, capsys):
    m, seed = 16, 5
    out = workdir.path / "out"
    code, stdout, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny",
                            "--weights", *workdir.weights, "--data", "data.pt", "--layers", *LAYERS,
                            "--m", m, "--seed", seed, "--dtype", "float64", "--out", out,
                            "--estimator", "paper", "--no-progress")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    assert result["m"] == m and result["index"] == "cka" and len(result["pairs"]) == 1
    pair = result["pairs"][0]
    assert pair["a"] == "model1" and pair["b"] == "model2"
    assert pair["layers_a"] == LAYERS == pair["layers_b"]
    matrix = np.array(pair["matrix"])

    S = ops.sketch_matrix(workdir.x.shape[0], m, seed, dtype=torch.float64).numpy()
    kernels = []
    for weights in workdir.weights:
        model = workdir.Tiny()
        model.load_state_dict(torch.load(weights))
        feats, grads = dense_features_and_gradients(model, workdir.x)
        layer_kernels = []
        for f, g in zip(feats, grads):
            Sf, Sg = S @ f.numpy(), S @ g.numpy()
            layer_kernels.append((Sf @ Sf.T) * (Sg @ Sg.T))   # Algorithm 1
        kernels.append(layer_kernels)
    expected = np.array([[dense_cka(a, b) for b in kernels[1]] for a in kernels[0]])
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-9)

    # The per-pair CSV holds the same matrix; the long CSV every entry once.
    with open(out / pair["file"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == LAYERS
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in rows[1:]]), matrix,
                               atol=1e-6)
    with open(out / "similarity.csv", newline="") as handle:
        long_rows = list(csv.reader(handle))
    assert len(long_rows) == 1 + len(LAYERS) ** 2
    assert (out / "model1__model2.png").read_bytes()[:4] == b"\x89PNG"
    assert "model1" in stdout and "fc2" in stdout


def test_compare_one_model_gives_its_own_layer_by_layer_matrix(workdir, capsys):
    out = workdir.path / "self"
    threads = torch.get_num_threads()
    code, stdout, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny", "--weights",
                            workdir.weights[0], "--data", "inputs_only.pt", "--m", 8,
                            "--index", "nbs", "--kind", "feature", "--out", out, "--no-plots",
                            "--no-progress", "--threads", 1)
    assert code == 0, err
    assert torch.get_num_threads() == threads      # --threads applies to the command only
    result = json.loads((out / "similarity.json").read_text())
    matrix = np.array(result["pairs"][0]["matrix"])
    # Default layers: the model's direct children; a layer compared with itself scores 1.
    assert result["pairs"][0]["layers_a"] == ["fc1", "act", "fc2", "act2", "head"]
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert ((matrix >= 0) & (matrix <= 1 + 1e-12)).all()
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("kind", ["khatri_rao", "psi"])
def test_compare_kinds_that_need_extra_statistics(workdir, capsys, kind):
    # These kinds need statistics sketch_model only keeps on request (product=, psi=);
    # compare must ask for them and match the library called directly.
    out = workdir.path / kind
    code, _, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny", "--weights",
                       *workdir.weights, "--data", "inputs_only.pt", "--m", 8, "--kind", kind,
                       "--layers", "fc1", "fc2", "--dtype", "float64", "--out", out,
                       "--no-plots", "--no-progress")
    assert code == 0, err
    matrix = np.array(json.loads((out / "similarity.json").read_text())["pairs"][0]["matrix"])
    x = workdir.x
    reps = []
    for weights in workdir.weights:
        model = workdir.Tiny()
        model.load_state_dict(torch.load(weights))
        reps.append(nnsim_fast.sketch_model(model, [x], layers=["fc1", "fc2"], m=8, seed=0,
                                            dtype=torch.float64, product=True, psi=True,
                                            progress=False))
    expected, _, _ = nnsim_fast.similarity(reps[0], reps[1], kind=kind)
    np.testing.assert_allclose(matrix, expected.numpy(), atol=1e-6)


def test_identical_weights_are_identical_at_every_layer(workdir, capsys):
    copy = workdir.path / "copy.pt"
    copy.write_bytes((workdir.path / "model1.pt").read_bytes())
    out = workdir.path / "same"
    code, _, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny", "--weights",
                       workdir.weights[0], copy, "--data", "data.pt", "--target", "labels",
                       "--m", 8, "--out", out, "--no-plots", "--no-progress")
    assert code == 0, err
    matrix = np.array(json.loads((out / "similarity.json").read_text())["pairs"][0]["matrix"])
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------ error paths

def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"nnsim-fast {nnsim_fast.__version__}"
    code, out, _ = run(capsys, "compare", "--help")
    assert code == 0 and "--weights" in out


def test_compare_default_estimator_with_psi_buckets_matches_the_library(workdir, capsys):
    """--psi-buckets reaches the representations: the CLI's default (collision-corrected,
    kind hadamard) matrix equals the library's on representations sketched with it."""
    m, buckets, seed = 8, 24, 3
    out = workdir.path / "out_psi"
    code, _, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny",
                       "--weights", *workdir.weights, "--data", "data.pt", "--layers", *LAYERS,
                       "--m", m, "--psi-buckets", buckets, "--seed", seed, "--dtype", "float64",
                       "--out", out, "--no-progress", "--no-plots")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    assert result["m"] == m and result["psi_buckets"] == buckets
    reps = []
    for weights in workdir.weights:
        model = workdir.Tiny()
        model.load_state_dict(torch.load(weights))
        reps.append(nnsim_fast.sketch_model(model, [workdir.x], layers=LAYERS, m=m, seed=seed,
                                            psi_buckets=buckets, dtype=torch.float64,
                                            progress=False))
        assert reps[-1].layers[LAYERS[0]].sketch_psi.shape[1] == buckets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _, _ = nnsim_fast.similarity(reps[0], reps[1])
    np.testing.assert_allclose(np.array(result["pairs"][0]["matrix"]), expected.numpy(),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("debiased, named", [(False, True), (True, True), (False, False),
                                             (True, False)])
def test_compare_joint_one_block_is_the_exact_value(workdir, capsys, debiased, named):
    """--estimator joint (named, or the default for CKA) with every input in one batch: the
    exact CKA over all N x N pairs, computed here by the exact path on the same models, and
    zero error bars."""
    out = workdir.path / f"joint{int(debiased)}{int(named)}"
    code, stdout, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny",
                            "--weights", *workdir.weights, "--data", "data.pt", "--layers",
                            *LAYERS, *(["--estimator", "joint"] if named else []),
                            "--batch-size", 40, "--out", out, "--no-progress", "--no-plots",
                            *(["--debiased"] if debiased else []))
    assert code == 0, err
    assert "joint estimator" in stdout
    result = json.loads((out / "similarity.json").read_text())
    assert result["estimator"] == "joint" and "m" not in result
    reps = []
    for weights in workdir.weights:
        model = workdir.Tiny()
        model.load_state_dict(torch.load(weights))
        reps.append(nnsim_fast.extract.exact_model(model, [workdir.x], layers=LAYERS,
                                                   progress=False))
    expected = nnsim_fast.similarity(reps[0], reps[1], debiased=debiased).matrix
    np.testing.assert_allclose(np.array(result["pairs"][0]["matrix"]), expected.numpy(),
                               rtol=1e-4, atol=1e-5)
    assert np.array(result["pairs"][0]["error"]).max() == 0


@pytest.mark.parametrize("options", [["--m", "8"], ["--psi-buckets", "16"], ["--index", "nbs"],
                                     ["--kind", "transport"]])
def test_compare_default_is_the_sketch_where_joint_cannot_serve(workdir, capsys, options):
    """Without --estimator: a sketch size or NBS ask for the sketch, the transport kernel for
    the plug-in on sketches (it has no collision-corrected form); the results record the
    sketch's settings."""
    out = workdir.path / f"sketch_default{options[0]}"
    code, stdout, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny", "--weights",
                            *workdir.weights, "--data", "data.pt", "--layers", *LAYERS,
                            *options, "--out", out, "--no-progress", "--no-plots")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    expected = "plugin" if "transport" in options else "sketch"
    assert result["estimator"] == expected and f"{expected} estimator" in stdout
    assert result["m"] == (8 if options[0] == "--m" else 512)


def test_compare_joint_every_pair_in_one_pass(workdir, capsys):
    """Three checkpoints with --estimator joint, from one pass: each pair's matrix and error
    bars equal compare_models on that pair over the same shuffled batches (the pairs map to
    the right models and layers)."""
    third = workdir.path / "model3.pt"
    torch.manual_seed(3)
    torch.save(workdir.Tiny().state_dict(), third)
    weights = [*workdir.weights, str(third)]
    out = workdir.path / "joint3"
    code, _, err = run(capsys, "compare", "--model", f"{workdir.module}:tiny", "--weights",
                       *weights, "--data", "data.pt", "--layers", *LAYERS, "--estimator", "joint",
                       "--batch-size", 8, "--seed", 4, "--out", out, "--no-progress", "--no-plots")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("model1", "model2"), ("model1", "model3"),
                                                          ("model2", "model3")]
    models = []
    for path in weights:
        model = workdir.Tiny()
        model.load_state_dict(torch.load(path))
        models.append(model)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    batches = list(zip(workdir.x[order].split(8), workdir.y[order].split(8)))
    for entry, (i, j) in zip(result["pairs"], [(0, 1), (0, 2), (1, 2)]):
        want = nnsimfast_pair(models[i], models[j], batches)
        np.testing.assert_allclose(np.array(entry["matrix"]), want.matrix.numpy(), rtol=1e-6,
                                   atol=1e-7)
        np.testing.assert_allclose(np.array(entry["error"]), want.error.numpy(), rtol=1e-5,
                                   atol=1e-7)


def nnsimfast_pair(model_a, model_b, batches):
    return nnsim_fast.compare_models(model_a, model_b, batches, LAYERS, LAYERS, progress=False)


def test_missing_or_unknown_command(capsys):
    expect_usage_error(capsys, match="a command is required")
    expect_usage_error(capsys, "frobnicate", match="invalid choice")
    expect_usage_error(capsys, "demo", "--bogus", match="unrecognized arguments")


def base_args(workdir, **overrides):
    args = {"--model": f"{workdir.module}:tiny", "--weights": workdir.weights,
            "--data": "data.pt", "--out": str(workdir.path / "o"), "--m": "8"}
    args.update(overrides)
    argv = ["compare", "--no-progress", "--no-plots"]
    for key, value in args.items():
        if value is None:
            continue
        argv.append(key)
        argv.extend(value if isinstance(value, list) else [value])
    return argv


@pytest.mark.parametrize("overrides, match", [
    ({"--weights": ["missing.pt"]}, "no such file 'missing.pt'"),
    ({"--data": "missing.pt"}, "no such file 'missing.pt'"),
    ({"--model": "no_colon_here"}, "package.module:factory"),
    ({"--model": "surely_not_a_module_xyz:f"}, "cannot import 'surely_not_a_module_xyz'"),
    ({"--m": "0"}, "positive integer"),
    ({"--m": "many"}, "positive integer"),
    ({"--psi-buckets": "0"}, "positive integer"),
    ({"--index": "cosine"}, "invalid choice"),
    ({"--kind": "weird"}, "invalid choice"),
    ({"--beta": "1.5"}, "(0, 1]"),
    ({"--threads": "0"}, "positive integer"),
    ({"--model-kwargs": "{width: 3"}, "not valid JSON"),
    ({"--model-kwargs": "[1, 2]"}, "JSON object"),
    ({"--layers": ["fc1", "fc9"]}, "'fc9' is not a module"),
    ({"--device": "nonsense"}, "--device"),
    ({"--estimator": "joint", "--index": "nbs"}, "CKA only"),
    ({"--estimator": "joint", "--kind": "transport"}, "transport kernel"),
    ({"--estimator": "joint"}, "joint keeps no sketch: drop --m or"),
    ({"--estimator": "joint", "--m": None, "--psi-buckets": "64"}, "drop --psi-buckets"),
])
def test_compare_argument_errors(workdir, capsys, overrides, match):
    expect_usage_error(capsys, *base_args(workdir, **overrides), match=match)


def test_compare_factory_errors(workdir, capsys):
    expect_usage_error(capsys, *base_args(workdir, **{"--model": f"{workdir.module}:nope"}),
                       match="has no attribute 'nope'")
    expect_usage_error(capsys, *base_args(workdir, **{"--model": f"{workdir.module}:not_a_module"}),
                       match="returned int, not a torch.nn.Module")
    expect_usage_error(capsys, *base_args(workdir, **{"--model": f"{workdir.module}:broken"}),
                       match="factory exploded")
    expect_usage_error(capsys, *base_args(workdir, **{"--model-kwargs": '{"depth": 3}'}),
                       match="unexpected keyword argument")


def test_compare_weights_errors(workdir, capsys):
    other = torch.nn.Sequential(torch.nn.Linear(5, 7))
    torch.save(other.state_dict(), workdir.path / "wrong_keys.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--weights": ["wrong_keys.pt"]}),
                       match="missing keys: fc1.weight")
    wide = workdir.Tiny(width=9)
    torch.save(wide.state_dict(), workdir.path / "wrong_shapes.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--weights": ["wrong_shapes.pt"]}),
                       match="shape mismatches (file vs model): fc1.weight (9, 5) vs (7, 5)")
    (workdir.path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    expect_usage_error(capsys, *base_args(workdir, **{"--weights": ["garbage.pt"]}),
                       match="cannot read 'garbage.pt'")
    torch.save([1, 2, 3], workdir.path / "list.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--weights": ["list.pt"]}),
                       match="not a state_dict")


def test_compare_data_errors(workdir, capsys):
    torch.save(torch.randn(10, 4), workdir.path / "narrow.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "narrow.pt"}),
                       match="cannot run on --data 'narrow.pt' (inputs of shape (4,) per sample)")
    torch.save({"inputs_missing": torch.randn(3, 5)}, workdir.path / "nokey.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "nokey.pt"}),
                       match="needs an 'x'")
    torch.save((torch.randn(6, 5), torch.zeros(4, dtype=torch.long)), workdir.path / "short.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "short.pt"}),
                       match="labels must be a tensor [N] with N = 6")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "inputs_only.pt",
                                                        "--target": "labels"}),
                       match="--target labels needs labels")
    torch.save(torch.randn(0, 5), workdir.path / "empty.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "empty.pt"}),
                       match="non-empty first")


def test_out_that_is_a_file_is_an_error(workdir, capsys):
    (workdir.path / "afile").write_text("x")
    expect_usage_error(capsys, *base_args(workdir, **{"--out": "afile"}),
                       match="is not a directory")
    expect_usage_error(capsys, "demo", "--tiny", "--out", workdir.path / "afile",
                       match="is not a directory")


def test_bench_forwards_its_arguments(monkeypatch, capsys):
    seen = {}

    def fake_main(argv, prog):
        seen["argv"] = list(argv)
        return 3

    fake = types.SimpleNamespace(main=fake_main)
    monkeypatch.setattr(bench_command, "load_harness", lambda: fake)
    assert cli.main(["bench", "--full", "--json", "x.json"]) == 3
    assert seen["argv"] == ["--full", "--json", "x.json"]

    def exiting_main(argv, prog):
        raise SystemExit(2)

    fake.main = exiting_main
    assert cli.main(["bench", "--bad"]) == 2


# ------------------------------------------------------------------------------ two models

def test_compare_two_models_of_different_widths(workdir, capsys):
    wide = workdir.Tiny(width=9)
    torch.save(wide.state_dict(), workdir.path / "wide.pt")
    out = workdir.path / "two"
    code, stdout, err = run(capsys, "compare", "--model-a", f"{workdir.module}:tiny",
                            "--weights-a", workdir.weights[0], "--layers-a", "fc1", "fc2",
                            "--model-b", f"{workdir.module}:tiny", "--model-kwargs-b",
                            '{"width": 9}', "--weights-b", "wide.pt", "--layers-b", "act", "act2",
                            "fc2", "--data", "data.pt", "--m", 8, "--dtype", "float64",
                            "--estimator", "paper", "--out", out, "--no-plots", "--no-progress")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    assert [m["label"] for m in result["models"]] == ["model1", "wide"]
    (pair,) = result["pairs"]
    assert pair["layers_a"] == ["fc1", "fc2"] and pair["layers_b"] == ["act", "act2", "fc2"]
    model_a = workdir.Tiny()
    model_a.load_state_dict(torch.load(workdir.weights[0]))
    rep_a = nnsim_fast.sketch_model(model_a, [workdir.x], layers=["fc1", "fc2"], m=8,
                                    dtype=torch.float64, progress=False)
    rep_b = nnsim_fast.sketch_model(wide, [workdir.x], layers=["act", "act2", "fc2"], m=8,
                                    dtype=torch.float64, progress=False)
    expected, _, _ = nnsim_fast.similarity(rep_a, rep_b, **scores.similarity_options("paper"))
    np.testing.assert_allclose(np.array(pair["matrix"]), expected.numpy(), atol=1e-9)
    assert "rows: model1, columns: wide" in stdout


@pytest.mark.parametrize("overrides, match", [
    ({"--model-a": "m:f"}, "two ways to name the models"),
    ({"--model": None, "--weights": None, "--model-a": "m:f"}, "both --model-a and --model-b"),
    ({"--model": None, "--weights": None}, "name the models with --model"),
    ({"--weights": None}, "--model needs --weights"),
    ({"--model": None, "--model-a": "m:f", "--model-b": "m:g"}, "--weights goes with --model"),
    ({"--model": None, "--weights": None, "--model-a": "m", "--model-b": "m:g"},
     "--model-a must look like package.module:factory"),
])
def test_compare_model_form_errors(workdir, capsys, overrides, match):
    expect_usage_error(capsys, *base_args(workdir, **overrides), match=match)


def test_compare_two_model_file_and_layer_errors(workdir, capsys):
    pair = {"--model": None, "--weights": None, "--model-a": f"{workdir.module}:tiny",
            "--model-b": f"{workdir.module}:tiny", "--weights-a": workdir.weights[0]}
    expect_usage_error(capsys, *base_args(workdir, **pair, **{"--weights-b": "nope.pt"}),
                       match="--weights-b: no such file 'nope.pt'")
    expect_usage_error(capsys, *base_args(workdir, **pair, **{"--layers-b": ["fc1", "fc9"]}),
                       match="--layers-b: ")


# ------------------------------------------------------------------------------ bad input, early

@pytest.mark.parametrize("labels, shown", [((0, 7), "[0, 7]"), ((-1, 2), "[-1, 2]")])
def test_labels_outside_the_model_outputs_are_one_line(workdir, capsys, labels, shown):
    y = torch.tensor([labels[0], labels[1]] * 20)
    torch.save((workdir.x, y), workdir.path / "bad_labels.pt")
    expect_usage_error(capsys, *base_args(workdir, **{"--data": "bad_labels.pt",
                                                        "--target": "labels"}),
                       match=f"labels must lie in [0, 3) for model model1 (3 outputs), got "
                             f"labels in {shown}")


def test_unwritable_out_is_found_before_any_model_is_built(workdir, capsys):
    (workdir.path / "afile").write_text("x")
    expect_usage_error(capsys, *base_args(workdir, **{"--model": f"{workdir.module}:counted",
                                                        "--out": "afile/sub"}),
                       match="--out 'afile/sub' is not writable")
    assert not (workdir.path / "built.txt").exists()
    expect_usage_error(capsys, "demo", "--tiny", "--out", workdir.path / "afile" / "sub",
                       match="is not writable")


def test_bench_checks_its_output_files_before_measuring(monkeypatch, tmp_path, capsys):
    harness = bench_command.load_harness()

    def must_not_run(args):
        raise AssertionError("benchmarks ran before the output paths were checked")

    monkeypatch.setattr(harness, "run_from_args", must_not_run)
    monkeypatch.setattr(bench_command, "load_harness", lambda: harness)
    (tmp_path / "afile").write_text("x")
    for option in ("--json", "--markdown"):
        target = tmp_path / "afile" / "out.txt"
        expect_usage_error(capsys, "bench", option, target,
                           match=f"nnsim-fast bench: error: {option} '{target}' is not writable")


def test_data_is_checked_before_the_model_module_is_imported(tmp_path, monkeypatch, capsys):
    module = f"cli_marker_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("open('imported.txt', 'w').close()\n"
                                           "def make():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    expect_usage_error(capsys, "compare", "--model", f"{module}:make", "--weights", "w.pt",
                       "--data", "missing.pt", "--out", "o", match="--data: no such file")
    assert not (tmp_path / "imported.txt").exists()
    sys.modules.pop(module, None)


def _own_directory(tmp_path, name):
    """A working directory with a factory module, one weights file and data, off sys.path."""
    module = f"{name}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(FACTORY_SOURCE)
    namespace = {}
    exec(FACTORY_SOURCE, namespace)
    torch.manual_seed(0)
    torch.save(namespace["Tiny"]().state_dict(), tmp_path / "w.pt")
    torch.save(torch.randn(12, 5), tmp_path / "x.pt")
    return module


def test_the_working_directory_is_importable_only_while_importing_the_model(
        tmp_path, monkeypatch, capsys):
    module = _own_directory(tmp_path, "cli_scoped")
    monkeypatch.chdir(tmp_path)
    assert str(tmp_path) not in sys.path and os.getcwd() not in sys.path
    try:
        code, _, err = run(capsys, "compare", "--model", f"{module}:tiny", "--weights", "w.pt",
                           "--data", "x.pt", "--m", 4, "--out", "o", "--no-plots",
                           "--no-progress")
    finally:
        sys.modules.pop(module, None)
    assert code == 0, err
    assert str(tmp_path) not in sys.path and os.getcwd() not in sys.path


def test_a_file_in_the_working_directory_cannot_shadow_a_later_import(tmp_path):
    pytest.importorskip("matplotlib")
    module = _own_directory(tmp_path, "cli_shadow")
    (tmp_path / "matplotlib.py").write_text("open('shadowed.txt', 'w').close()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(nnsim_fast.__file__)))
    # As the console script runs: the working directory is not on sys.path.
    code = textwrap.dedent(f"""
        import os, sys
        sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
        from nnsim_fast.cli import main
        sys.exit(main(["compare", "--model", "{module}:tiny", "--weights", "w.pt", "--data",
                       "x.pt", "--m", "4", "--out", "o", "--no-progress"]))
    """)
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "shadowed.txt").exists()
    assert (tmp_path / "o" / "w__w.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ estimators

def _with_estimator(calls):
    """similarity() that records its estimator options and returns known error bars."""
    real = nnsim_fast.compare.similarity

    def similarity(rep_a, rep_b, index="cka", kind="hadamard", layers=None, *,
                   estimator=None, debiased=False, centering=None):
        calls.append((estimator, debiased))
        matrix, names_a, names_b = real(rep_a, rep_b, index=index, kind=kind)
        return nnsim_fast.compare.SimilarityResult(
            matrix, names_a, names_b, error=torch.full_like(matrix, 0.006),
            warnings=[f"m too small for the effective rank of layer {names_a[0]}"],
            estimator=estimator or "sketch", index=index, kind=kind, debiased=debiased)

    return similarity


def test_compare_prints_error_bars_and_warnings(workdir, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(scores, "similarity", _with_estimator(calls))
    out = workdir.path / "est"
    code, stdout, err = run(capsys, *base_args(workdir, **{"--out": str(out),
                                                           "--estimator": "plugin"}),
                            "--debiased")
    assert code == 0, err
    assert calls == [("plugin", True)]
    assert "± 0.006" in stdout
    assert "warning: model1 vs model2: m too small for the effective rank of layer fc1" in err
    result = json.loads((out / "similarity.json").read_text())
    assert result["estimator"] == "plugin" and result["debiased"] is True
    (pair,) = result["pairs"]
    np.testing.assert_allclose(np.array(pair["error"]), 0.006)
    assert pair["warnings"] == ["m too small for the effective rank of layer fc1"]
    assert (out / pair["error_file"]).exists()
    with open(out / "similarity.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][-1] == "error" and rows[1][-1] == "0.006000"


def test_similarity_options_and_their_defaults():
    assert scores.similarity_options() == {}
    assert scores.similarity_options("paper") == {"estimator": "paper"}
    assert scores.similarity_options("sketch", True) == {"estimator": "sketch", "debiased": True}
    assert scores.similarity_options("plugin", centering="none") == {"estimator": "plugin",
                                                                    "centering": "none"}
    assert scores.effective_options({}) == {"estimator": "sketch", "debiased": False}
    assert scores.effective_options({"estimator": "paper"}) == {
        "estimator": "paper", "debiased": False, "centering": "buckets"}
    # The library would refuse a centring for the default estimator: say so before any work.
    for estimator in (None, "sketch"):
        with pytest.raises(UsageError, match="--centering applies to --estimator plugin or paper"):
            scores.similarity_options(estimator, centering="data")
    with pytest.raises(ValueError, match="centering= applies"):
        nnsim_fast.similarity(*_two_tiny_reps(), centering="data")


def _two_tiny_reps():
    gen = torch.Generator().manual_seed(3)
    reps = []
    for _ in range(2):
        rep = nnsim_fast.Representation(m=8, seed=1, dtype=torch.float64)
        rep.update({"l": torch.randn(20, 5, generator=gen, dtype=torch.float64)},
                   {"l": torch.randn(20, 3, generator=gen, dtype=torch.float64)})
        reps.append(rep)
    return reps


@pytest.mark.parametrize("estimator", ["sketch", "plugin", "paper"])
def test_compare_with_the_library_estimators(workdir, capsys, estimator):
    out = workdir.path / f"lib_{estimator}"
    code, stdout, err = run(capsys, *base_args(workdir, **{"--out": str(out),
                                                           "--estimator": estimator}),
                            "--debiased")
    assert code == 0, err
    result = json.loads((out / "similarity.json").read_text())
    assert result["estimator"] == estimator and result["debiased"] is True
    (pair,) = result["pairs"]
    if "error" in pair:
        assert "±" in stdout
        assert np.all(np.array(pair["error"]) >= 0)
