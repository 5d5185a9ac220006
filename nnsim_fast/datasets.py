"""Image classification data: the demo's bundled tasks, and readers of CIFAR and SVHN files.

**Bundled tasks** (no downloads, deterministic, CPU-sized).  The seed paper compares ResNets
trained on CIFAR-10, CIFAR-100 and SVHN.  The demo keeps the design -- two tasks on one image
domain, one coarse and one finer and harder, and a third task on a different domain with as
many classes as the coarse one -- with data that ships inside scikit-learn or is generated
here:

``A`` (plays CIFAR-10)   scikit-learn's handwritten digits, 8x8 grey images, 10 classes.
``B`` (plays CIFAR-100)  the same images, 20 classes: digit x stroke weight.  An image is
                         "heavy" when its total ink (sum of pixel values) is above the median
                         ink of its digit in the training split, "light" otherwise, and its
                         label is ``2 * digit + heavy``.  The attribute is a plain function of
                         the pixels (a global sum, which a convolutional network with global
                         pooling computes easily), so the task is learnable; it is harder than
                         ``A`` because images near their digit's median ink differ by little.
                         Splitting at the per-digit median keeps the 20 classes balanced.
``C`` (plays SVHN)       procedurally generated 8x8 grey textures and shapes, 10 classes
                         (:data:`SHAPE_CLASSES`), each drawn with a random pose (position,
                         size, phase, period), a random contrast and background, and Gaussian
                         pixel noise, from a seeded ``numpy`` generator.

Images are ``float32`` tensors ``[N, 1, 8, 8]`` with values in [0, 1]; labels are ``int64``.
The train/test splits are fixed (they belong to the task, like CIFAR's), independent of any
model seed.

**The paper's datasets from disk** (:func:`load_cifar10`, :func:`load_cifar100`,
:func:`load_svhn`, :func:`load_paper_tasks`): read from the files their publishers
distribute, in the folder layout torchvision also uses, and never downloaded::

    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch   (CIFAR-10, python)
    ROOT/cifar-100-python/train, test                                    (CIFAR-100, python)
    ROOT/train_32x32.mat, ROOT/test_32x32.mat                            (SVHN, format 2)

They return ``float32`` images ``[N, 3, 32, 32]`` in [0, 1] and ``int64`` labels.  The CIFAR
files are Python pickles; a pickle can name any function to call while loading, so they are
read with an unpickler that builds only dicts, lists, strings, bytes, numbers and numpy
arrays and refuses every other global (see :class:`ArrayUnpickler`).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "Task", "TASK_NAMES", "SHAPE_CLASSES", "load_tasks", "digits_task", "digits_weight_task",
    "shapes_task", "render_shapes", "stroke_weight_labels",
    "DATASETS", "SPLITS", "PAPER_DATASETS", "ArrayUnpickler", "dataset_files", "missing_files",
    "load_cifar10", "load_cifar100", "load_svhn", "load_images", "load_paper_tasks",
]

#: The demo's task names, in the order the paper lists its datasets.
TASK_NAMES: Tuple[str, str, str] = ("A", "B", "C")

#: Class names of task C, in label order.
SHAPE_CLASSES: Tuple[str, ...] = (
    "horizontal stripes", "vertical stripes", "diagonal stripes", "anti-diagonal stripes",
    "checkerboard", "filled square", "hollow square", "disk", "plus", "ramp",
)

_SIZE = 8
_SPLIT_SEED = 20240917          # fixes which digits are test images; part of the task definition
_TEST_FRACTION = 0.3
_SHAPES_SEED = 8128             # fixes task C's images
_SHAPES_TRAIN = 1400
_SHAPES_TEST = 600


@dataclass
class Task:
    """One classification task: fixed train and test splits of ``[N, 1, 8, 8]`` images in [0, 1]."""

    name: str
    role: str                     # which dataset of the paper it plays
    description: str
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: List[str] = field(default_factory=list)

    def subset(self, n_train: Optional[int], n_test: Optional[int]) -> "Task":
        """The first ``n_train`` / ``n_test`` samples of each split (None keeps a split whole)."""
        return Task(self.name, self.role, self.description, self.num_classes,
                    self.x_train[:n_train], self.y_train[:n_train],
                    self.x_test[:n_test], self.y_test[:n_test], list(self.class_names))

    def summary(self) -> Dict[str, object]:
        return {"name": self.name, "role": self.role, "description": self.description,
                "num_classes": self.num_classes, "n_train": int(self.x_train.shape[0]),
                "n_test": int(self.x_test.shape[0])}


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Train and test row indices with each class split in the same proportion; both shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(rows) * test_fraction))
        test.append(rows[:cut])
        train.append(rows[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a demo dependency
        raise ImportError("the demo's digit tasks need scikit-learn (pip install "
                          "'nnsim-fast[demo]')") from error
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)      # pixel values 0..16 -> [0, 1]
    labels = digits.target.astype(np.int64)
    train, test = _stratified_split(labels, _TEST_FRACTION, _SPLIT_SEED)
    return images[train], labels[train], images[test], labels[test]


def _as_task_tensors(images: np.ndarray, labels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def digits_task() -> Task:
    """Task A: scikit-learn's digits, 10 classes (1257 train / 540 test images)."""
    x_train, y_train, x_test, y_test = _digits_arrays()
    xtr, ytr = _as_task_tensors(x_train, y_train)
    xte, yte = _as_task_tensors(x_test, y_test)
    return Task("A", "CIFAR-10", "handwritten digits (scikit-learn), 10 classes: the digit",
                10, xtr, ytr, xte, yte, [str(d) for d in range(10)])


def stroke_weight_labels(images: np.ndarray, digits: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Fine labels ``2 * digit + heavy``, heavy = total ink above the digit's median ink.

    Args:
        images: ``[N, 8, 8]`` pixel values.
        digits: ``[N]`` digit labels in [0, 10).
        medians: ``[10]`` median ink (sum of pixels) of each digit, from the training split.

    Returns:
        int64 ``[N]`` labels in [0, 20).
    """
    ink = images.reshape(images.shape[0], -1).sum(axis=1)
    heavy = (ink > medians[digits]).astype(np.int64)
    return 2 * digits + heavy


def digits_weight_task() -> Task:
    """Task B: the digits of task A labelled digit x stroke weight, 20 balanced classes."""
    x_train, d_train, x_test, d_test = _digits_arrays()
    ink = x_train.reshape(x_train.shape[0], -1).sum(axis=1)
    medians = np.array([np.median(ink[d_train == d]) for d in range(10)])
    y_train = stroke_weight_labels(x_train, d_train, medians)
    y_test = stroke_weight_labels(x_test, d_test, medians)
    xtr, ytr = _as_task_tensors(x_train, y_train)
    xte, yte = _as_task_tensors(x_test, y_test)
    names = [f"{d}-{w}" for d in range(10) for w in ("light", "heavy")]
    return Task("B", "CIFAR-100", "the same digits, 20 classes: digit x stroke weight (total ink "
                "above or below the digit's median)", 20, xtr, ytr, xte, yte, names)


# ----------------------------------------------------------------------------------- task C

def _grid() -> Tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64)
    return rows, cols


def _stripes(rng: np.random.Generator, direction: Tuple[float, float]) -> np.ndarray:
    rows, cols = _grid()
    period = rng.uniform(2.5, 4.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    coordinate = direction[0] * rows + direction[1] * cols
    return (np.sin(2 * np.pi * coordinate / period + phase) > 0).astype(np.float64)


def _checkerboard(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _grid()
    cell = int(rng.integers(1, 3))
    shift_r, shift_c = rng.integers(0, 2 * cell, size=2)
    return (((rows + shift_r) // cell + (cols + shift_c) // cell) % 2).astype(np.float64)


def _square(rng: np.random.Generator, hollow: bool) -> np.ndarray:
    size = int(rng.integers(4, 7) if hollow else rng.integers(3, 6))
    top, left = rng.integers(0, _SIZE - size + 1, size=2)
    image = np.zeros((_SIZE, _SIZE))
    image[top:top + size, left:left + size] = 1.0
    if hollow:
        image[top + 1:top + size - 1, left + 1:left + size - 1] = 0.0
    return image


def _disk(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _grid()
    radius = rng.uniform(1.8, 3.0)
    centre = rng.uniform(radius - 0.5, _SIZE - radius - 0.5, size=2)
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2).astype(np.float64)


def _plus(rng: np.random.Generator) -> np.ndarray:
    arm = int(rng.integers(2, 4))
    r, c = rng.integers(arm, _SIZE - arm, size=2)
    image = np.zeros((_SIZE, _SIZE))
    image[r - arm:r + arm + 1, c] = 1.0
    image[r, c - arm:c + arm + 1] = 1.0
    return image


def _ramp(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _grid()
    angle = rng.uniform(0.0, 2 * np.pi)
    value = np.cos(angle) * rows + np.sin(angle) * cols
    return (value - value.min()) / (value.max() - value.min())


_SHAPE_MAKERS: Tuple[Callable[[np.random.Generator], np.ndarray], ...] = (
    lambda rng: _stripes(rng, (1.0, 0.0)),
    lambda rng: _stripes(rng, (0.0, 1.0)),
    lambda rng: _stripes(rng, (0.7071, 0.7071)),
    lambda rng: _stripes(rng, (0.7071, -0.7071)),
    _checkerboard,
    lambda rng: _square(rng, hollow=False),
    lambda rng: _square(rng, hollow=True),
    _disk,
    _plus,
    _ramp,
)


def render_shapes(labels: Sequence[int], seed: int, noise: float = 0.08) -> np.ndarray:
    """Images ``[N, 8, 8]`` in [0, 1] of the shape classes ``labels`` (see :data:`SHAPE_CLASSES`).

    Each image is its class's pattern with a random pose, scaled by a random contrast in
    [0.6, 1.0] over a random background level in [0, 0.25], plus Gaussian noise of standard
    deviation ``noise``, clipped to [0, 1].  Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((len(labels), _SIZE, _SIZE))
    for i, label in enumerate(labels):
        if not 0 <= int(label) < len(_SHAPE_MAKERS):
            raise ValueError(f"labels must lie in [0, {len(_SHAPE_MAKERS)}), got {label}")
        pattern = _SHAPE_MAKERS[int(label)](rng)
        background = rng.uniform(0.0, 0.25)
        contrast = rng.uniform(0.6, 1.0)
        image = background + contrast * pattern + rng.normal(0.0, noise, size=(_SIZE, _SIZE))
        images[i] = np.clip(image, 0.0, 1.0)
    return images.astype(np.float32)


def shapes_task(n_train: int = _SHAPES_TRAIN, n_test: int = _SHAPES_TEST,
                seed: int = _SHAPES_SEED) -> Task:
    """Task C: generated shapes and textures, 10 balanced classes (default 1400 / 600 images)."""
    for value, name in ((n_train, "n_train"), (n_test, "n_test")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    classes = len(SHAPE_CLASSES)
    labels = rng.permutation(np.arange(n_train + n_test) % classes)
    images = render_shapes(labels, seed + 1)
    xtr, ytr = _as_task_tensors(images[:n_train], labels[:n_train])
    xte, yte = _as_task_tensors(images[n_train:], labels[n_train:])
    return Task("C", "SVHN", "generated shapes and textures with random pose and noise, "
                "10 classes", classes, xtr, ytr, xte, yte, list(SHAPE_CLASSES))


def load_tasks() -> Dict[str, Task]:
    """The three demo tasks by name: ``{"A": ..., "B": ..., "C": ...}``."""
    return {"A": digits_task(), "B": digits_weight_task(), "C": shapes_task()}


# ------------------------------------------------------------------------- files on disk

#: Datasets the readers below know, by name.
DATASETS: Tuple[str, ...] = ("cifar10", "cifar100", "svhn")
#: Splits every dataset has.
SPLITS: Tuple[str, ...] = ("train", "test")
#: Which dataset plays which demo task (the paper's setting).
PAPER_DATASETS: Dict[str, str] = {"A": "cifar10", "B": "cifar100", "C": "svhn"}

_DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
_FILES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "cifar10": {"train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                "test": ("cifar-10-batches-py/test_batch",)},
    "cifar100": {"train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)},
    "svhn": {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
}
_SOURCES = {
    "cifar10": "the CIFAR-10 python version (cifar-10-python.tar.gz, extracted)",
    "cifar100": "the CIFAR-100 python version (cifar-100-python.tar.gz, extracted)",
    "svhn": "SVHN format 2 (cropped digits: train_32x32.mat, test_32x32.mat)",
}
_CIFAR_PIXELS = 3 * 32 * 32


def _check_dataset(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def dataset_files(name: str, root: "os.PathLike[str] | str", split: str) -> List[str]:
    """The files :func:`load_images` reads for ``name`` / ``split`` under ``root``."""
    _check_dataset(name, split)
    root = os.path.expanduser(os.fspath(root))
    return [os.path.join(root, relative) for relative in _FILES[name][split]]


def missing_files(root: "os.PathLike[str] | str",
                  names: Sequence[str] = DATASETS) -> List[str]:
    """Every file of the datasets ``names`` (both splits) that is absent under ``root``."""
    return [path for name in names for split in SPLITS
            for path in dataset_files(name, root, split) if not os.path.isfile(path)]


def _require(name: str, paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{_DATASET_TITLES[name]}: missing file {path!r}; expected {_SOURCES[name]} "
                "in that place (nothing is downloaded)")


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler for data files: dicts, lists, strings, bytes, numbers and numpy arrays only.

    ``pickle.load`` calls whatever global a file names, so a crafted "dataset" could run any
    code.  This unpickler resolves only the few globals that rebuild numpy arrays (under their
    numpy 1 and numpy 2 module names) and ``_codecs.encode``, which Python 3 itself writes
    for bytes at pickle protocols below 3 and which only converts a string to bytes.  Any
    other global raises ``pickle.UnpicklingError`` naming it.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a data "
                                         "file may only hold numpy arrays, lists and dicts")
        for spelling in ("numpy.core.", "numpy._core."):
            # Files name the module of the numpy that wrote them; numpy 2 renamed numpy.core
            # to numpy._core (and warns on the old name), so use the one installed.
            if module.startswith(spelling):
                module = _NUMPY_CORE + "." + module[len(spelling):]
        return super().find_class(module, name)


_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"


def _unpickle(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            # Python 2 pickles: their str objects (keys, pixel buffers) come back as bytes.
            obj = ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path!r} is not a readable data pickle: {error}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in obj.items()}


def _cifar_batch(path: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path!r} has no {key!r} entry (keys: {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path!r}: 'data' must be a uint8 array [N, {_CIFAR_PIXELS}], got "
                         f"{getattr(data, 'dtype', type(data).__name__)} "
                         f"{getattr(data, 'shape', '')}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r}: {label_key!r} must hold one integer label per image "
                         f"({data.shape[0]}), got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), _checked_labels(labels, num_classes, path)


def _checked_labels(labels: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path!r}: labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _read_cifar(name: str, root, split: str, limit: Optional[int]
                ) -> Tuple[np.ndarray, np.ndarray]:
    label_key = "labels" if name == "cifar10" else "fine_labels"
    paths = dataset_files(name, root, split)
    _require(name, paths)
    images, labels, count = [], [], 0
    for path in paths:
        if limit is not None and count >= limit:
            break       # later batches are not needed: the first ``limit`` images are read
        x, y = _cifar_batch(path, label_key, _NUM_CLASSES[name])
        images.append(x)
        labels.append(y)
        count += x.shape[0]
    return np.concatenate(images), np.concatenate(labels)


def _read_svhn(root, split: str) -> Tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    (path,) = dataset_files("svhn", root, split)
    _require("svhn", [path])
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as error:  # scipy raises assorted types for damaged files
        raise ValueError(f"{path!r} is not a readable MATLAB file: {error}") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 \
            or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path!r}: 'X' must be a uint8 array [32, 32, 3, N], got "
                         f"{getattr(x, 'dtype', None)} {getattr(x, 'shape', None)}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise ValueError(f"{path!r}: 'y' must hold one label per image ({x.shape[3]}), got "
                         f"{getattr(y, 'shape', None)}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"{path!r}: SVHN labels must lie in [1, 10], got "
                         f"[{labels.min()}, {labels.max()}]")
    # SVHN writes the digit 0 as label 10.
    return x.transpose(3, 2, 0, 1), np.where(labels == 10, 0, labels)


def load_images(name: str, root: "os.PathLike[str] | str", split: str = "train",
                limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split of a dataset read from its distributed files under ``root`` (no download).

    Args:
        name: ``"cifar10"``, ``"cifar100"`` (fine labels, 100 classes) or ``"svhn"``
            (labels 0-9; the files write 0 as 10).
        root: the folder holding the files (layout in the module docstring).
        split: ``"train"`` or ``"test"``.
        limit: keep the first ``limit`` images (None: all); CIFAR-10 then reads only the
            batches it needs.

    Returns:
        ``(images float32 [N, 3, 32, 32] in [0, 1], labels int64 [N])``.

    Raises:
        FileNotFoundError: a file is missing (the message names it and what to put there).
        ValueError: a file is not in the expected format, or refers to code to run.
    """
    _check_dataset(name, split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if name == "svhn":
        images, labels = _read_svhn(root, split)
    else:
        images, labels = _read_cifar(name, root, split, limit)
    images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(np.ascontiguousarray(labels))


def load_cifar10(root, split: str = "train", limit: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (see :func:`load_images`)."""
    return load_images("cifar10", root, split, limit)


def load_cifar100(root, split: str = "train", limit: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 with its 100 fine labels from ``root/cifar-100-python`` (see :func:`load_images`)."""
    return load_images("cifar100", root, split, limit)


def load_svhn(root, split: str = "train", limit: Optional[int] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SVHN (cropped digits) from ``root/{train,test}_32x32.mat`` (see :func:`load_images`)."""
    return load_images("svhn", root, split, limit)


def load_paper_tasks(root: "os.PathLike[str] | str", n_train: Optional[int] = None,
                     n_test: Optional[int] = None) -> Dict[str, Task]:
    """The seed paper's tasks from disk: ``{"A": CIFAR-10, "B": CIFAR-100, "C": SVHN}``.

    Each task keeps the first ``n_train`` training and ``n_test`` test images of its
    dataset (None: all).  Every file is checked before any is read, so a missing dataset is
    reported at once (``FileNotFoundError`` naming the first missing file).
    """
    for name in PAPER_DATASETS.values():
        _require(name, [path for split in SPLITS for path in dataset_files(name, root, split)])
    tasks = {}
    for task, name in PAPER_DATASETS.items():
        x_train, y_train = load_images(name, root, "train", n_train)
        x_test, y_test = load_images(name, root, "test", n_test)
        title = _DATASET_TITLES[name]
        tasks[task] = Task(task, title, f"{title}, the first {x_train.shape[0]} training and "
                           f"{x_test.shape[0]} test images", _NUM_CLASSES[name],
                           x_train, y_train, x_test, y_test)
    return tasks
