"""Tests of the demo: its tasks, models and analysis functions, and the demo end to end.

The end-to-end runs: ``demo --tiny`` twice (a smoke test of every stage, then the weight cache
and run-to-run determinism) and the real ``demo --quick`` once, through the command line.
"""

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from nnsim_fast import cli, ops, sketch_model  # noqa: E402
from nnsim_fast.app import demo  # noqa: E402
from nnsim_fast.app.demo.analysis import model_matrix  # noqa: E402
from nnsim_fast.datasets import (SHAPE_CLASSES, digits_task,  # noqa: E402
                                 load_tasks, render_shapes, shapes_task)
from nnsim_fast.indices import cka_matrix, nbs, nbs_matrix  # noqa: E402
from nnsim_fast.models import SmallResNet, TrainConfig, load_or_train  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread(restore_num_threads):
    # The demo's tiny convolutions run fastest on one thread, and the demo itself uses one.
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ tasks

@pytest.fixture(scope="module")
def tasks():
    return load_tasks()


def test_tasks_are_deterministic_and_well_formed(tasks):
    again = load_tasks()
    for name, task in tasks.items():
        for split in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(task, split), getattr(again[name], split)), (name, split)
        assert task.x_train.dtype == torch.float32 and task.x_train.shape[1:] == (1, 8, 8)
        assert task.y_train.dtype == torch.int64
        for x, y in ((task.x_train, task.y_train), (task.x_test, task.y_test)):
            assert x.min() >= 0 and x.max() <= 1
            assert torch.bincount(y, minlength=task.num_classes).min() > 0, name
        # Training classes are balanced by construction (stratified split, median cut).
        counts = torch.bincount(task.y_train, minlength=task.num_classes)
        assert counts.max() <= 1.15 * counts.min(), (name, counts)
    assert tasks["A"].num_classes == 10 and tasks["B"].num_classes == 20
    assert tasks["C"].num_classes == len(SHAPE_CLASSES) == 10
    assert len(tasks["C"].x_test) != len(tasks["A"].x_test)   # datasets of different sizes


def test_fine_labels_refine_the_digits(tasks):
    A, B = tasks["A"], tasks["B"]
    # Same images in the same order; the fine label's digit is the coarse label.
    assert torch.equal(A.x_train, B.x_train) and torch.equal(A.x_test, B.x_test)
    assert torch.equal(B.y_train // 2, A.y_train) and torch.equal(B.y_test // 2, A.y_test)
    # "heavy" means more total ink than the digit's training median, recomputed here.
    ink = A.x_train.sum(dim=(1, 2, 3)).numpy()
    for digit in range(10):
        rows = A.y_train.numpy() == digit
        heavy = (B.y_train.numpy()[rows] % 2) == 1
        median = np.median(ink[rows])
        assert np.array_equal(heavy, ink[rows] > median)
        assert abs(heavy.mean() - 0.5) < 0.06


def test_digits_split_is_disjoint_and_complete():
    from sklearn.datasets import load_digits

    A = digits_task()
    images = load_digits().images / 16.0
    total = A.x_train.shape[0] + A.x_test.shape[0]
    assert total == images.shape[0]
    seen = {tuple(np.round(img.ravel(), 5)) for img in A.x_train[:, 0].numpy().astype(np.float64)}
    overlap = sum(tuple(np.round(img.ravel(), 5)) in seen
                  for img in A.x_test[:, 0].numpy().astype(np.float64))
    # sklearn's digits contain a handful of exact duplicate images; nothing more may overlap.
    assert overlap <= 5


def test_shapes_are_learnable_by_a_linear_classifier_on_pixels():
    from sklearn.linear_model import LogisticRegression

    C = shapes_task()
    clf = LogisticRegression(max_iter=300)
    clf.fit(C.x_train.reshape(len(C.x_train), -1).numpy(), C.y_train.numpy())
    score = clf.score(C.x_test.reshape(len(C.x_test), -1).numpy(), C.y_test.numpy())
    # Chance is 0.1. Pixels are a poor basis for shifted patterns, so a linear model only gets
    # part of the way; the point is that the classes are distinct, not noise.
    assert score > 0.3


def test_render_shapes_rejects_unknown_classes():
    with pytest.raises(ValueError, match="labels must lie in"):
        render_shapes([0, 10], seed=0)
    with pytest.raises(ValueError, match="n_train"):
        shapes_task(n_train=0)


# ------------------------------------------------------------------------------ models

def test_small_resnet_blocks_and_features():
    torch.manual_seed(0)
    model = SmallResNet(7).eval()
    assert model.block_names == ["block1", "block2", "block3", "block4"]
    assert [n for n, _ in model.named_children()] == ["stem", "block1", "block2", "block3",
                                                      "block4", "pool", "head"]
    x = torch.randn(5, 1, 8, 8)
    maps = model.features(x)
    assert maps["block1"].shape == (5, 16, 8, 8) and maps["block4"].shape == (5, 32, 4, 4)
    torch.testing.assert_close(model.head(model.pool(maps["block4"])), model(x))
    with pytest.raises(ValueError, match="num_classes"):
        SmallResNet(0)
    with pytest.raises(ValueError, match="strides"):
        SmallResNet(3, channels=(4, 8), strides=(1,))


def test_weight_cache_reuses_and_repairs(tmp_path):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(40, 1, 8, 8, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    config = TrainConfig(epochs=1, batch_size=16, channels=(2, 2, 4, 4))
    first, trained, path = load_or_train("T", 3, x, y, config, 7, str(tmp_path))
    assert trained and os.path.exists(path) and "T_seed7_" in os.path.basename(path)
    second, trained_again, path_again = load_or_train("T", 3, x, y, config, 7, str(tmp_path))
    assert not trained_again and path_again == path
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    # Another training config is another cache entry.
    _, trained_other, other = load_or_train("T", 3, x, y, TrainConfig(epochs=2, batch_size=16,
                                            channels=(2, 2, 4, 4)), 7, str(tmp_path))
    assert trained_other and other != path
    # A damaged file is retrained, giving the same weights as the first training.
    with open(path, "wb") as handle:
        handle.write(b"truncated")
    third, retrained, _ = load_or_train("T", 3, x, y, config, 7, str(tmp_path))
    assert retrained
    for a, b in zip(first.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ analysis functions

# The zeroed head below makes every gradient zero on purpose; the library says so.
@pytest.mark.filterwarnings("ignore:.*gradient is identically zero:RuntimeWarning")
def test_features_and_gradients_match_the_sketch():
    torch.manual_seed(3)
    model = SmallResNet(4, channels=(3, 3, 5, 5)).eval()
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    layers = model.block_names
    fg = demo.features_and_gradients(model, x, layers, batch=7)
    m, seed = 8, 11
    rep = sketch_model(model, [x[:13], x[13:]], layers=layers, m=m, seed=seed,
                       dtype=torch.float64, progress=False)
    S = ops.sketch_matrix(30, m, seed, dtype=torch.float64)
    for name in layers:
        f, g = fg[name]
        assert f.shape == (30, int(np.prod(model.features(x[:1])[name].shape[1:])))
        torch.testing.assert_close(S @ f, rep.layer(name).sketch_f, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(S @ g, rep.layer(name).sketch_g, rtol=1e-9, atol=1e-12)
    # With a uniform predictive p = q, so the expected gradient vanishes at every layer.
    flat = SmallResNet(4, channels=(3, 3, 5, 5)).eval()
    torch.nn.init.zeros_(flat.head.weight)
    torch.nn.init.zeros_(flat.head.bias)
    for _, g in demo.features_and_gradients(flat, x, layers).values():
        assert float(g.abs().max()) == 0.0


def test_linear_probe_converges_on_separable_data():
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, 3, (300,), generator=generator)
    points = centres[labels] + 0.3 * torch.randn(300, 6, generator=generator, dtype=torch.float64)
    converged = demo.linear_probe_accuracy(points[:200], labels[:200], points[200:], labels[200:],
                                           3, one_epoch=False)
    one = demo.linear_probe_accuracy(points[:200], labels[:200], points[200:], labels[200:], 3,
                                     one_epoch=True)
    assert converged == 1.0
    assert 0.0 <= one <= 1.0


def test_pair_statistics_groups_model_pairs():
    tasks = ["A", "A", "B", "C", "C"]
    matrix = torch.arange(25, dtype=torch.float64).reshape(5, 5)
    stats = demo.pair_statistics([matrix, 2 * matrix], tasks)
    assert set(stats) == {"A-A", "C-C", "A-B", "A-C", "B-C"}     # B has one model: no B-B pair
    assert stats["A-A"]["mean"] == [1.0, 2.0] and stats["A-A"]["n"] == 1
    expected = np.mean([matrix[i, j].item() for i in (0, 1) for j in (3, 4)])
    assert stats["A-C"]["mean"][0] == pytest.approx(expected)
    assert stats["A-C"]["std"][0] == pytest.approx(np.std([3, 4, 8, 9]))


def test_desiderata_verdicts():
    good = {"A-A": 0.9, "B-B": 0.85, "C-C": 0.8, "A-B": 0.7, "A-C": 0.5, "B-C": 0.4}
    verdict = demo.evaluate_desiderata(good)
    assert all(verdict[k]["pass"] for k in ("d1", "d2", "d3"))
    swapped = dict(good, **{"A-C": 0.4, "B-C": 0.5})
    assert not demo.evaluate_desiderata(swapped)["d3"]["pass"]
    assert demo.evaluate_desiderata(swapped)["d2"]["pass"]
    close_cross = dict(good, **{"A-B": 0.88})     # A-B above B-B: (1) fails for B only
    verdict = demo.evaluate_desiderata(close_cross)
    assert not verdict["d1"]["pass"] and "B-B 0.850 <= 0.880" in verdict["d1"]["detail"]
    tie = dict(good, **{"A-B": 0.5})              # ties are not "closer"
    assert not demo.evaluate_desiderata(tie)["d2"]["pass"]


def test_symmetric_model_matrix_equals_the_library_indices():
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(5, 24, 9, generator=generator, dtype=torch.float64)
    kernels = features @ features.transpose(1, 2)
    kernels = kernels - kernels.mean(-1, keepdim=True)
    kernels = kernels - kernels.mean(-2, keepdim=True)
    torch.testing.assert_close(model_matrix(kernels, "nbs"),
                               nbs_matrix(kernels, kernels, centered=False))
    torch.testing.assert_close(model_matrix(kernels, "cka"),
                               cka_matrix(kernels, kernels, centered=False))
    assert model_matrix(kernels, "nbs")[1, 3].item() == pytest.approx(
        nbs(kernels[1], kernels[3], centered=False), rel=1e-12)


# ------------------------------------------------------------------------------ end to end

def check_similarity_entry(entry, layers, tasks):
    R = len(tasks)
    matrices = np.array(entry["matrices"])
    assert matrices.shape == (len(layers), R, R)
    assert np.all(matrices >= 0) and np.all(matrices <= 1 + 1e-9)
    np.testing.assert_allclose(matrices, matrices.transpose(0, 2, 1), atol=1e-9)
    for layer in range(len(layers)):
        diag = np.diag(matrices[layer])
        assert np.all((np.abs(diag - 1) < 1e-6) | (diag == 0))
    # Recompute the task-pair closeness and the verdicts from the raw matrices.
    for a, b in demo.TASK_PAIRS:
        values = [matrices[layer, i, j] for layer in range(len(layers))
                  for i in range(R) for j in range(R)
                  if tasks[i] == a and tasks[j] == b and (a != b or i < j)]
        assert entry["closeness"][f"{a}-{b}"] == pytest.approx(np.mean(values))
    c = entry["closeness"]
    assert entry["desiderata"]["d3"]["pass"] == (c["A-C"] > c["B-C"])
    assert entry["desiderata"]["d2"]["pass"] == (c["A-B"] > c["A-C"] and
                                                 c["A-B"] > c["B-C"])


def check_baselines_and_mean_embeddings(results, layers, R):
    t2v = np.array(results["baselines"]["task2vec"]["similarity"])
    assert t2v.shape == (R, R) and np.all(t2v <= 1 + 1e-9) and np.all(t2v >= -1e-9)
    norms = results["baselines"]["fisher_rao"]["norms"]
    assert len(norms) == R and all(n > 0 for n in norms)
    me = results["mean_embedding"]["per_pair"]
    for s in "ABC":
        for t in "ABC":
            for q in ("norm", "ratio_frobenius", "ratio_trace"):
                assert len(me[s][t][q]["mean"]) == len(layers)
                assert all(v > 0 for v in me[s][t][q]["mean"])
        # A and B share their images and the representation is label-free.
        np.testing.assert_allclose(me[s]["A"]["norm"]["mean"], me[s]["B"]["norm"]["mean"])


def check_exact_section(results, layers, tasks):
    """The exact values are well-formed similarities, and the reported differences are the
    differences between the estimates and those values (recomputed here)."""
    exact = results["exact"]
    assert exact["n"] == min(t["n_test"] for t in results["tasks"].values())
    for kind in demo.KINDS:
        for index in demo.INDICES:
            entry = exact[kind][index]
            check_similarity_entry(entry, layers, tasks)
            truth = np.array(entry["matrices"])
            estimate = np.array(results["similarity"][kind][index]["matrices"])
            upper = np.triu_indices(len(tasks), 1)
            gaps = np.abs(estimate - truth)[:, upper[0], upper[1]]
            assert entry["max_abs_difference"] == pytest.approx(gaps.max(), abs=1e-12)
            assert entry["mean_abs_difference"] == pytest.approx(gaps.mean(), abs=1e-12)
            if index == "cka":     # the default estimator reports standard errors for CKA
                # An unusable bar is written as "inf" (JSON has no infinity).
                errors = np.array(results["similarity"][kind][index]["errors"]).astype(float)
                errors = errors[:, upper[0], upper[1]]
                share = float(np.mean(gaps <= 2 * errors))
                assert entry["within_two_stderr"] == pytest.approx(share)


def check_results(out, mode, seeds_per_task, m):
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mode"] == mode and results["config"]["m"] == m
    layers = results["layers"]
    assert layers == ["block1", "block2", "block3", "block4"]
    models = results["models"]
    assert [x["task"] for x in models] == [t for t in "ABC" for _ in range(seeds_per_task)]
    R = len(models)
    tasks = [x["task"] for x in models]
    for kind in demo.KINDS:
        for index in demo.INDICES:
            check_similarity_entry(results["similarity"][kind][index], layers, tasks)
    for name, maps in results["heatmaps"].items():
        for pair, matrix in maps.items():
            assert np.array(matrix).shape == (len(layers), len(layers)), (name, pair)
    check_baselines_and_mean_embeddings(results, layers, R)
    check_exact_section(results, layers, tasks)
    for t in "ABC":
        for key in ("krr", "probe_one_epoch", "probe_converged"):
            accuracies = results["krr"][t][key]["mean"]
            assert len(accuracies) == len(layers) and all(0 <= a <= 1 for a in accuracies)
    report = (out / "report.md").read_text()
    for heading in ("## Desiderata", "## Estimates against exact values", "## Similarity per block",
                    "## Baselines",
                    "## Kernel mean embedding", "## Kernel ridge regression"):
        assert heading in report
    assert report.count("| features∘gradients | CKA |") == 1
    return results


def verdict_lines(stdout):
    return [line for line in stdout.splitlines()
            if line.split()[-3:] and all(w in ("PASS", "FAIL") for w in line.split()[-3:])]


def test_tiny_demo_end_to_end_then_cached_and_deterministic(tmp_path, capsys):
    out = tmp_path / "tiny"
    argv = ["demo", "--tiny", "--out", str(out), "--no-progress", "--quiet", "--no-figures"]
    assert cli.main(argv) == 0
    first_out = capsys.readouterr().out
    assert len(verdict_lines(first_out)) == 8
    first = check_results(out, "tiny", 2, 32)
    assert all(x["trained_now"] for x in first["models"])
    # The default takes CKA from the joint pass; the tiny test split (32 rows) is one block,
    # where that estimate is the exact value over all pairs and its error bars are 0.
    assert first["config"]["sketch"]["estimator"] == "joint"
    for kind in demo.KINDS:
        assert first["exact"][kind]["cka"]["max_abs_difference"] < 1e-8, kind
        assert np.all(np.array(first["similarity"][kind]["cka"]["errors"]) == 0)
    assert first["figures"] == [] and not list(out.glob("*.png"))
    assert len(list((out / "models").glob("*.pt"))) == 6

    assert cli.main(argv) == 0
    second_out = capsys.readouterr().out
    second = check_results(out, "tiny", 2, 32)
    assert not any(x["trained_now"] for x in second["models"])
    assert second["timings"]["train"] < first["timings"]["train"]
    # Same seed, same cached weights: the same numbers, bit for bit.
    assert second["similarity"] == first["similarity"]
    assert second["mean_embedding"] == first["mean_embedding"]
    assert verdict_lines(second_out) == verdict_lines(first_out)


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    lines = verdict_lines(stdout)
    assert len(lines) == 8 and lines[-1].startswith("Fisher-Rao")
    results = check_results(out, "quick", 3, 128)
    assert len(results["figures"]) == 7
    for name in results["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # The models learned their tasks (chance: 0.1, 0.05, 0.1).
    for model in results["models"]:
        assert model["test_accuracy"] > 0.6, model
    for line in lines:
        assert line.count("PASS") + line.count("FAIL") == 3
    assert math.isfinite(results["timings"]["total"])
    # The joint CKA over 539 rows in blocks of up to 512: far inside the 0.03 target of the
    # sketch (its error falls like 1 / sqrt(N x block)), and mostly within its error bars.
    for kind in demo.KINDS:
        check = results["exact"][kind]["cka"]
        assert check["max_abs_difference"] < 0.01 and check["within_two_stderr"] > 0.8, kind


def test_run_demo_takes_numpy_scalars(tmp_path):
    results = demo.run_demo(tmp_path / "np", mode="tiny", seed=np.int64(0),
                            threads=np.int64(1), progress=False, verbose=False,
                            figures=False, summary=False)
    assert results["config"]["seed"] == 0 and type(results["config"]["seed"]) is int
    assert json.loads((tmp_path / "np" / "results.json").read_text())["config"]["seed"] == 0


@pytest.mark.parametrize("argv, match", [
    (["--width", "8"], "width applies to the ResNet-18 of a data_root run"),
    (["--models-per-task", "1"], "models_per_task must be in [2, inf]"),
    (["--estimator", "exact"], "invalid choice: 'exact'"),
    (["--spatial", "max"], "invalid choice"),
])
def test_demo_argument_errors(tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    assert cli.main(["demo", "--tiny", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err
    assert not out.exists()


def test_debiased_demo_reports_errors_and_warnings(tmp_path, capsys):
    out = tmp_path / "est"
    argv = ["demo", "--tiny", "--out", str(out), "--no-progress", "--quiet", "--no-figures",
            "--debiased", "--estimator", "sketch"]
    assert cli.main(argv) == 0
    assert len(verdict_lines(capsys.readouterr().out)) == 8
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["sketch"]["estimator"] == "sketch"
    assert results["config"]["sketch"]["debiased"] is True
    # m = 32 is far too small for these layers: the library says so, once per message.
    assert any("is too small" in w for w in results["warnings"])
    assert len(set(results["warnings"])) == len(results["warnings"])
    for kind in demo.KINDS:
        cka = results["similarity"][kind]["cka"]
        errors = np.array(cka["errors"])
        assert errors.shape == np.array(cka["matrices"]).shape and np.all(errors >= 0)
        assert "errors" not in results["similarity"][kind]["nbs"]     # NBS has no error bars
        # Debiased CKA can be negative; the exact check uses the debiased index too.
        matrices = np.array(cka["matrices"])
        assert np.all(np.abs(matrices) <= 1 + 1e-9)
        assert results["exact"][kind]["cka"]["max_abs_difference"] == pytest.approx(
            np.abs(matrices - np.array(results["exact"][kind]["cka"]["matrices"])).max(), abs=1e-12)
    report = (out / "report.md").read_text()
    assert "Estimated standard error of one value" in report and "## Warnings" in report
    assert "debiased HSIC" in report


def test_tiny_demo_with_the_sketch_estimator(tmp_path, capsys):
    out = tmp_path / "sketch"
    argv = ["demo", "--tiny", "--out", str(out), "--no-progress", "--quiet", "--no-figures",
            "--estimator", "sketch"]
    assert cli.main(argv) == 0
    assert len(verdict_lines(capsys.readouterr().out)) == 8
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["sketch"]["estimator"] == "sketch"
    matrices = np.array(results["similarity"]["hadamard"]["cka"]["matrices"])
    assert matrices.shape == (4, 6, 6) and np.isfinite(matrices).all()


def test_settings_overrides_are_checked():
    tiny = demo.settings_for("tiny")
    changed = demo.with_overrides(tiny, models_per_task=np.int64(3), m=64, epochs=1)
    assert (changed.seeds_per_task, changed.m, changed.train.epochs) == (3, 64, 1)
    with pytest.raises(ValueError, match="estimator 'exact' needs unsketched"):
        demo.with_overrides(tiny, estimator="exact")
    with pytest.raises(ValueError, match="spatial must be one of"):
        demo.with_overrides(tiny, spatial="max")
    files = demo.settings_for("quick", data_root="somewhere")
    assert (files.width, files.spatial, files.m) == (8, "mean", 128)


@pytest.mark.parametrize("debiased", [False, True])
def test_joint_cka_pairs_each_model_with_its_own_task(debiased):
    """The demo's joint pass feeds each model its own task's rows (paired by index across
    tasks) and puts every (model, block) at the right place: with all rows in one block each
    entry is the exact CKA of those two models on their tasks' rows, computed here from exact
    representations, and the heatmaps are the cross matrices of the same values."""
    from types import SimpleNamespace

    from nnsim_fast import similarity
    from nnsim_fast.app.demo.joint_stage import joint_cka
    from nnsim_fast.extract import exact_model

    n = 150
    tasks = {name: SimpleNamespace(x_test=torch.randn(n, 6) + shift)
             for name, shift in zip("ABC", (0.0, 1.0, -2.0))}
    models = []
    for task in "ABCA":
        net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5),
                                  torch.nn.Tanh(), torch.nn.Linear(5, 4))
        models.append(SimpleNamespace(model=net, task=task))
    layers = ["1", "3"]
    settings = demo.with_overrides(demo.settings_for("tiny"), debiased=debiased)
    pairs = [(0, 1), (1, 3)]
    out = joint_cka(models, tasks, layers, settings, seed=5, heatmap_pairs=pairs, bars=False)
    exact = [exact_model(entry.model, [tasks[entry.task].x_test], layers=layers, progress=False)
             for entry in models]
    for kind in demo.KINDS:
        for i in range(len(models)):
            for j in range(len(models)):
                expected = similarity(exact[i], exact[j], kind=kind, debiased=debiased).matrix
                for block in range(len(layers)):
                    assert float(out[kind]["matrices"][block][i, j]) == pytest.approx(
                        float(expected[block, block]), abs=1e-6), (kind, i, j, block)
                if (i, j) in pairs:
                    np.testing.assert_allclose(out[kind]["heatmaps"][(i, j)].numpy(),
                                               expected.numpy(), atol=1e-6)
        assert all(float(e.abs().max()) == 0 for e in out[kind]["errors"])
