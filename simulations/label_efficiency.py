"""Label-efficiency curves: the main comparison at several label budgets of one target.

    python -m simulations.label_efficiency --budgets 0.01 0.05 0.2 1.0 -- \
        --data-root ../shared/data/medmnist --target pneumoniamnist --arch cifar_resnet56 \
        --source A=cifar10:resnet56 --source B=pretrain:breastmnist@A --seeds 0 1 2 3 4 \
        --out runs/label_efficiency

Everything after `--` is `simulations.reproduce`'s options; each budget is that driver's main
study with `--label-budget` (its own run folders, drawn per seed, class-stratified; validation
and test stay the official splits), so an interrupted curve resumes. `--seeds-at 0.01=0,1,...`
(every seed listed) gives one budget more seeds than `--seeds` where its spread is wide.
Writes a macro-F1 and AUROC vs label-fraction plot under --figures and one RESULTS.md section.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medmerge_core.data.splits import check_label_budget, label_budget_index
from medmerge_core.errors import InputError
from medmerge_core.report import method_label, pyplot, save_figure
from simulations import reproduce
from simulations.common import (
    markdown_table,
    mean_std,
    relative,
    reproduce_block,
    set_threads,
    update_section,
)
from simulations.departures import departure_text, source_words
from simulations.stats import holm_family, paired_comparison
from simulations.study import StudySettings, run_all

Curve = dict[float | int, dict[int, dict[str, Any]]]  # budget -> seed -> method -> results


def collect(
    base: StudySettings,
    budgets: Sequence[float | int],
    console: Console,
    seeds_at: Mapping[float | int, tuple[int, ...]] | None = None,
) -> Curve:
    """Run (or read back) the main study at every budget, on that budget's seeds."""
    curve: Curve = {}
    for budget in budgets:
        seeds = (seeds_at or {}).get(budget, base.seeds)
        settings = replace(base, label_budget=budget, studies=("main",), seeds=seeds)
        console.print(f"[bold]label budget {budget:g}[/] (seeds {', '.join(map(str, seeds))})")
        curve[budget] = run_all(settings, console).get("main", {})
    return curve


def split_labels(base: StudySettings) -> dict[str, np.ndarray]:
    """The target's official labels per split, read once, as (N, L) arrays (L = 1: one class)."""
    with np.load(base.data_root / f"{base.target}.npz") as data:
        return {
            split: np.asarray(data[f"{split}_labels"]).reshape(len(data[f"{split}_labels"]), -1)
            for split in ("train", "val", "test")
        }


def train_sizes(train_labels: np.ndarray, budgets: Sequence[float | int]) -> dict[Any, int]:
    """Training images kept per budget (class-stratified, so the same count for every seed)."""
    return {b: len(label_budget_index(train_labels[:, 0], b, seed=0)) for b in budgets}


def curve_methods(curve: Curve) -> list[str]:
    """Every method that ran at some budget, in the order the study ran them."""
    return list(dict.fromkeys(m for b in sorted(curve) for r in curve[b].values() for m in r))


def seed_values(curve: Curve, budget: float | int, method: str, metric: str) -> list[float]:
    """The method's test metric at one budget, one value per seed that ran it."""
    return [r[method]["test"][metric] for r in curve[budget].values() if method in r]


def class_shares(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each split's class shares (none for a multi-label target): a test prior unlike
    training's shows up as lost sensitivity on the rarer class."""
    if any(v.shape[1] > 1 for v in labels.values()):
        return {}
    flat = {s: v[:, 0].astype(int) for s, v in labels.items()}
    classes = max(int(v.max()) for v in flat.values()) + 1
    return {s: np.bincount(v, minlength=classes) / len(v) for s, v in flat.items()}


def method_table(curve: Curve, columns: Sequence[str], metric: str) -> str:
    """One row per method, one column per budget: the test metric's mean ± std over seeds."""
    budgets = sorted(curve)
    methods = curve_methods(curve)
    rows = []
    for method in methods:
        cells = []
        for budget in budgets:
            values = seed_values(curve, budget, method, metric)
            cells.append(f"{mean_std(values)} (n={len(values)})")
        rows.append([method_label(method), *cells])
    return markdown_table(["method", *columns], rows)


def generalisation_table(curve: Curve, classes: Sequence[str]) -> str:
    """Per budget, over every method and seed: best-epoch validation macro-F1 against test
    macro-F1, test AUROC and each class's test sensitivity, to tell a ranking that generalises
    from a decision threshold that does not."""
    header = ["budget", "runs", "val macro-F1", "test macro-F1", "test AUROC"]
    header += [f"test sensitivity {c}" for c in classes]
    rows = []
    for budget in sorted(curve):
        runs = [r for seed in curve[budget].values() for r in seed.values()]
        val = [r["stages"][list(r["stages"])[-1]]["val"]["macro_f1"] for r in runs]
        cells = [f"{budget:g}", str(len(runs)), mean_std(val)]
        cells += [mean_std([r["test"][k] for r in runs]) for k in ("macro_f1", "auroc")]
        clinical = [r["clinical"]["per_class"] for r in runs if "clinical" in r]
        cells += [mean_std([p[c]["sensitivity"] for p in clinical]) for c in classes]
        rows.append(cells)
    return markdown_table(header, rows)


def plot_curve(curve: Curve, path: Path, title: str) -> Path:
    """Mean test macro-F1 and AUROC (± std over seeds) against the label fraction, one line per
    method: the threshold-free panel shows whether a flat macro-F1 is the ranking or the cut."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted(curve)
    for ax, (metric, name) in zip(
        axes, (("macro_f1", "macro-F1"), ("auroc", "AUROC")), strict=True
    ):
        for method in curve_methods(curve):
            xs, means, stds = [], [], []
            for budget in budgets:
                values = seed_values(curve, budget, method, metric)
                if values:
                    xs.append(budget)
                    means.append(float(np.mean(values)))
                    stds.append(float(np.std(values)))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method_label(method))
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}\n{len(curve[b])} seeds" for b in budgets])
        ax.set_xlabel("fraction (or count) of the target's training labels")
        ax.set_ylabel(f"test {name} (mean ± std over seeds)")
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def results_section(
    base: StudySettings, curve: Curve, figure: Path | None, argv: Sequence[str]
) -> str:
    budgets = sorted(curve)
    methods = curve_methods(curve)
    labels = split_labels(base)
    sizes = train_sizes(labels["train"], budgets)
    columns = [f"{b:g} ({sizes.get(b, 'n/a')} images)" for b in budgets]
    comparisons = []
    family_sizes: dict[float | int, int] = {}
    for budget in budgets:
        by_seed = curve[budget]
        baselines, results = [], []
        for method in methods:
            seeds = [k for k in sorted(by_seed) if {"medmerge", method} <= set(by_seed[k])]
            if method == "medmerge" or len(seeds) < 2:
                continue
            baselines.append(method)
            results.append(
                paired_comparison(
                    [by_seed[k]["medmerge"]["test"]["macro_f1"] for k in seeds],
                    [by_seed[k][method]["test"]["macro_f1"] for k in seeds],
                )
            )
        if results:
            family_sizes[budget] = len(results)
        for method, result in zip(baselines, holm_family(results), strict=True):
            label = method_label(method)
            comparisons.append(
                f"- budget {budget:g}, MedMerge − {label}: "
                + result.format(names=("MedMerge", label))
            )
    used = {n: v for n, v in base.sources if n in ("A", "B")}
    sources = "; ".join(f"{n} = {source_words(v, base.target)}" for n, v in used.items())
    departure = (
        "**A proxy study, not a reproduction.** The paper has no label-budget experiment; this "
        "study runs its protocol at each label budget on "
        + departure_text(base.target, base.image_size, base.arch, used)
        + "."
    )
    out = [
        f"## Proxy study: label efficiency on {base.target} "
        f"({base.arch}, {base.image_size}x{base.image_size})",
        "",
        departure,
        "",
        f"Sources: {sources}. Protocol as in the main study (see its section): LP "
        f"{base.lp.epochs} epochs at lr {base.lp.lr:g}, probe {base.merge.steps} steps "
        f"(coefficients at lr {base.merge.coef_lr:g}), FT {base.ft.epochs} epochs at lr "
        f"{base.ft.lr:g}, best epoch on validation macro-F1. The label budget keeps a "
        "class-stratified subset of the training labels, drawn per seed; validation and test "
        "are the official splits.",
        "",
        "Test macro-F1, mean ± std over seeds:",
        "",
        method_table(curve, columns, "macro_f1"),
    ]
    if figure is not None:
        out += ["", f"![label efficiency]({relative(figure, base.results)})"]
    runs = [r for b in budgets for seed in curve[b].values() for r in seed.values()]
    classes = next((r["clinical"]["classes"] for r in runs if "clinical" in r), [])
    shares = "; ".join(
        f"{split} " + " / ".join(f"{x:.3f}" for x in share)
        for split, share in class_shares(labels).items()
    )
    out += [
        "",
        "Test AUROC (threshold-free; a secondary metric, so not tested below), mean ± std over "
        "seeds:",
        "",
        method_table(curve, columns, "auroc"),
        "",
        "Validation against test, mean ± std over every method and seed of a budget (the "
        "validation column is each run's best epoch, which selected it)."
        + (f" Class shares ({' / '.join(classes)}) by split: {shares}." if shares else ""),
        "",
        generalisation_table(curve, classes),
    ]
    if comparisons:
        out += [
            "",
            "Paired by seed (macro-F1; `simulations/stats.py`). Holm families: one per budget, "
            "MedMerge against each of its baselines at that budget ("
            + ", ".join(f"{b:g}: {n}" for b, n in family_sizes.items())
            + " comparisons); the Holm-adjusted p decides the verdict.",
            "",
            *comparisons,
        ]
    out += ["", *reproduce_block("simulations.label_efficiency", argv)]
    return "\n".join(out) + "\n"


def parse_seeds_at(
    texts: Sequence[str], budgets: Sequence[float | int]
) -> dict[float | int, tuple[int, ...]]:
    """`BUDGET=SEED,SEED,...` per item: more seeds where a budget's spread is wide."""
    seeds_at: dict[float | int, tuple[int, ...]] = {}
    for text in texts:
        budget_text, sep, seeds_text = text.partition("=")
        budget = check_label_budget(budget_text, "--seeds-at")
        try:
            seeds = tuple(int(x) for x in seeds_text.split(","))
        except ValueError:
            seeds = ()
        if not sep or not seeds or budget not in budgets:
            raise InputError(
                f"--seeds-at: expected BUDGET=SEED,... for a budget in --budgets, got {text!r}"
            )
        seeds_at[budget] = seeds
    return seeds_at


def parse_args(
    argv: Sequence[str],
) -> tuple[StudySettings, list[float | int], dict[float | int, tuple[int, ...]]]:
    """(the study's settings, the label budgets, seeds that replace --seeds at some budgets)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", required=True, help="fractions (0, 1] or counts")
    p.add_argument(
        "--seeds-at",
        action="append",
        default=[],
        metavar="BUDGET=SEEDS",
        help="this budget's seeds, comma-separated, instead of --seeds (repeatable)",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then simulations.reproduce options")
    a = p.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    try:
        budgets = [check_label_budget(text, "--budgets") for text in a.budgets]
        seeds_at = parse_seeds_at(a.seeds_at, budgets)
    except InputError as exc:
        p.error(str(exc))
    return reproduce.parse_args(rest), budgets, seeds_at


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    base, budgets, seeds_at = parse_args(argv)
    console = Console()
    set_threads(base.threads)
    curve = collect(base, budgets, console, seeds_at)
    figure = None
    if any(curve.values()):
        name = f"label_efficiency_{base.target}-{base.arch}-{base.image_size}.png"
        figure = plot_curve(curve, base.figures / name, base.target)
    key = f"label-efficiency-{base.target}-{base.arch}-{base.image_size}"
    update_section(base.results, key, results_section(base, curve, figure, argv))
    console.print(f"wrote {base.results}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
