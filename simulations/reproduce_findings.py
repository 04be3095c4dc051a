"""A study run's paired findings (Holm families by seed), apart from its tables and figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medmerge_core.report import method_label
from simulations.stats import PairedComparison, holm_family, paired_comparison
from simulations.study import STUDIES, plan

METRICS = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"))


@dataclass
class Family:
    """One Holm family: comparisons of one kind (the main comparison, the ablations or the
    three sources) on one metric, each 'label' paired by seed."""

    kind: str
    metric: str
    labels: list[str] = field(default_factory=list)
    results: list[PairedComparison] = field(default_factory=list)


def holm_text(result: PairedComparison) -> str:
    """The Holm-adjusted p with its family size ('n/a' where the seeds are too few)."""
    if not result.enough_seeds:
        return "n/a"
    if result.holm_p is None:  # a family of one: Holm leaves p as it is
        return f"{result.p_text()} (of 1)"
    return f"{result.holm_p:.3f} (of {result.family})"


def comparison_families(collected: Mapping[str, Any]) -> list[Family]:
    """MedMerge against every other method of its seed, each ablation against the main MedMerge
    of the same seeds, and 3 sources against 2, paired by seed (simulations.stats); each kind
    on each metric is one family, Holm-adjusted, and its verdicts use the adjusted p."""
    families: dict[tuple[str, str], Family] = {}

    def compare(kind: str, label: str, ours: Mapping[int, Any], theirs: Mapping[int, Any],
                method: str, ours_method: str = "medmerge") -> None:  # fmt: skip
        seeds = [k for k in sorted(ours) if ours_method in ours[k] and method in theirs.get(k, {})]
        if len(seeds) < 2:
            return
        for key, name in METRICS:
            mine = [ours[k][ours_method]["test"][key] for k in seeds]
            other = [theirs[k][method]["test"][key] for k in seeds]
            family = families.setdefault((kind, key), Family(kind, name))
            family.labels.append(label)
            family.results.append(paired_comparison(mine, other))

    main = collected.get("main", {})
    others = dict.fromkeys(m for r in main.values() for m in r if m != "medmerge")
    for method in others:
        compare("main", f"MedMerge − {method_label(method)}", main, main, method)
    for spec in plan(STUDIES):  # each ablation against the main MedMerge of the same seeds
        if spec.ablation and spec.group != "three" and "medmerge" in spec.pipelines:
            compare("ablations", f"{spec.label} − main MedMerge", collected.get(spec.group, {}),
                    main, "medmerge")  # fmt: skip
    three = collected.get("three", {})
    compare("three", "MedMerge A + B + C − MedMerge A + B", three, main, "medmerge")
    compare("three", "MedMerge A + B + C − Avg+FT A + B + C", three, three, "average_ft")
    for family in families.values():
        family.results = holm_family(family.results)
    return list(families.values())


def findings(collected: Mapping[str, Any]) -> list[list[str]]:
    """Table rows, each kind's rows together (macro-F1 then accuracy per comparison): the
    paired difference, its bootstrap CI, the raw and the Holm-adjusted Wilcoxon p (over the
    row's family) and the verdict, which uses the adjusted p."""
    rows = []
    families = comparison_families(collected)
    for kind in dict.fromkeys(f.kind for f in families):
        mine = [f for f in families if f.kind == kind]
        for index, label in enumerate(mine[0].labels):
            for family in mine:
                result = family.results[index]
                rows.append([
                    label, family.metric, f"{result.mean_difference:+.3f}",
                    result.interval_text(), result.p_text(), holm_text(result),
                    f"{result.wins}/{result.n}",
                    {"A better": "**MedMerge better**", "B better": "**MedMerge worse**"}.get(
                        result.verdict, result.verdict),
                ])  # fmt: skip
    return rows


FAMILY_WORDS = {
    "main": "the main comparison (MedMerge against each of its {n} other methods)",
    "ablations": "the ablations ({n}, each against the main MedMerge of the same seeds)",
    "three": "the three-source comparisons ({n})",
}


def families_text(collected: Mapping[str, Any]) -> str:
    """Which comparisons are one Holm family, in words, with their sizes."""
    families = comparison_families(collected)
    kinds = {f.kind: len(f.results) for f in families}
    parts = [FAMILY_WORDS[k].format(n=n) for k, n in kinds.items()]
    if not parts:
        return ""
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (
        f"Holm families: {listed}, each on one metric (macro-F1 and accuracy are separate "
        "families); the Holm column gives the adjusted p and the family's size."
    )
