"""Tests of the CIFAR-10, CIFAR-100 and SVHN readers on tiny files written here in the exact
formats their publishers distribute, and of ``nnsim-fast demo --data-root`` on them."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from nnsim_fast import cli
from nnsim_fast.datasets import (ArrayUnpickler, load_cifar10, load_cifar100, load_images,
                                 load_paper_tasks, load_svhn, missing_files)

PER_BATCH = 6       # CIFAR-10 images per training batch file (five files)
N_TEST = 5


def _pickle(path, obj, protocol=2):
    # The published files are Python 2 pickles (protocol 2) of dicts with byte-string keys.
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root, rng, per_batch=PER_BATCH, n_test=N_TEST, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for index in range(1, 6):
        data, labels = _images(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{index}",
                {b"batch_label": f"training batch {index} of 5".encode(), b"labels": labels,
                 b"data": data, b"filenames": [b"x.png"] * per_batch}, protocol)
        batches.append((data, labels))
    test = (_images(rng, n_test), rng.integers(0, 10, n_test).tolist())
    _pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test[1],
                                    b"data": test[0], b"filenames": [b"t.png"] * n_test}, protocol)
    _pickle(folder / "batches.meta", {b"label_names": [b"airplane"] * 10,
                                      b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return batches, test


def write_cifar100(root, rng, n_train=PER_BATCH * 5, n_test=N_TEST):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data, fine = _images(rng, n), rng.integers(0, 100, n).tolist()
        coarse = [label // 5 for label in fine]
        _pickle(folder / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                                 b"fine_labels": fine, b"coarse_labels": coarse, b"data": data})
        splits[split] = (data, fine)
    return splits


def write_svhn(root, rng, n_train=PER_BATCH * 5, n_test=N_TEST):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        labels = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)   # 10 is the digit 0
        labels[0, 0] = 10
        savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels})
        splits[split] = (images, labels)
    return splits


@pytest.fixture
def paper_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    return root, write_cifar10(root, rng), write_cifar100(root, rng), write_svhn(root, rng)


# ------------------------------------------------------------------------------ readers

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pixels_and_labels_land_where_they_belong(tmp_path, protocol):
    batches, test = write_cifar10(tmp_path, np.random.default_rng(1), protocol=protocol)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (5 * PER_BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    data = np.concatenate([b[0] for b in batches])
    assert y.tolist() == [label for b in batches for label in b[1]]
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
    for image, channel, row, col in ((0, 0, 0, 0), (7, 1, 5, 30), (29, 2, 31, 31)):
        expected = data[image, channel * 1024 + row * 32 + col] / 255.0
        assert float(x[image, channel, row, col]) == pytest.approx(expected, abs=1e-7)
    x_test, y_test = load_cifar10(tmp_path, "test")
    assert x_test.shape[0] == N_TEST and y_test.tolist() == test[1]


def test_cifar10_limit_reads_only_the_batches_it_needs(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"damaged")
    x, y = load_cifar10(tmp_path, limit=2 * PER_BATCH - 1)
    assert x.shape[0] == y.shape[0] == 2 * PER_BATCH - 1
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_cifar100_uses_the_fine_labels(tmp_path):
    splits = write_cifar100(tmp_path, np.random.default_rng(3))
    x, y = load_cifar100(tmp_path, "train")
    assert x.shape == (5 * PER_BATCH, 3, 32, 32) and y.tolist() == splits["train"][1]
    assert int(y.max()) >= 20          # coarse labels stop at 19
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8).reshape(-1, 3072),
                                  splits["train"][0])


def test_svhn_layout_and_label_ten_is_zero(tmp_path):
    splits = write_svhn(tmp_path, np.random.default_rng(4))
    x, y = load_svhn(tmp_path, "test")
    images, labels = splits["test"]
    assert x.shape == (N_TEST, 3, 32, 32)
    assert y[0] == 0 and y.tolist() == [0 if v == 10 else int(v) for v in labels[:, 0]]
    # The files store [row, column, channel, image].
    assert float(x[3, 2, 10, 20]) == pytest.approx(images[10, 20, 2, 3] / 255.0, abs=1e-7)
    assert load_svhn(tmp_path, "train", limit=4)[0].shape[0] == 4


def test_a_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(5))
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/test_batch"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train_32x32.mat.*nothing is downloaded"):
        load_svhn(tmp_path)
    assert missing_files(tmp_path, ["cifar10"]) == [str(tmp_path / "cifar-10-batches-py" /
                                                        "test_batch")]
    with pytest.raises(ValueError, match="name must be one of"):
        load_images("mnist", tmp_path)


class _Payload:
    """Unpickling this calls os.remove on a file: what a crafted "dataset" could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.remove, (self.path,)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(folder / "train", {b"data": _Payload(victim), b"fine_labels": [0]})
    with pytest.raises(ValueError, match="refusing to load the global .*remove"):
        load_cifar100(tmp_path)
    assert victim.read_text() == "still here"
    with pytest.raises(pickle.UnpicklingError, match=r"global (__builtin__|builtins)\.eval"):
        ArrayUnpickler(io.BytesIO(pickle.dumps(eval, protocol=2))).load()


def test_malformed_files_are_reported_with_their_path(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(folder / "train", {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match=r"train'?: 'data' must be a uint8 array \[N, 3072\]"):
        load_cifar100(tmp_path)
    _pickle(folder / "train", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 100\)"):
        load_cifar100(tmp_path)
    _pickle(folder / "train", [1, 2, 3])
    with pytest.raises(ValueError, match="holds a list, expected a dict"):
        load_cifar100(tmp_path)


def test_paper_tasks_from_files(paper_root):
    root = paper_root[0]
    tasks = load_paper_tasks(root, n_train=20, n_test=4)
    assert [tasks[t].role for t in "ABC"] == ["CIFAR-10", "CIFAR-100", "SVHN"]
    assert [tasks[t].num_classes for t in "ABC"] == [10, 100, 10]
    for task in tasks.values():
        assert task.x_train.shape == (20, 3, 32, 32) and task.x_test.shape == (4, 3, 32, 32)
    os.remove(root / "cifar-100-python" / "test")
    with pytest.raises(FileNotFoundError, match="CIFAR-100: missing file .*cifar-100-python/test"):
        load_paper_tasks(root)


# ------------------------------------------------------------------------------ the demo on files

def test_demo_on_files_names_a_missing_dataset_before_any_work(paper_root, capsys):
    root = paper_root[0]
    os.remove(root / "train_32x32.mat")
    out = root.parent / "out"
    code = cli.main(["demo", "--quick", "--data-root", str(root), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "train_32x32.mat" in err and err.startswith("nnsim-fast demo: error: --data-root")
    assert not out.exists()


def test_quick_demo_on_files(paper_root, capsys, restore_num_threads):
    root = paper_root[0]
    out = root.parent / "out"
    argv = ["demo", "--quick", "--data-root", str(root), "--out", str(out), "--no-progress",
            "--quiet", "--n-test", "4", "--epochs", "1"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "A is CIFAR-10" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data"] == "files"
    assert results["config"]["model"] == {"name": "ResNet-18", "width": 8}
    assert results["config"]["sketch"]["spatial"] == "mean"
    assert results["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert [results["tasks"][t]["num_classes"] for t in "ABC"] == [10, 100, 10]
    assert [results["tasks"][t]["n_train"] for t in "ABC"] == [5 * PER_BATCH] * 3
    assert [m["task"] for m in results["models"]] == ["A", "A", "B", "B", "C", "C"]
    matrices = np.array(results["similarity"]["hadamard"]["cka"]["matrices"])
    assert matrices.shape == (4, 6, 6) and np.all(matrices >= 0) and np.all(matrices <= 1 + 1e-9)
    assert len(results["figures"]) == 7
    report = (out / "report.md").read_text()
    assert "ResNet-18 for 32x32 images, first-stage width 8" in report
    assert "share their test images" not in report
