"""The report of a `simulations.study` run: tables, paired statistics, figures and the
RESULTS.md section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medmerge_core.report import layer_means_from_npz, method_label, plot_coefficient_heatmap
from simulations.common import (
    markdown_table,
    mean_std,
    median_range,
    relative,
    reproduce_block,
)
from simulations.departures import departure_text, source_words
from simulations.reproduce_findings import families_text, findings
from simulations.stats import ALPHA
from simulations.study import (
    PAPER_EPOCHS,
    PAPER_FT_LR,
    PAPER_LP_LR,
    STUDIES,
    StudySettings,
    plan,
)

METRICS_NOTE = (
    "Test metrics: mean ± std (population) over seeds. Times in seconds: median (min-max) over "
    "seeds, because the runs shared a 2-core machine with other jobs at varying load."
)


def departure_sentence(s: StudySettings) -> str:
    """One sentence: how this proxy study departs from the MedMerge paper."""
    sources = {n: v for n, v in s.sources if n in ("A", "B")}
    budget = (
        f", with {s.label_budget:g} of the target's training labels,"
        if s.label_budget is not None
        else ""
    )
    return (
        f"**A proxy study, not a reproduction.** It runs the paper's protocol{budget} on "
        + departure_text(s.target, s.image_size, s.arch, sources)
        + "."
    )


def _metric(runs: Sequence[Mapping[str, Any]], method: str, key: str) -> list[float]:
    return [r[method]["test"][key] for r in runs if method in r]


def _stage_seconds(runs: Sequence[Mapping[str, Any]], method: str, stage: str) -> list[float]:
    return [r[method]["stages"][stage]["seconds"] for r in runs
            if method in r and stage in r[method]["stages"]]  # fmt: skip


def probe_cost(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per seed: MedMerge probe seconds / mean LP seconds of the LP-FT runs."""
    ratios = []
    for r in runs:
        lps = [v["stages"]["lp"]["seconds"] for k, v in r.items() if k.startswith("lp_ft:")]
        if "medmerge" in r and lps:
            ratios.append(r["medmerge"]["stages"]["probe"]["seconds"] / float(np.mean(lps)))
    return ratios


def method_rows(runs: Sequence[Mapping[str, Any]], prefix: str = "") -> list[list[str]]:
    """Markdown rows: method, n, accuracy, macro-F1, AUROC, wall, LP/probe, FT, probe val F1."""
    methods = list(dict.fromkeys(m for r in runs for m in r))
    rows = []
    for method in methods:
        first = "probe" if method == "medmerge" else "lp"
        probe_f1 = [r[method]["stages"]["probe"]["val"]["macro_f1"] for r in runs
                    if method in r and "probe" in r[method]["stages"]]  # fmt: skip
        rows.append([
            f"{prefix}{method_label(method)}",
            str(sum(method in r for r in runs)),
            mean_std(_metric(runs, method, "accuracy")),
            mean_std(_metric(runs, method, "macro_f1")),
            mean_std(_metric(runs, method, "auroc")),
            median_range([r[method]["seconds"] for r in runs if method in r]),
            median_range(_stage_seconds(runs, method, first)),
            median_range(_stage_seconds(runs, method, "ft")),
            mean_std(probe_f1) if probe_f1 else "",
        ])  # fmt: skip
    return rows


def _layer_means(run_dir: Path, index: int) -> np.ndarray | None:
    path = run_dir / "coefficients.npz"
    return layer_means_from_npz(path, index) if path.exists() else None


def make_figures(s: StudySettings, collected: Mapping[str, Any]) -> dict[str, Path]:
    """Fig. 2 / Fig. 4 style heatmaps of the mean learnt coefficient per conv layer."""
    figures: dict[str, Path] = {}

    def rows(group: str, index: int) -> list[np.ndarray]:
        found = [_layer_means(s.run_root / f"{group}-seed{seed}", index)
                 for seed in sorted(collected.get(group, {}))]  # fmt: skip
        return [m for m in found if m is not None]

    def plot(
        key: str, data: dict[str, np.ndarray], source: str, title: str, uniform: float = 0.5
    ) -> None:
        data = {k: v for k, v in data.items() if v is not None}
        path = s.figures / f"{s.tag}_{key}.png"
        if data:
            figures[key] = plot_coefficient_heatmap(
                data, source, path, title=title, uniform=uniform
            )
        elif s.report_only and path.exists():
            # The coefficients.npz stay in the run folders under runs/ (git-ignored): a
            # re-render from committed results.json files links the figure drawn before.
            figures[key] = path

    def mean(arrays: list[np.ndarray]) -> np.ndarray | None:
        return np.mean(arrays, axis=0) if arrays else None

    main = rows("main", 1)
    fig2 = {f"seed {seed}": _layer_means(s.run_root / f"main-seed{seed}", 1)
            for seed in sorted(collected.get("main", {}))}  # fmt: skip
    if len(main) > 1:
        fig2[f"mean ({len(main)} seeds)"] = mean(main)
    plot("fig2_main", fig2, "B", "Fig. 2 style: mean w of source B (vs A) per layer")
    plot(
        "fig2_ablations",
        {
            "kernel, BN trainable": mean(main),
            "kernel, BN frozen": mean(rows("bn_frozen", 1)),
            "layer": mean(rows("layer", 1)),
            "parameter": mean(rows("parameter", 1)),
        },
        "B",
        "Ablations: mean w of source B per layer",
    )
    plot(
        "fig4_zeros",
        {"A + zeros": mean(rows("zeros_a", 0)), "B + zeros": mean(rows("zeros_b", 0))},
        "non-zero",
        "Fig. 4 style: mean w of the non-zero source",
    )
    plot(
        "three_sources",
        {f"source {n}": mean(rows("three", i)) for i, n in enumerate("ABC")},
        "source",
        "Three sources: mean coefficient per layer",
        uniform=1 / 3,
    )
    return figures


def coefficient_spread(s: StudySettings, collected: Mapping[str, Any]) -> str:
    """How far the learnt merge coefficients moved from their init (the heatmaps' 0..1 colour
    scale hides small moves, so say it in numbers)."""
    moves = []
    for group, by_seed in collected.items():
        for seed in by_seed if not group.startswith("_") else ():
            path = s.run_root / f"{group}-seed{seed}" / "coefficients.npz"
            if path.exists():
                with np.load(path) as data:
                    mean = data["layer_mean"]
                    moves.append((group, float(np.abs(mean - 1.0 / mean.shape[1]).max())))
    if not moves:
        return ""
    per_study: dict[str, float] = {}
    for group, move in moves:
        per_study[group] = max(per_study.get(group, 0.0), move)
    return (
        "Largest move of a layer's mean coefficient from its initial value (1/number of "
        "sources), per study (max over layers and seeds): "
        + ", ".join(f"{g} {v:.4f}" for g, v in per_study.items())
        + ". Values near 0 mean the probe left the merge close to uniform averaging."
    )


def results_section(
    s: StudySettings, collected: Mapping[str, Any], figures: Mapping[str, Path]
) -> str:
    """The RESULTS.md section: substitution, protocol, tables, figures and the command."""
    sources = collected["_sources"][0]
    specs = dict(s.sources)
    runs = {g: [collected[g][k] for k in sorted(collected[g])] for g in collected if g[0] != "_"}
    budget_text = ""
    if s.label_budget is not None:
        budget_text = (
            f"; a class-stratified label budget of {s.label_budget:g} of the training labels, "
            "drawn per seed"
        )
    deviations = []
    if s.lp.lr != PAPER_LP_LR or s.ft.lr != PAPER_FT_LR:
        deviations.append(
            f"learning rates LP/probe {s.lp.lr:g}, FT {s.ft.lr:g} instead of the paper's "
            f"{PAPER_LP_LR:g} / {PAPER_FT_LR:g} (--lp-lr / --ft-lr; choose them on validation "
            "data, as the pilot of the real-image study does)"
        )
    if s.lp.epochs != PAPER_EPOCHS or s.ft.epochs != PAPER_EPOCHS:
        deviations.append(
            f"{s.lp.epochs} LP epochs and {s.ft.epochs} FT epochs instead of 50 (--lp-epochs / "
            "--ft-epochs: enough for the validation metric to level off is what matters)"
        )
    if len(s.seeds) < 5:
        deviations.append(f"{len(s.seeds)} main seed(s) instead of 5 or more")
    skipped = [study for study in STUDIES if study not in s.studies]
    if skipped:
        deviations.append(f"studies not run in this invocation: {', '.join(skipped)}")
    out = [
        "## Proxy study: the MedMerge protocol at MedMNIST scale "
        f"({s.arch}, {s.image_size}x{s.image_size})",
        "",
        departure_sentence(s),
        "",
        "**Substitution.** The paper's datasets (ISIC-2019, APTOS, RSNA at 224x224) and ImageNet "
        "weights are not available here (no internet). This study runs the paper's protocol at "
        f"MedMNIST scale on real images: target **{s.target}** (28x28 originals"
        f"{', resized to ' + str(s.image_size) if s.image_size != 28 else ''}; official "
        f"splits{budget_text}). Source A stands in for ImageNet. The numbers are not comparable "
        "with the paper's Table 1.",
        "",
        "Sources (pretrained ones are made once and cached under the run folder):",
        "",
        markdown_table(
            ["source", "what", "its training images", "its test accuracy", "chance (1/classes)"],
            [
                [
                    n,
                    source_words(specs[n], s.target) if n in specs else v["text"],
                    str(v.get("train", "n/a")),
                    f"{v['test_accuracy']:.3f}" if "test_accuracy" in v else "n/a",
                    f"{v['chance']:.3f}" if "chance" in v else "n/a",
                ]
                for n, v in sources.items()
                if n != "zeros"
            ],
        ),
        "",
        f"Source pretraining: {s.source.epochs} epochs, AdamW lr {s.source.lr:g}, batch "
        f"{s.batch_size}.",
        "",
        f"Protocol: AdamW, LP {s.lp.epochs} epochs at lr {s.lp.lr:g}, MedMerge probe "
        f"{s.merge.steps} steps (coefficients at lr {s.merge.coef_lr:g} without weight decay, "
        f"BN and head at the LP lr), FT {s.ft.epochs} epochs at lr {s.ft.lr:g}, weight decay "
        f"{s.ft.weight_decay:g}, batch {s.batch_size}, no "
        "augmentation, best epoch of every stage chosen on validation macro-F1, CPU fp32. A seed "
        "sets the head init and batch order; sources and splits are fixed.",
        "",
        "Seeds finished per study (planned: main "
        f"{list(s.seeds)}, others {list(s.ablation_seeds or s.seeds)}; an unfinished study "
        "resumes when the command below is run again): "
        + ("; ".join(f"{g} {sorted(collected[g])}" for g in runs) or "none")
        + ".",
        "",
        "Deviations from the paper: " + ("; ".join(deviations) if deviations else "none") + ".",
        "",
        *reproduce_block("simulations.reproduce", s.argv),
    ]
    header = ["method", "n", "test accuracy", "test macro-F1", "test AUROC", "wall s / run",
              "LP or probe s", "FT s", "probe val F1"]  # fmt: skip
    if runs.get("main"):
        ratios = probe_cost(runs["main"])
        out += [
            "",
            f"### Main comparison on {s.target}",
            "",
            METRICS_NOTE,
            "",
            markdown_table(header, method_rows(runs["main"])),
        ]
        if ratios:  # both MedMerge and LP-FT ran on some seed
            out += [
                "",
                f"Cost of the MedMerge probe ({s.merge.steps} steps) relative to LP in LP-FT "
                f"({s.lp.epochs} epochs; LP trains the head on features cached once, the probe "
                f"runs the whole merged network every step): "
                f"**{median_range(ratios)}x** (median (min-max) over seeds; per seed: "
                f"{', '.join(f'{r:.1f}' for r in ratios)}).",
            ]
    summary = findings(collected)
    if summary:
        out += [
            "",
            "### What the numbers show (test metrics, paired by seed)",
            "",
            "Difference = MedMerge − other, one value per seed; 95% percentile bootstrap CI of "
            "the mean difference; two-sided Wilcoxon signed-rank p, raw and Holm-adjusted over "
            f"its family. A verdict needs both the CI to exclude 0 and the Holm-adjusted p < "
            f"{ALPHA:g}; otherwise the difference is within the noise of the seeds compared "
            f"(`simulations/stats.py`). With 5 seeds or fewer p can never be below {ALPHA:g}, so "
            "a comparison on 5 seeds can only be read from its CI. " + families_text(collected),
            "",
            markdown_table(
                ["comparison", "metric", "mean diff", "95% CI", "Wilcoxon p", "Holm p",
                 "seeds higher", "verdict"], summary),
        ]  # fmt: skip
    ablation_rows = []
    for spec in plan(s.studies):
        if spec.ablation and runs.get(spec.group):
            ablation_rows += method_rows(runs[spec.group], prefix=f"{spec.label}: ")
    if ablation_rows:
        out += [
            "",
            "### Ablations and three sources",
            "",
            "Kernel granularity with BN trainable is the main table's MedMerge row. "
            + METRICS_NOTE,
            "",
            markdown_table(header, ablation_rows),
        ]
    if figures:
        spread = coefficient_spread(s, collected) or (
            "The figures were drawn from each run's `coefficients.npz`, which stays in its run "
            "folder under `runs/` (git-ignored, so not committed); without those files this "
            "re-render links the figures drawn before and cannot give the coefficients' spread."
        )
        out += ["", "### Figures", "", spread, ""]
        out += [f"![{key}]({relative(path, s.results)})" for key, path in figures.items()]
    every = [
        [group, str(seed), method_label(m), f"{r['test']['accuracy']:.3f}",
         f"{r['test']['macro_f1']:.3f}", f"{r['seconds']:.1f}"]
        for group in runs for seed, results in sorted(collected[group].items())
        for m, r in results.items()
    ]  # fmt: skip
    if every:
        out += [
            "",
            "<details><summary>Every run (wall time per run)</summary>",
            "",
            markdown_table(["study", "seed", "method", "accuracy", "macro-F1", "wall s"], every),
            "",
            "</details>",
        ]
    return "\n".join(out) + "\n"


def print_summary(collected: Mapping[str, Any], console: Console) -> None:
    table = Table(title="Test accuracy / macro-F1 (mean ± std)")
    for column in ("study", "method", "n", "accuracy", "macro-F1"):
        table.add_column(column)
    for group, by_seed in collected.items():
        if group.startswith("_"):
            continue
        for row in method_rows(list(by_seed.values())):
            table.add_row(group, row[0], row[1], row[2], row[3])
    console.print(table)
