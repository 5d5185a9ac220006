"""What a demo run does: its modes, sizes and the names its results use."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ... import options
from ..._checks import check_bool, check_choice, check_int, check_optional_int
from ...models import TrainConfig

__all__ = ["DemoSettings", "MODES", "KINDS", "KIND_LABELS", "INDICES", "TASK_PAIRS",
           "MEAN_EMBEDDING_QUANTITIES", "settings_for", "with_overrides"]

MODES = ("full", "quick", "tiny")
#: The kernels the demo compares (paper fig. 1).
KINDS = ("feature", "gradient", "hadamard")
KIND_LABELS = {"feature": "features only", "gradient": "gradients only",
               "hadamard": "features∘gradients"}
INDICES = options.INDICES
#: Unordered task pairs, same-task pairs first; keys are written "A-B".
TASK_PAIRS: Tuple[Tuple[str, str], ...] = (
    ("A", "A"), ("B", "B"), ("C", "C"), ("A", "B"), ("A", "C"), ("B", "C"))
MEAN_EMBEDDING_QUANTITIES = ("norm", "frobenius_factor", "trace_factor", "ratio_frobenius",
                             "ratio_trace", "log_ratio_frobenius")
#: Rows per batch when the demo sketches, probes or evaluates.
BATCH = 256
TASK_COLOURS = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green"}


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run does.

    ``seeds_per_task`` models per task; sketches with ``m`` buckets; models trained with
    ``train``; ``n_train`` / ``n_test`` cut the splits (None: whole); Task2Vec uses the first
    ``task2vec_samples`` test images of each model's task; linear probes to convergence run
    L-BFGS for at most ``probe_iterations`` iterations.  ``data_root`` None plays the paper's
    datasets with the bundled stand-ins and :class:`~nnsim_fast.models.SmallResNet`;
    a folder reads CIFAR-10, CIFAR-100 and SVHN from it and trains ResNet-18 of first-stage
    width ``width``.  ``spatial`` pools feature maps for the sketch; ``estimator`` and
    ``debiased`` choose how similarities are estimated (:data:`nnsim_fast.options.DEMO_ESTIMATORS`).
    """

    mode: str
    seeds_per_task: int
    m: int
    train: TrainConfig
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    task2vec_samples: Optional[int] = 300
    probe_iterations: int = 100
    data_root: Optional[str] = None
    width: Optional[int] = None
    spatial: str = "flatten"
    estimator: str = "joint"
    debiased: bool = False


def _bundled(mode: str) -> DemoSettings:
    train = TrainConfig(epochs=6, batch_size=64, lr=3e-3, weight_decay=1e-4,
                        channels=(16, 16, 32, 32))
    if mode == "full":
        return DemoSettings("full", 5, 512, train)
    if mode == "quick":
        return DemoSettings("quick", 3, 128, train)
    return DemoSettings("tiny", 2, 32, replace(train, epochs=3, channels=(4, 4, 8, 8)),
                        n_train=240, n_test=96, task2vec_samples=48, probe_iterations=30)


def _from_files(mode: str, data_root: str) -> DemoSettings:
    # Sized for a 2-core CPU: ResNet-18 at width 16 trains at 4-12 ms per 32x32 image on one
    # core (quiet to busy machine), and training is most of the run.  Flattened 32x32 maps
    # would make every sketch [m, 16384] and the exact mean embedding 16384^2, hence
    # spatial="mean".
    train = TrainConfig(epochs=3, batch_size=64, lr=3e-3, weight_decay=1e-4, channels=())
    common = {"data_root": data_root, "spatial": "mean"}
    if mode == "full":
        return DemoSettings("full", 3, 512, train, n_train=2000, n_test=500, width=16, **common)
    if mode == "quick":
        return DemoSettings("quick", 2, 128, replace(train, epochs=2), n_train=600, n_test=200,
                            width=8, **common)
    return DemoSettings("tiny", 2, 32, replace(train, epochs=1), n_train=64, n_test=32,
                        task2vec_samples=16, probe_iterations=30, width=4, **common)


def settings_for(mode: str, data_root: Optional[str] = None) -> DemoSettings:
    """The settings of ``mode``.

    Bundled tasks: ``"full"`` (5 models per task, m = 512, the paper's m), ``"quick"`` (3 per
    task, m = 128, same training so cached weights are shared) or ``"tiny"`` (2 per task on
    small subsets with a narrow network: a smoke test of the pipeline).  With ``data_root``
    (CIFAR-10, CIFAR-100, SVHN files): ``"full"`` (3 ResNet-18 of width 16 per task on 2,000
    training and 500 test images, 3 epochs, m = 512), ``"quick"`` (2 of width 8 per task,
    600 / 200 images, 2 epochs, m = 128) or ``"tiny"``.
    """
    check_choice(mode, "mode", MODES)
    return _bundled(mode) if data_root is None else _from_files(mode, str(data_root))


def with_overrides(settings: DemoSettings, *, models_per_task: Optional[int] = None,
                   n_train: Optional[int] = None, n_test: Optional[int] = None,
                   epochs: Optional[int] = None, width: Optional[int] = None,
                   m: Optional[int] = None, spatial: Optional[str] = None,
                   estimator: Optional[str] = None, debiased: bool = False) -> DemoSettings:
    """``settings`` with the given values replaced (None keeps a value); checked."""
    if width is not None and settings.data_root is None:
        raise ValueError("width applies to the ResNet-18 of a data_root run; the bundled "
                         "tasks train SmallResNet")
    if estimator == "exact":
        raise ValueError("estimator 'exact' needs unsketched representations, which the demo "
                         "does not keep; use nnsim-fast compare on a subset")
    changes = {
        "seeds_per_task": check_optional_int(models_per_task, "models_per_task", 2),
        "n_train": check_optional_int(n_train, "n_train", 1),
        "n_test": check_optional_int(n_test, "n_test", 1),
        "width": check_optional_int(width, "width", 1),
        "m": check_optional_int(m, "m", 1),
        "spatial": None if spatial is None else check_choice(spatial, "spatial", options.SPATIAL),
        "estimator": (None if estimator is None else
                      check_choice(estimator, "estimator", options.DEMO_ESTIMATORS)),
        "debiased": check_bool(debiased, "debiased") or None,
    }
    settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if epochs is not None:
        settings = replace(settings, train=replace(settings.train,
                                                   epochs=check_int(epochs, "epochs", 1)))
    return settings
