"""The seed paper's experiments: ``nnsim-fast demo``.

ResNets are trained with different seeds on three tasks (A plays CIFAR-10, B CIFAR-100, C
SVHN: bundled stand-ins by default, the datasets themselves with ``data_root``; see
:mod:`nnsim_fast.datasets`).  Each model is sketched on its own task's test split with one
sketch seed, and at every residual stage, for every pair of models, the demo computes:

* CKA and NBS of the feature-only, gradient-only and features∘gradients (Hadamard) kernels
  (paper fig. 1) and checks the paper's three desiderata from the numbers;
* the Task2Vec and Fisher–Rao norm distance baselines (fig. 2, 3);
* block x block similarity heatmaps for pairs of tasks (fig. 5);
* the kernel-mean-embedding quantities of every (trained-on, evaluated-on) pair (fig. 4, 6);
* kernel ridge regression accuracy from sketched kernels (appendix G), next to linear probes
  trained for one epoch and to convergence.

Everything lands in ``results.json``, ``report.md`` and PNG figures under the output directory;
trained weights are cached in ``<out>/models`` so a second run skips training.

Modules: ``settings`` (modes and sizes), ``stages`` (one function per stage), ``analysis``
(the measurements), ``run`` (the stages in order), ``report`` and ``figures`` (outputs),
``command`` (the command-line arguments).
"""
from ...extract import features_and_gradients
from .analysis import (evaluate_desiderata, linear_probe_accuracy, pair_statistics,
                       sketched_krr_accuracy)
from .report import format_desiderata, format_report
from .run import run_demo
from .settings import (INDICES, KINDS, MODES, TASK_PAIRS, DemoSettings, settings_for,
                       with_overrides)

__all__ = [
    "DemoSettings", "MODES", "KINDS", "INDICES", "TASK_PAIRS", "settings_for", "with_overrides",
    "run_demo", "evaluate_desiderata", "pair_statistics", "features_and_gradients",
    "sketched_krr_accuracy", "linear_probe_accuracy", "format_desiderata", "format_report",
]
