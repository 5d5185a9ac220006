"""The demo's three image classification tasks: no downloads, deterministic, CPU-sized.

The seed paper compares ResNets trained on CIFAR-10, CIFAR-100 and SVHN.  The demo keeps the
design -- two tasks on one image domain, one coarse and one finer and harder, and a third task
on a different domain with as many classes as the coarse one -- with data that ships inside
scikit-learn or is generated here:

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "Task", "TASK_NAMES", "SHAPE_CLASSES", "load_tasks", "digits_task", "digits_weight_task",
    "shapes_task", "render_shapes", "stroke_weight_labels",
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
