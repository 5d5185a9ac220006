"""Run the CPU benchmarks and write benchmarks/RESULTS.md (and a JSON copy of the numbers).

    python benchmarks/results.py            # quick set, well under a minute
    python benchmarks/results.py --full     # the full grid (minutes)

Every figure in the report is a ratio to something measured in the same run
(the machine's read bandwidth and GEMM rate, and the baselines), and the
"Targets" section is judged from this run's numbers only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _display_path(path: str) -> str:
    """A path as it should appear in the report: relative to the repository root."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, ROOT)
    return relative if not relative.startswith("..") else os.path.basename(absolute)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report, with repository-relative paths."""
    parts = ["python", "benchmarks/results.py"]
    if args.full:
        parts.append("--full")
    if args.repeats is not None:
        parts += ["--repeats", str(args.repeats)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", _display_path(args.out)]
    if args.json:
        parts += ["--json", _display_path(args.json)]
    return " ".join(parts)


def code_version() -> Dict[str, object]:
    """The checkout's commit and whether the native sources differ from it (None: no git)."""
    import subprocess

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "csrc")
    return {"commit": commit, "native_sources_modified": bool(changed) if commit else None}


def _sizes_section(results: Dict[str, object]) -> str:
    config = results["config"]
    sketch = ", ".join(f"({harness.count_text(n)}, {d}, {m})" for n, d, m in config["sizes"])
    gram = ", ".join(f"({b}, {m}, {d})" for b, m, d in config["gram_sizes"])
    labels = ", ".join(harness.BASELINE_LABELS[name] for name in config["baselines"])
    skipped = [r for r in results["sketch"] if r["status"] != "ok"]
    lines = [
        f"- Mode: {'full' if not config['quick'] else 'quick'}; each time is the median of "
        f"{config['repeats']} round-robin rounds after one warm-up call.",
        f"- CountSketch pair, (n, d, m) with f and g both float32 [n, d], sparsity 1: {sketch}.",
        f"- Sketch baselines: {labels}.",
        f"- Hadamard Gram, (B, m, d) with a and b both float32 [B, m, d]: {gram}.",
    ]
    for row in skipped:
        lines.append(f"- Skipped n={harness.count_text(row['n'])}, d={row['d']}, m={row['m']}: "
                     f"{row.get('reason', row['status'])}.")
    return "\n".join(lines)


def _build_text(results: Dict[str, object]) -> str:
    parts = []
    digest = results["host"].get("native_library_sha256")
    if digest:
        parts.append(f"library sha256 {digest}")
    code = results.get("code") or {}
    if code.get("commit"):
        parts.append(f"commit {code['commit']}" + (
            " with uncommitted changes under csrc/" if code.get("native_sources_modified")
            else ""))
    return f" ({'; '.join(parts)})" if parts else ""


def _host_section(results: Dict[str, object]) -> str:
    host = results["host"]
    lines = [
        f"- CPU: {host['cpu_model']}; {host['cores_usable']} usable of "
        f"{host['cores_online']} online cores; {host['memory_total_gib']} GiB memory.",
        f"- torch {host['torch_version']} ({host['torch_threads']} threads, MKL "
        f"{'yes' if host['mkl'] else 'no'}), numpy {host['numpy_version']}, scipy "
        f"{host['scipy_version']}, Python {host['python_version']}.",
        f"- Native ops loaded: {'yes' if host['native_ops'] else 'no (pure-PyTorch reference)'}"
        f"{_build_text(results)}.",
        f"- Load average (1/5/15 min) {harness.load_text(host.get('load_average'))} at the "
        f"start, {harness.load_text(results.get('load_average_after'))} at the end "
        f"(a load above the core count means other work shared the cores).",
    ]
    return "\n".join(lines)


def end_to_end_section() -> Optional[str]:
    """The sketching overhead measured by ``benchmarks/overhead.py --json`` (its own run)."""
    path = os.path.join(HERE, "results", "overhead.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        o = json.load(handle)
    return "\n".join([
        f"Measured by `python benchmarks/overhead.py --samples {o['samples']} --batch {o['batch']} "
        f"--m {o['m']} --json benchmarks/results/overhead.json` ({o['threads']} threads, torch "
        f"{o['torch']}): a small CNN (3x32x32 inputs, three conv blocks probed with flattened "
        f"features of widths {', '.join(str(w) for w in o['probed_widths'])}), medians of its "
        "interleaved repeats.",
        "",
        "| pass over the data | seconds |",
        "|---|---|",
        f"| bare forward + backward (to the parameters) | {o['bare_s']:.2f} |",
        f"| extraction only (hooks, one backward to the probed layers) | {o['extract_s']:.2f} |",
        f"| `sketch_model` (extraction + fused sketches + exact statistics) | {o['sketch_s']:.2f} |",
        "",
        f"Overhead of `sketch_model` over the bare forward + backward: "
        f"{100 * o['overhead']:+.1f}% (target <= 15%: "
        f"{'MET' if o['overhead'] <= 0.15 else 'NOT MET'}); over the extraction alone, i.e. the "
        f"cost of sketching itself: {100 * o['sketch_over_extraction']:+.1f}%. The extraction "
        "differentiates to the probed layer outputs only, not to the parameters, which is why it "
        "can cost less than the bare pass. Streaming at scale (10^5 to 4x10^6 samples, memory "
        "and throughput per N): `benchmarks/SCALE.md`.",
    ])


def _load(name: str) -> Optional[Dict]:
    path = os.path.join(HERE, "results", name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def psi_cost_section() -> Optional[str]:
    """What the default statistics (the psi halves) cost, from ``benchmarks/psi_cost.py``."""
    report = _load("psi_cost.json")
    if report is None:
        return None
    summary = report["summary"]
    rows = [f"| {label} | {summary[key]['cpu_seconds']:.1f} | {summary[key]['seconds']:.1f} | "
            f"{summary[key]['peak_over_baseline_mib']:.0f} |"
            for key, label in (("features_only", "features only (`gradients=False`)"),
                               ("no_psi", "features and gradients, `psi=False`"),
                               ("default", "the default (psi halves for `kind=\"hadamard\"`)"))]
    verdict = {True: "MET", False: "NOT MET"}
    return "\n".join([
        f"Measured by `{report['command']}` ({report['threads']} threads, torch {report['torch']}): "
        f"`sketch_model` on {report['model']}, N = {report['n']} generated 32x32 images, "
        f"m = {report['m']}, batch {report['batch']}; each configuration in a fresh process, "
        "medians of the repeats; memory is the peak resident size above the process's size "
        "before the call.",
        "",
        "| `sketch_model` | CPU seconds | wall seconds | peak MiB above baseline |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Default over `psi=False`: CPU time {summary['time_ratio_default_over_no_psi']:.2f}x "
        f"(target <= 1.5x: {verdict[summary['targets']['time <= 1.5x']]}; wall time "
        f"{summary['wall_ratio_default_over_no_psi']:.2f}x), memory "
        f"{summary['memory_ratio_default_over_no_psi']:.2f}x (target <= 2x: "
        f"{verdict[summary['targets']['memory <= 2x']]}). At N = {report['n'] // 2} the default's "
        f"peak is {summary['default_memory_at_half_n_mib']:.0f} MiB (flat in N: the statistics "
        "have fixed size, batches are processed one at a time).",
    ])


def peers_section() -> Optional[str]:
    """The peers table and targets, from ``benchmarks/peers.py``'s JSON (its own run)."""
    report = _load("peers.json")
    if report is None:
        return None
    import peers       # benchmarks/ is on the path when this script runs
    verdicts = {True: "met", False: "MISSED", None: "not measured"}
    return "\n".join([
        f"Measured by `{report['command']}`; settings, notes and the capabilities of each tool: "
        "`benchmarks/PEERS.md`.", "",
        peers.format_table(report), "",
        *[f"- {t['target']}: **{verdicts[t['met']]}**. {t['detail']}." for t in report["targets"]],
    ])


def render(results: Dict[str, object], command: str) -> str:
    """The Markdown report of one run."""
    machine = results["machine"]
    targets = results.get("targets") or harness.evaluate_targets(results)
    sections: List[str] = [
        "# Benchmark results (CPU)",
        f"Produced by `{command}` on {results['host']['date_utc']} "
        f"(run time {results['elapsed_s']:.0f} s). How to run and read these tables: "
        "`benchmarks/README.md`.",
        "## Machine",
        _host_section(results),
        f"Measured in this run: read bandwidth {machine['read_gbs']:.1f} GB/s "
        f"(`sum()` over {machine['buffer_bytes'] / harness.GIB:.0f} GiB of float32), copy "
        f"bandwidth {machine['copy_gbs']:.1f} GB/s (`copy_`, bytes read + written), fp32 GEMM "
        f"{machine['gemm_gflops']:.0f} GFLOP/s (`torch.mm`, {machine['gemm_size']}^3).",
        "## Sizes",
        _sizes_section(results),
        "## CountSketch pair",
        harness.format_sketch_table(results),
        harness.SKETCH_NOTES,
        "## Hadamard Gram",
        harness.format_gram_table(results),
        harness.GRAM_NOTES,
    ]
    scaling = harness.format_scaling_table(results)
    if scaling:
        sections += ["## Thread scaling", scaling,
                     "The same sketch and a 1 GiB read at one thread and at all threads: a "
                     "memory-bound kernel scales like the read."]
    end_to_end = end_to_end_section()
    if end_to_end:
        sections += ["## End to end: sketching over the passes it rides on", end_to_end]
    psi_cost = psi_cost_section()
    if psi_cost:
        sections += ["## The default statistics: cost of the psi halves", psi_cost]
    peer_table = peers_section()
    if peer_table:
        sections += ["## Peers: pytorch-cka, torch-cka and ckatorch", peer_table]
    sections += ["## Accuracy",
                 "How close each estimator lands to the exact value on real networks: "
                 "`benchmarks/ACCURACY.md` (`python benchmarks/accuracy.py`)."]
    sections += [
        "## Targets",
        "Judged from the numbers above (read bandwidth: the 1 GiB `sum()` of this run).",
        harness.format_targets(targets),
        "## GPU",
        "GPU results live in `benchmarks/results/` when they have been measured (written by "
        "the GPU check script); this report holds CPU numbers only.",
    ]
    return "\n\n".join(sections) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full size grid (minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per method (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                        help="Markdown report (default benchmarks/RESULTS.md)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "cpu.json"),
                        help="JSON results (default benchmarks/results/cpu.json; '' to skip)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the report from the JSON results (no measurement)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        with open(args.json, encoding="utf-8") as handle:
            results = json.load(handle)
        command = results["command"]
    else:
        results = harness.run_from_args(args)
        if results is None:
            return 2
        command = command_line(args)
        results["command"] = command
        results["code"] = code_version()
        results["targets"] = harness.evaluate_targets(results)
    report = render(results, command)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(report)
    if args.json and not args.render:
        harness.write_json(results, args.json)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
