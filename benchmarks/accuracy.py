"""How close is sketched CKA to exact CKA?  Writes benchmarks/ACCURACY.md (+ JSON and a plot).

    python benchmarks/accuracy.py            # the full run (a few minutes on 2 cores)
    python benchmarks/accuracy.py --quick    # a smaller check (under a minute); prints only

Two small networks of each of two architectures (an MLP with two hidden layers and a small
CNN) are trained on scikit-learn's digits (1797 8x8 images) from different seeds.  On all
N = 1797 images the exact per-sample features f and expected gradients g of the probed
layers give the exact N x N kernels (K_f for "feature"; K = K_f o K_g for the paper's kernel),
and the exact centred CKA between the two networks, layer by layer.  Then, for each sketch
size m and sketch seed, both networks are sketched with the library
(``Representation.update``, float64 accumulators) and compared with ``similarity``:

* ``feature``   K~_f = (S F)(S F)^T
* ``hadamard``  Algorithm 1 of the paper: (S F)(S F)^T o (S G)(S G)^T
* ``psi``       the sketch of psi(x) = g f^T itself, K~ = S K S^T (exact psi for the
                 MLP and the CNN's logits, a TensorSketch of width 1024 for the CNN's
                 feature maps)

all with ``centering="data"`` (exact: the sketch of the centred data), and Algorithm 1
also with ``centering="buckets"`` (the m x m double centring of the paper's code and the
library's default), "the paper's estimator".  Errors are sketched minus exact CKA; "sd" is
the seed-to-seed standard deviation per layer pair, pooled (root mean square) over layer
pairs; "|bias|" is the root mean square over layer pairs of the per-pair mean error;
"RMSE" pools everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import harness  # first: it finds a checkout's nnsim_fast when none is installed
import nnsim_fast
from nnsim_fast import Representation, psi, similarity, sketch_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BETA = 0.5
#: psi settings per architecture: the MLP's psi (d_f d_g <= 32^2) is kept exactly at every
#: m (the library default budget); for the CNN the budget sends the flattened feature maps
#: (d_f d_g = 256^2 and 128^2) through a TensorSketch of width 1024, while its logits
#: (10^2) stay exact.
PSI_SETTINGS = {"mlp": {"psi_budget": None, "psi_dim": None},
                "cnn": {"psi_budget": 1 << 18, "psi_dim": 1024}}
#: (kind, centering) of every estimator, with a label; the paper's is hadamard + buckets.
ESTIMATORS: Tuple[Tuple[str, str, str], ...] = (
    ("feature", "data", "feature"),
    ("hadamard", "buckets", "hadamard (paper)"),
    ("hadamard", "data", "hadamard, data"),
    ("psi", "data", "psi"),
)
PAPER = "hadamard (paper)"
OURS = "psi"
TARGET_RATIO = 0.5


# --------------------------------------------------------------------------- data and models

def load_data(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Digits as [N, 1, 8, 8] in [0, 1], with a fixed 1300 / 497 train / test split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[:1300], order[1300:]
    return {"x": x, "y": y, "train": train, "test": test}


def make_model(arch: str) -> Tuple[nn.Module, List[str]]:
    """The network and the names of its probed layers (two hidden blocks and the logits)."""
    if arch == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                              nn.ReLU(), nn.Linear(16, 10))
        return model, ["2", "4", "5"]
    if arch == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        return model, ["1", "3", "5"]
    raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")


def train(arch: str, seed: int, data: Dict[str, torch.Tensor], epochs: int
          ) -> Tuple[nn.Module, List[str], float]:
    """A network trained from seed ``seed`` (init and batch order); returns its test accuracy."""
    torch.manual_seed(seed)
    model, layers = make_model(arch)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data["x"][data["train"]], data["y"][data["train"]]
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=generator).split(64):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        test = data["test"]
        accuracy = float((model(data["x"][test]).argmax(1) == data["y"][test]).double().mean())
    return model, layers, accuracy


def features_and_gradients(model: nn.Module, layers: Sequence[str], x: torch.Tensor,
                           beta: float = BETA) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Exact per-sample f and expected gradients g = E_q[d CE / d f] (q ∝ p^beta), float64.

    One forward pass with hooks that keep each probed output in the graph, one backward
    pass from the logits with the direction p - q = E_q[p - e_y]; rows are samples,
    feature maps are flattened.
    """
    modules = dict(model.named_modules())
    outputs: Dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output))
        for name in layers]
    try:
        model = model.double()
        logits = model(x.double())
    finally:
        for handle in handles:
            handle.remove()
    p = torch.softmax(logits.detach(), dim=1)
    q = torch.softmax(beta * torch.log_softmax(logits.detach(), dim=1), dim=1)
    grads = torch.autograd.grad((logits * (p - q)).sum(), [outputs[name] for name in layers])
    feats = {name: outputs[name].detach().flatten(1) for name in layers}
    grads_by_name = {name: grad.flatten(1) for name, grad in zip(layers, grads)}
    model.float()
    return feats, grads_by_name


# --------------------------------------------------------------------------- measurement

def exact_cka(feats: Sequence[Dict[str, torch.Tensor]], grads: Sequence[Dict[str, torch.Tensor]],
              layers: Sequence[str]) -> Dict[str, List[float]]:
    """Exact centred CKA of the two networks at each layer: feature kernel and K_f o K_g
    (the target of both hadamard and psi), plus the uncentred value of the latter."""
    out: Dict[str, List[float]] = {"feature": [], "hadamard": [], "hadamard_uncentred": []}
    for name in layers:
        kf = [f[name] @ f[name].T for f in feats]
        k = [kf[i] * (grads[i][name] @ grads[i][name].T) for i in range(2)]
        out["feature"].append(nnsim_fast.cka(kf[0], kf[1]))
        out["hadamard"].append(nnsim_fast.cka(k[0], k[1]))
        out["hadamard_uncentred"].append(nnsim_fast.cka(k[0], k[1], centered=False))
    out["psi"] = out["hadamard"]
    return out


def sketched_cka(feats, grads, layers: Sequence[str], m: int, seed: int,
                 psi_settings: Dict[str, Optional[int]]) -> Dict[str, List[float]]:
    """Sketched CKA of the two networks at each layer, for every estimator."""
    reps = []
    for f, g in zip(feats, grads):
        rep = Representation(m, seed, beta=BETA, dtype=torch.float64)
        rep.update(f, g, psi=True, **psi_settings)
        reps.append(rep)
    out = {}
    for kind, centering, label in ESTIMATORS:
        matrix, _, _ = similarity(reps[0], reps[1], kind=kind, centering=centering,
                                  layers=list(layers))
        out[label] = [float(v) for v in torch.diagonal(matrix)]
    return out


def check_against_sketch_model(model: nn.Module, layers: Sequence[str], x: torch.Tensor,
                               feats: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]
                               ) -> float:
    """Largest relative difference between the kernels of ``sketch_model`` (the library's
    own extraction) and of ``Representation.update`` on the f and g used here."""
    m, seed = 128, 0
    via_model = sketch_model(model.double(), [x.double()], layers=list(layers), m=m, seed=seed,
                             beta=BETA, dtype=torch.float64)
    model.float()
    direct = Representation(m, seed, beta=BETA, dtype=torch.float64)
    direct.update(feats, grads)
    worst = 0.0
    for name in layers:
        for kind in ("feature", "hadamard"):
            a, b = via_model.kernel(name, kind), direct.kernel(name, kind)
            worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


def summarise(errors: np.ndarray) -> Dict[str, float]:
    """errors [pairs, seeds] -> pooled |bias|, sd, RMSE and the signed mean bias."""
    per_pair_bias = errors.mean(axis=1)
    per_pair_sd = errors.std(axis=1, ddof=1)
    return {"bias": float(per_pair_bias.mean()),
            "abs_bias": float(np.sqrt((per_pair_bias ** 2).mean())),
            "sd": float(np.sqrt((per_pair_sd ** 2).mean())),
            "rmse": float(np.sqrt((errors ** 2).mean()))}


def pooled_sd(errors: np.ndarray) -> float:
    return float(np.sqrt((errors.std(axis=-1, ddof=1) ** 2).mean(axis=-1)))


def sd_ratio_interval(ours: np.ndarray, theirs: np.ndarray, draws: int = 2000,
                      level: float = 0.95) -> List[float]:
    """Bootstrap interval of pooled-sd(ours) / pooled-sd(theirs), errors [pairs, seeds].

    Seeds are resampled jointly for both estimators (they share each seed's S), so the
    interval accounts for their correlation."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, ours.shape[1], size=(draws, ours.shape[1]))
    pairs = np.array([(pooled_sd(ours[:, p]), pooled_sd(theirs[:, p])) for p in picks])
    # with few seeds a resample can repeat one seed throughout and have no spread at all
    ratios = pairs[pairs[:, 1] > 0, 0] / pairs[pairs[:, 1] > 0, 1]
    tail = (1 - level) / 2
    return [float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))]


def sd_slope(sizes: Sequence[int], sds: Sequence[float]) -> float:
    """Least-squares slope of log sd against log m (-1/2 for an error falling as 1/sqrt(m))."""
    return float(np.polyfit(np.log(np.asarray(sizes, dtype=np.float64)), np.log(sds), 1)[0])


def run(quick: bool, seeds: int, epochs: Optional[int], progress: bool = True) -> Dict[str, object]:
    start = time.perf_counter()
    archs = ["mlp"] if quick else ["mlp", "cnn"]
    sizes = [64, 256] if quick else [64, 128, 256, 512, 1024]
    epochs = epochs if epochs is not None else (8 if quick else 15)
    data = load_data()
    x = data["x"]
    results: Dict[str, object] = {
        "host": harness.host_info(), "quick": quick, "sizes": sizes, "seeds": seeds,
        "n": int(x.shape[0]), "beta": BETA, "psi_settings": PSI_SETTINGS,
        "estimators": [{"label": label, "kind": kind, "centering": centering}
                       for kind, centering, label in ESTIMATORS],
        "networks": {}, "pairs": []}
    errors: Dict[Tuple[str, int], List[List[float]]] = {}
    for arch in archs:
        trained = [train(arch, seed, data, epochs) for seed in (0, 1)]
        layers = trained[0][1]
        extracted = [features_and_gradients(model, layers, x) for model, _, _ in trained]
        feats = [e[0] for e in extracted]
        grads = [e[1] for e in extracted]
        consistency = check_against_sketch_model(trained[0][0], layers, x, feats[0], grads[0])
        exact = exact_cka(feats, grads, layers)
        widths = {name: [int(feats[0][name].shape[1]), int(grads[0][name].shape[1])]
                  for name in layers}
        settings = PSI_SETTINGS[arch]
        budget = settings["psi_budget"] or psi.DEFAULT_PSI_BUDGET
        dim = settings["psi_dim"] or psi.DEFAULT_PSI_DIM
        results["networks"][arch] = {
            "test_accuracy": [acc for _, _, acc in trained], "epochs": epochs,
            "layers": layers, "widths": widths,
            "psi_mode": {name: {str(m): ("exact" if psi.psi_width(d[0], d[1], m, budget, dim)
                                         == d[0] * d[1] else f"tensorsketch {dim}")
                                for m in sizes} for name, d in widths.items()},
            "sketch_model_consistency": consistency}
        sketched: Dict[int, List[Dict[str, List[float]]]] = {}
        for m in sizes:
            sketched[m] = []
            for seed in range(seeds):
                sketched[m].append(sketched_cka(feats, grads, layers, m, seed, settings))
            if progress:
                print(f"  {arch} m={m}: {seeds} seeds done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr)
        for i, name in enumerate(layers):
            pair = {"arch": arch, "layer": name, "exact": {k: v[i] for k, v in exact.items()},
                    "sketched": {}}
            for m in sizes:
                pair["sketched"][str(m)] = {}
                for kind, _, label in ESTIMATORS:
                    values = [s[label][i] for s in sketched[m]]
                    pair["sketched"][str(m)][label] = values
                    err = [v - exact[kind][i] for v in values]
                    errors.setdefault((label, m), []).append(err)
                    errors.setdefault((f"{arch}:{label}", m), []).append(err)
            results["pairs"].append(pair)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for (label, m), errs in errors.items():
        table.setdefault(label, {})[str(m)] = summarise(np.array(errs))
    results["summary"] = table
    ratios = {}
    for scope in [""] + [f"{arch}:" for arch in archs]:
        ratios[scope.rstrip(":") or "all"] = {
            str(m): table[scope + OURS][str(m)]["sd"] / table[scope + PAPER][str(m)]["sd"]
            for m in sizes}
    results["sd_ratio_psi_over_paper"] = ratios
    results["sd_ratio_interval"] = {
        str(m): sd_ratio_interval(np.array(errors[(OURS, m)]), np.array(errors[(PAPER, m)]))
        for m in sizes}
    results["sd_slope"] = {label: sd_slope(sizes, [table[label][str(m)]["sd"] for m in sizes])
                           for _, _, label in ESTIMATORS}
    met = {str(m): ratios["all"][str(m)] <= TARGET_RATIO for m in sizes}
    results["target"] = {"ratio": TARGET_RATIO, "met_at": met, "met": all(met.values())}
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


# --------------------------------------------------------------------------- report

def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def statistic_table(results: Dict[str, object], statistic: str, scope: str = "") -> str:
    sizes = results["sizes"]
    rows = []
    for _, _, label in ESTIMATORS:
        entry = results["summary"][scope + label]
        rows.append([label] + [f"{entry[str(m)][statistic]:.4f}" for m in sizes])
    return _table(["estimator"] + [f"m = {m}" for m in sizes], rows)


def ratio_table(results: Dict[str, object]) -> str:
    sizes = results["sizes"]
    rows = [[scope] + [f"{ratios[str(m)]:.2f}" for m in sizes]
            for scope, ratios in results["sd_ratio_psi_over_paper"].items()]
    return _table(["networks"] + [f"m = {m}" for m in sizes], rows)


def layer_table(results: Dict[str, object], m: int) -> str:
    rows = []
    for pair in results["pairs"]:
        exact = pair["exact"]
        cells = [pair["arch"], pair["layer"], f"{exact['feature']:.3f}", f"{exact['hadamard']:.3f}",
                 f"{exact['hadamard_uncentred']:.3f}"]
        for label in ("feature", PAPER, "hadamard, data", OURS):
            values = np.array(pair["sketched"][str(m)][label])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
        rows.append(cells)
    return _table(["net", "layer", "exact feature", "exact K_f∘K_g", "uncentred K_f∘K_g",
                   "feature", PAPER, "hadamard, data", OURS], rows)


def trend(slope: float) -> str:
    """Words for a log-log slope of an error against m."""
    if slope <= -0.4:
        return "falls roughly like 1/√m"
    if slope <= -0.2:
        return "falls more slowly than 1/√m"
    return "hardly falls"


def which_estimator_section(results: Dict[str, object]) -> str:
    """The short section meant for the README; every number in it comes from ``results``."""
    sizes = results["sizes"]
    show = [m for m in sizes if m in (64, 256, 1024)] or sizes
    rows = []
    for label in (PAPER, "hadamard, data", OURS):
        entry = results["summary"][label]
        rows.append([label] + [f"{entry[str(m)]['sd']:.3f} / {entry[str(m)]['abs_bias']:.3f}"
                               for m in show])
    table = _table(["estimator: sd / abs. bias of CKA"] + [f"m = {m}" for m in show], rows)
    ratio = results["sd_ratio_psi_over_paper"]["all"]
    interval = results["sd_ratio_interval"]
    ratio_text = ", ".join(f"{ratio[str(m)]:.2f} at m = {m} ({interval[str(m)][0]:.2f}–"
                           f"{interval[str(m)][1]:.2f})" for m in sizes)
    met = [m for m in sizes if results["target"]["met_at"][str(m)]]
    missed = [m for m in sizes if m not in met]
    verdict = ("met at every m" if not missed else
               f"met at m = {', '.join(map(str, met)) or 'none'}, missed at m = "
               f"{', '.join(map(str, missed))}")
    slope = results["sd_slope"]
    summary = results["summary"]
    first, last = str(sizes[0]), str(sizes[-1])
    gap = max(abs(p["exact"]["hadamard"] - p["exact"]["hadamard_uncentred"])
              for p in results["pairs"])
    centring_note = (f"On these networks centred and uncentred CKA of K differ by at most "
                     f"{gap:.3f} (per-layer table), so the choice matters little here;"
                     if gap < 0.02 else
                     f"On these networks centred and uncentred CKA of K differ by up to "
                     f"{gap:.3f} (per-layer table);")
    return f"""## Which estimator

`similarity(..., kind=...)` offers two estimators of the paper's kernel K = K_f ∘ K_g:

- `kind="hadamard"` (the default) is Algorithm 1 of the paper: features and gradients are
  sketched separately and the two m × m Grams multiplied entrywise. It stores m × (d_f + d_g)
  numbers per layer, but it is **not** S K Sᵀ: the product of two sketches has cross terms
  between the samples sharing a bucket, and the paper's error bounds (eqs. 15–16) do not
  cover it.
- `kind="psi"` (`sketch_model(..., psi=True)`) sketches ψ(x) = g fᵀ itself, so K̃ = S K Sᵀ,
  the estimator the bounds are about. It stores m × d_f·d_g numbers per layer while that
  fits `psi_budget` (default 2²⁸) and an m × `psi_dim` TensorSketch of ψ beyond it. With
  `centering="data"` it is exactly S H K H Sᵀ.

Measured on two pairs of small networks trained on the digits data (N = {results['n']}, exact
N × N kernels), {results['seeds']} sketch seeds; error of sketched against exact centred CKA
(details below):

{table}

psi's seed-to-seed sd relative to the paper's estimator's: {ratio_text} (95 % bootstrap
intervals over seeds). Target ≤ {TARGET_RATIO}: {verdict}. Over m = {first}–{last} psi's sd
{trend(slope[OURS])} (∝ m^{slope[OURS]:.2f}; RMSE {summary[OURS][first]['rmse']:.3f} →
{summary[OURS][last]['rmse']:.3f}) and Algorithm 1's {trend(slope[PAPER])} (∝
m^{slope[PAPER]:.2f}; RMSE {summary[PAPER][first]['rmse']:.3f} → {summary[PAPER][last]['rmse']:.3f}).

Use `kind="psi", centering="data"` when the similarity values matter and d_f·d_g (or
`psi_dim`) times m fits in memory; keep `kind="hadamard"` when memory per layer must stay
at m × (d_f + d_g). Bucket centring (`centering="buckets"`, the paper's code and the
library's default for `similarity`) removes the mean over buckets, not the data mean: S1 is
a random ±-sum per bucket with mean near 0, so the result stays close to the uncentred
sketch and is not S H K H Sᵀ. {centring_note} `centering="data"` is the estimator of centred CKA.
"""


def markdown(results: Dict[str, object], command: str) -> str:
    host = results["host"]
    sizes = results["sizes"]
    nets = results["networks"]
    net_lines = []
    for arch, info in nets.items():
        widths = ", ".join(f"{name}: d_f={d[0]}, d_g={d[1]}" for name, d in info["widths"].items())
        modes = sorted({mode for per_m in info["psi_mode"].values() for mode in per_m.values()})
        net_lines.append(
            f"- **{arch}** — probed layers {widths}; test accuracy "
            f"{', '.join(f'{a:.3f}' for a in info['test_accuracy'])} after {info['epochs']} "
            f"epochs; psi kept as {' / '.join(modes)}; library extraction "
            f"(`sketch_model`) agrees with the f, g used here to "
            f"{info['sketch_model_consistency']:.1e} (relative).")
    m_detail = 256 if 256 in sizes else sizes[-1]
    return "\n".join([
        "# Accuracy of sketched CKA",
        "",
        which_estimator_section(results),
        "## Setup",
        "",
        f"Command: `{command}`  ",
        f"Date: {host['date_utc']}  ",
        f"Machine: {host['cpu_model']}, {host['cores_usable']} usable cores, torch "
        f"{host['torch_version']} ({host['torch_threads']} threads), native ops: "
        f"{host['native_ops']}, load average {host['load_average']}  ",
        f"Run time: {results['seconds']} s",
        "",
        f"scikit-learn digits, all N = {results['n']} images (8 × 8, scaled to [0, 1]); two "
        f"networks per architecture trained from seeds 0 and 1 (Adam, lr 3e-3, batch 64, on a "
        f"fixed 1300-image split). Features f and expected gradients g (β = {results['beta']}) "
        f"at the probed layers, feature maps flattened; exact N × N kernels and exact centred "
        f"CKA in float64; sketches with float64 accumulators, sparsity 1, sketch seeds "
        f"0–{results['seeds'] - 1}.",
        "",
        *net_lines,
        "",
        "Error = sketched − exact CKA of the two networks at the same layer (the target of "
        "`feature` is CKA(K_f, K_f'), of `hadamard` and `psi` CKA(K, K') with K = K_f ∘ K_g). "
        "**sd**: seed-to-seed standard deviation of one layer pair, pooled (root mean square) "
        "over the layer pairs; **|bias|**: root mean square over layer pairs of the mean error; "
        "**RMSE**: over all pairs and seeds.",
        "",
        "## Seed-to-seed standard deviation",
        "",
        statistic_table(results, "sd"),
        "",
        "## |bias|",
        "",
        statistic_table(results, "abs_bias"),
        "",
        "## RMSE",
        "",
        statistic_table(results, "rmse"),
        "",
        f"## sd ratio psi / {PAPER}",
        "",
        ratio_table(results),
        "",
        "Bootstrap 95 % interval of the pooled ratio (seeds resampled): " + ", ".join(
            f"m = {m}: {results['sd_ratio_interval'][str(m)][0]:.2f}–"
            f"{results['sd_ratio_interval'][str(m)][1]:.2f}" for m in sizes) + ".",
        "",
        f"Target: ratio ≤ {TARGET_RATIO} at every m (all networks pooled): "
        f"**{'met' if results['target']['met'] else 'not met'}** (" + ", ".join(
            f"m = {m}: {'yes' if results['target']['met_at'][str(m)] else 'no'}"
            for m in sizes) + ").",
        "",
        f"## Per layer at m = {m_detail} (mean ± sd over seeds)",
        "",
        layer_table(results, m_detail),
        "",
        "![sd and RMSE of sketched CKA against m](results/accuracy.png)",
        "",
    ])


def plot(results: Dict[str, object], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    sizes = np.array(results["sizes"], dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, statistic, title in ((axes[0], "sd", "seed-to-seed sd"), (axes[1], "rmse", "RMSE")):
        for _, centering, label in ESTIMATORS:
            values = [results["summary"][label][str(int(m))][statistic] for m in sizes]
            ax.plot(sizes, values, marker="o", linestyle="-" if centering == "data" else "--",
                    label=label)
        anchor = results["summary"][OURS][str(int(sizes[0]))][statistic]
        ax.plot(sizes, anchor * np.sqrt(sizes[0] / sizes), color="grey", linewidth=0.8,
                linestyle=":", label="∝ 1/√m")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(int(m)) for m in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("buckets m")
        ax.set_title(f"{title} of sketched CKA")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _display(path: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return relative if not relative.startswith("..") else os.path.basename(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="MLP only, m in {64, 256}, 5 seeds; prints the tables only "
                             "unless output paths are given")
    parser.add_argument("--seeds", type=int, default=None, help="sketch seeds (default 20, quick 5)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--markdown", default=None, help="report path (default benchmarks/ACCURACY.md)")
    parser.add_argument("--json", default=None, help="numbers (default benchmarks/results/accuracy.json)")
    parser.add_argument("--plot", default=None, help="figure (default benchmarks/results/accuracy.png)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (5 if args.quick else 20)
    if seeds < 2:
        parser.error(f"--seeds must be at least 2 (a standard deviation needs two), got {seeds}")
    if not args.quick:
        args.markdown = args.markdown or os.path.join(HERE, "ACCURACY.md")
        args.json = args.json or os.path.join(HERE, "results", "accuracy.json")
        args.plot = args.plot or os.path.join(HERE, "results", "accuracy.png")
    command = " ".join(["python benchmarks/accuracy.py"] + (["--quick"] if args.quick else []) +
                       ([f"--seeds {args.seeds}"] if args.seeds is not None else []) +
                       ([f"--epochs {args.epochs}"] if args.epochs is not None else []))
    results = run(args.quick, seeds, args.epochs)
    results["command"] = command
    report = markdown(results, command)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(results, args.plot)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(report)
    print(report if not args.markdown else
          f"wrote {', '.join(_display(p) for p in (args.markdown, args.json, args.plot) if p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
