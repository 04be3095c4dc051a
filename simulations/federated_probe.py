"""Federated merge learning study: who learns the MedMerge coefficients, before the same
federated fine-tuning.

    python -m simulations.federated_probe --data-root ../shared/data/medmnist \
        --seeds 0 1 2 3 4 --out runs/federated_probe

The target's training labels are split over `--sites` sites, stratified (`iid`) and
label-skewed (`dirichlet`, Dirichlet `--alpha` per class); validation and test are split
stratified, and the test metrics are pooled over every site's test share, i.e. the official
test set. Sources as in the main real-image study: A = the CIFAR-10 ResNet-56, B = a ResNet-56
pretrained on pneumoniamnist from A (made once, cached under --out). Conditions:

- `coordinator-share`: a coordinator holding one site's share (site 0's) learns the merge;
- `federated`: the probe federated over all sites (`probe-mode = "federated"`);
- `coordinator-all`: a coordinator holding all the training labels (the upper bound);

each followed by the same federated fine-tuning over all the sites. Every run is a whole
in-process federation (simulations.inprocess: the real ServerApp and ClientApp code) in its own
run folder, so an interrupted study resumes. Writes one RESULTS.md section with paired
statistics (simulations.stats).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from medmerge_core.coerce import add_arguments, from_arguments
from simulations.common import (
    markdown_table,
    mean_std,
    reproduce_block,
    set_threads,
    update_section,
)
from simulations.departures import departure_text, modality_relation
from simulations.federated_probe_runs import (
    SOURCE_B,
    FederatedProbeSettings,
    merge_record,
    run_one,
    source_specs,
)
from simulations.reproduce_findings import holm_text
from simulations.stats import ALPHA, PairedComparison, holm_family, paired_comparison
from simulations.study import describe_source, pretrain_recipe

CONDITIONS = ("coordinator-share", "federated", "coordinator-all")
REFERENCE = "federated"  # every comparison is federated - other
METRICS = ("macro_f1", "accuracy")


def report(s: FederatedProbeSettings, results: dict, sources: dict[str, str]) -> str:
    relation = modality_relation(pretrain_recipe(SOURCE_B)[0], s.target)[1]
    lines = [
        f"## Proxy study: federated merge learning on {s.target} "
        f"({s.arch}, {s.image_size}x{s.image_size}, "
        f"{s.sites} sites)",
        "",
        "**A proxy study, not a reproduction.** The paper learns the merge on one machine and "
        "has no federated experiment; this study federates its probe over "
        f"{s.sites} sites and runs on "
        + departure_text(s.target, s.image_size, s.arch, {"A": s.source_a_spec, "B": SOURCE_B})
        + ".",
        "",
        f"The training labels of {s.target} are split over {s.sites} sites: stratified (iid) and "
        f"label-skewed (Dirichlet alpha={s.alpha:g} per class, redrawn per seed). Validation and "
        "test are split stratified; test metrics are those of the final model pooled over every "
        f"site's test share, i.e. the official test set. Sources: A = `{s.source_a_spec}`, "
        f"B = the same network {describe_source(SOURCE_B)} ("
        + (f"{relation}; " if relation else "")
        + f"{s.source.epochs} epochs, lr {s.source.lr:g}"
        + (f", {s.source_train} images" if s.source_train else "")
        + ").",
        "",
        f"Merge: every learner runs the probe for {s.probe_steps} steps: a coordinator in one "
        f"go, each site of the federated probe over {s.probe_rounds} rounds "
        f"({-(-s.probe_steps // s.probe_rounds)} steps a round); coefficients at lr "
        f"{s.probe_coef_lr:g}, BN and head at {s.probe_lr:g}, best epoch on the learner's own "
        f"validation share. Then the same federated fine-tuning for every condition: "
        f"{s.rounds} rounds of {s.ft.epochs} local epoch(s) at lr {s.ft.lr:g} (AdamW, batch "
        f"{s.batch_size}, InMerge on each aggregate at its defaults), all sites. Every site is "
        f"honest, so the update-direction screen is set to min-cosine {s.min_cosine:g} "
        "(at its default of 0 it rejected honest replies, see docs/federation.md).",
        "",
    ]
    header = ["partition", "merge learned by", "n", "test accuracy", "test macro-F1",
              "test AUROC", "probe state MB"]  # fmt: skip
    rows = []
    for partition in s.partitions:
        for condition in CONDITIONS:
            runs = results[partition][condition]
            probe = [
                merge_record(s.run_dir(partition, condition, seed)).get("probe_mbytes")
                for seed in runs
            ]
            rows.append([
                partition, condition, str(len(runs)),
                mean_std([r["accuracy"] for r in runs.values()]),
                mean_std([r["macro_f1"] for r in runs.values()]),
                mean_std([r["auroc"] for r in runs.values()]),
                f"{probe[0]:.3f}" if probe and probe[0] else "n/a",
            ])  # fmt: skip
    lines += [markdown_table(header, rows), ""]
    model = [merge_record(s.run_dir(p, REFERENCE, seed)).get("model_mbytes")
             for p in s.partitions for seed in results[p][REFERENCE]]  # fmt: skip
    if model and model[0]:
        lines += [
            f"A federated probe round sends each site the probe state (coefficients, BN, head) "
            f"and gets it back; a full model is {model[0]:.2f} MB. The sources go to each "
            "site once, with its first message.",
            "",
        ]
    families = comparisons(s, results)
    size = {m: len(f) for m, f in families.items() if f}
    lines += (
        []
        if not size
        else [
            "Paired by seed (difference = federated - other; 95% bootstrap CI; Wilcoxon p, raw and "
            "Holm-adjusted over its family; a verdict needs the CI to exclude 0 and the "
            f"Holm-adjusted p < {ALPHA:g}). Holm families: one per metric, the "
            + " and ".join(f"{n} {m.replace('_', '-')} comparisons" for m, n in size.items())
            + " of the table (the federated probe against each coordinator, under each partition).",
            "",
        ]
    )
    header = ["partition", "comparison", "metric", "mean diff", "95% CI", "Wilcoxon p",
              "Holm p", "seeds higher", "verdict"]  # fmt: skip
    rows = []
    for partition in s.partitions:
        for other in (c for c in CONDITIONS if c != REFERENCE):
            for metric, family in families.items():
                if (c := family.get((partition, other))) is None:
                    continue
                rows.append([
                    partition, f"federated - {other}", metric.replace("_", "-"),
                    f"{c.mean_difference:+.3f}", c.interval_text(), c.p_text(), holm_text(c),
                    f"{c.wins}/{c.n}", c.verdict_text(("federated", other)),
                ])  # fmt: skip
    if rows:
        lines += [markdown_table(header, rows), "", *verdict_summary(families), ""]
    lines += reproduce_block("simulations.federated_probe", s.argv)
    return "\n".join(lines)


def comparisons(
    s: FederatedProbeSettings, results: dict
) -> dict[str, dict[tuple[str, str], PairedComparison]]:
    """Per metric (one Holm family each): (partition, other condition) -> federated - other,
    paired by seed, with the Holm-adjusted p and the verdict that uses it."""
    families: dict[str, dict[tuple[str, str], PairedComparison]] = {}
    for metric in METRICS:
        keys, found = [], []
        for partition in s.partitions:
            ours = results[partition][REFERENCE]
            for other in (c for c in CONDITIONS if c != REFERENCE):
                theirs = results[partition][other]
                seeds = sorted(set(ours) & set(theirs))
                if len(seeds) < 2:
                    continue
                keys.append((partition, other))
                found.append(paired_comparison([ours[k][metric] for k in seeds],
                                               [theirs[k][metric] for k in seeds]))  # fmt: skip
        families[metric] = dict(zip(keys, holm_family(found), strict=True))
    return families


VERDICT_WORDS = {
    "A better": "the federated probe is better",
    "B better": "the federated probe is worse",
    "within noise": "within noise, no difference claimed",
}
LEARNERS = {
    "coordinator-share": "a coordinator holding one site's share",
    "coordinator-all": "a coordinator holding all the labels",
}
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy"}


def verdict_summary(families: dict[str, dict[tuple[str, str], PairedComparison]]) -> list[str]:
    """What the paired verdicts say, in words derived from each computed verdict (never from
    the means alone): a count, then one line per comparison with every metric."""
    found = [c for family in families.values() for c in family.values()]
    if not found:
        return []
    counts = {v: sum(c.verdict == v for c in found) for v in VERDICT_WORDS}
    fewest = min(c.n for c in found)
    floor = 2 / 2**fewest  # the smallest two-sided exact Wilcoxon p of n seeds without ties
    lines = [
        f"What the paired verdicts say (Holm over each metric's family): of {len(found)} "
        f"comparisons, {counts['A better']} favour the federated probe, {counts['B better']} "
        f"favour the other learner and {counts['within noise']} are within noise."
        + (
            f" {fewest} seeds cannot give p < {ALPHA:g} (the smallest two-sided Wilcoxon p of "
            f"{fewest} seeds is {floor:.3f}), so no comparison with {fewest} seeds can reach a "
            "verdict."
            if floor >= ALPHA
            else ""
        ),
        "",
    ]
    pairs = dict.fromkeys(key for family in families.values() for key in family)
    for partition, other in pairs:
        parts = []
        for metric, family in families.items():
            if (c := family.get((partition, other))) is not None:
                holm = holm_text(c).split(" (")[0]  # the family's size is stated above
                parts.append(
                    f"{METRIC_NAMES.get(metric, metric)} {c.mean_difference:+.3f} ({c.wins}/{c.n} "
                    f"seeds higher, Holm p {holm}): {VERDICT_WORDS[c.verdict]}"
                )
        lines.append(
            f"- {partition}, the federated probe against {LEARNERS.get(other, other)}: "
            + "; ".join(parts)
            + "."
        )
    return lines


def run_study(s: FederatedProbeSettings, console: Console | None = None) -> dict:
    console = console or Console()
    set_threads(s.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    sources = source_specs(s, console)
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for seed in s.seeds:  # seed-major: a cut-short study still has paired seeds
        for partition in s.partitions:
            for condition in CONDITIONS:
                if not s.report_only:
                    console.print(f"[bold]{partition}[/] {condition} seed {seed}")
                record = run_one(s, partition, condition, seed, sources)
                if record is not None:
                    results.setdefault(partition, {}).setdefault(condition, {})[seed] = record
    for partition in s.partitions:
        for condition in CONDITIONS:
            results.setdefault(partition, {}).setdefault(condition, {})
    body = report(s, results, sources)
    update_section(s.results, f"federated-probe-{s.target}", body)
    console.print(body)
    return results


def parse_args(argv: Sequence[str] | None = None) -> FederatedProbeSettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, FederatedProbeSettings, skip=("argv",))
    a = p.parse_args(argv)
    return from_arguments(FederatedProbeSettings, a, argv=tuple(argv or ()))


def main(argv: Sequence[str] | None = None) -> int:
    run_study(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
