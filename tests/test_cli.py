"""Tests of the nnsim-fast command line: compare against a dense reference, and every error path."""

import csv
import json
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import nnsim_fast
from nnsim_fast import cli, ops

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
                            "--no-progress")
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
    ({"--index": "cosine"}, "invalid choice"),
    ({"--kind": "weird"}, "invalid choice"),
    ({"--beta": "1.5"}, "(0, 1]"),
    ({"--threads": "0"}, "positive integer"),
    ({"--model-kwargs": "{width: 3"}, "not valid JSON"),
    ({"--model-kwargs": "[1, 2]"}, "JSON object"),
    ({"--layers": ["fc1", "fc9"]}, "'fc9' is not a module"),
    ({"--device": "nonsense"}, "--device"),
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

    def fake_main(argv):
        seen["argv"] = list(argv)
        return 3

    fake = types.ModuleType("nnsim_fast.bench")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "nnsim_fast.bench", fake)
    monkeypatch.setattr(nnsim_fast, "bench", fake, raising=False)
    assert cli.main(["bench", "--full", "--json", "x.json"]) == 3
    assert seen["argv"] == ["--full", "--json", "x.json"]

    def exiting_main(argv):
        raise SystemExit(2)

    fake.main = exiting_main
    assert cli.main(["bench", "--bad"]) == 2
