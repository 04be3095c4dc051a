"""The faithful study's report: collect a design's seeds into one committed file, then render it.

    python -m simulations.faithful_report --design s1 --budget 0.05 --out runs/faithful

`collect` reads every finished seed of `runs/faithful/<design>-labels<budget>/` (results.json,
test predictions, wall time, Source B replicates, the pilot) into
`results/faithful/<design>-labels<budget>.json`: per seed and method, the metrics before and
after fine-tuning, the chosen rates, the optimiser steps per stage and the predicted class of
every test image, so the report (and its paired, hierarchical statistics) re-renders from that
file alone with `--report-only`. The section goes to RESULTS.md between `faithful-<design>`
markers, whatever it shows. Seeds already in the committed file are kept (`pooled`), so a design
can be finished on another day, as long as its Source B replicates are re-made identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medmerge_core.io import atomic_write_json
from medmerge_core.report import method_label
from simulations.common import markdown_table, mean_std, seed_minutes, update_section
from simulations.equivalence import EQUIVALENCE_MARGIN, compare_methods, holm_verdicts

HEADLINE = "medmerge"
# MedMerge against each of these is one Holm family; average_probe is the headline contrast.
CONTRASTS = ("average_probe", "interpolate", "average_ft", "best_single", "lp_ft:a", "lp_ft:b",
             "ft:a", "ft:b")  # fmt: skip
PLANNED_SEEDS = 10  # per design: the floor for a headline contrast
REFERENCE = ("ensemble",)  # costs d models at inference: reported, never a competitor
DESIGN_TEXT = {
    "s1": "S1, same modality and pathology: Source B = the ImageNet EfficientNet-Lite0 "
    "fine-tuned on half 1 of PneumoniaMNIST's training images (another hospital's pneumonia "
    "model); the target's labelled pool is the disjoint half 2",
    "s2": "S2, same modality, another task: Source B = the ImageNet EfficientNet-Lite0 "
    "fine-tuned on six OrganAMNIST organs (abdominal CT); the target classifies the other five",
    "negative": "Negative control, another modality: Source B = the ImageNet EfficientNet-Lite0 "
    "fine-tuned on BreastMNIST (ultrasound); the target as in S1 (PneumoniaMNIST half 2)",
}


def _stage_steps(stages: Mapping[str, Any]) -> dict[str, int]:
    steps = {k: int(v["steps"]) for k, v in stages.items() if isinstance(v, dict) and "steps" in v}
    if "ft" in stages and "steps_all_rates" in stages["ft"]:
        steps["ft_all_rates"] = int(stages["ft"]["steps_all_rates"])
    return steps


def _method_record(entry: Mapping[str, Any], predicted: np.ndarray) -> dict[str, Any]:
    stages = entry.get("stages", {})
    ft = stages.get("ft", {})
    record = {
        "test": {k: entry["test"][k] for k in ("macro_f1", "accuracy")},
        "val_macro_f1": ft.get("val", {}).get("macro_f1"),
        "steps": _stage_steps(stages),
        "ft_lr": ft.get("lr"),
        "predicted": "".join(str(int(p)) for p in predicted),
    }
    if "before_ft" in stages:
        record["before_ft"] = {s: stages["before_ft"][s]["macro_f1"] for s in ("val", "test")}
    for key in ("weight", "chosen"):  # interpolate's weight, best single's source
        value = stages.get("probe", {}).get(key) if key == "weight" else entry.get(key)
        if value is not None:
            record[key] = value
    return record


def collect(root: Path) -> dict[str, Any]:
    """Every finished seed of a design folder (see the module docstring)."""
    from medmerge_core.experiment.run_folder import ExperimentRun

    seeds: dict[str, Any] = {}
    labels: str | None = None
    for folder in sorted(root.glob("seed*"), key=lambda p: int(p.name.removeprefix("seed"))):
        run = ExperimentRun(folder)
        results = run.results()
        timing = folder / "wall_seconds.json"
        if not timing.exists() or "ensemble" not in results:  # unfinished
            continue
        methods = {}
        for method, entry in results.items():
            if entry.get("derived") and "members" in entry:
                probs = np.mean([run.probabilities(m)[0] for m in entry["members"]], axis=0)
            else:
                probs, truth = run.probabilities(entry.get("chosen", method))
                labels = labels or "".join(str(int(t)) for t in truth)
            methods[method] = _method_record(entry, probs.argmax(1))
        seeds[folder.name.removeprefix("seed")] = {
            **json.loads(timing.read_text(encoding="utf-8")),
            "methods": methods,
        }
    sources = {
        p.stem: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((root / "sources").glob("B*.json"))
    }
    pilot = root / "pilot.json"
    return {
        "seeds": seeds,
        "labels": labels,
        "sources": sources,
        "pilot": json.loads(pilot.read_text(encoding="utf-8")) if pilot.exists() else None,
    }


def pooled(earlier: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The earlier collection's seeds with the new run folders' added. Seeds pool only when
    they share the test labels, the pilot's coefficient rate and every Source B replicate
    (its test metrics as recorded: a re-made replicate must be the same model)."""
    if new["labels"] is not None and earlier["labels"] != new["labels"]:
        raise ValueError("the runs' test labels differ from the collected ones")
    if new["pilot"] and earlier["pilot"] and new["pilot"]["coef_lr"] != earlier["pilot"]["coef_lr"]:
        raise ValueError(f"the pilot chose coef_lr {new['pilot']['coef_lr']}, the collected "
                         f"seeds used {earlier['pilot']['coef_lr']}")  # fmt: skip
    for name, source in new["sources"].items():
        before = earlier["sources"].get(name)
        if before is not None and before["test"] != source["test"]:
            raise ValueError(f"Source {name} is not the replicate the collected seeds used "
                             f"(test {source['test']} against {before['test']})")  # fmt: skip
    return {
        "seeds": {**earlier["seeds"], **new["seeds"]},
        "labels": earlier["labels"],
        "sources": {**new["sources"], **earlier["sources"]},
        "pilot": earlier["pilot"] or new["pilot"],
    }


def _per_seed(data: Mapping[str, Any], method: str) -> tuple[list[np.ndarray], list[float]]:
    predicted, scores = [], []
    for seed in data["seeds"].values():
        record = seed["methods"][method]
        predicted.append(np.frombuffer(record["predicted"].encode(), np.uint8) - ord("0"))
        scores.append(record["test"]["macro_f1"])
    return predicted, scores


def comparisons(data: Mapping[str, Any], *, n_boot: int = 2000) -> dict[str, Any]:
    """MedMerge against every contrast, one Holm family (the verdicts use the adjusted p)."""
    labels = np.frombuffer(data["labels"].encode(), np.uint8) - ord("0")
    num_classes = int(labels.max()) + 1
    ours, our_scores = _per_seed(data, HEADLINE)
    truth = [labels] * len(ours)
    family = []
    for other in CONTRASTS:
        theirs, their_scores = _per_seed(data, other)
        family.append(compare_methods(ours, theirs, truth, num_classes, our_scores,
                                      their_scores, n_boot=n_boot))  # fmt: skip
    return dict(zip(CONTRASTS, holm_verdicts(family), strict=True))


def method_rows(data: Mapping[str, Any]) -> list[list[str]]:
    seeds = list(data["seeds"].values())
    rows = []
    for method in seeds[0]["methods"]:
        records = [s["methods"][method] for s in seeds]

        def values(get, records=records):
            return [v for v in (get(r) for r in records) if v is not None]

        before = values(lambda r: r.get("before_ft", {}).get("test"))
        before_val = values(lambda r: r.get("before_ft", {}).get("val"))
        steps = records[0]["steps"]
        label = method_label(method) + (" (reference)" if method in REFERENCE else "")
        rates = sorted({f"{r['ft_lr']:g}" for r in records if r.get("ft_lr") is not None})
        rows.append([
            label,
            mean_std([r["test"]["macro_f1"] for r in records]),
            mean_std([r["test"]["accuracy"] for r in records]),
            mean_std(values(lambda r: r.get("val_macro_f1"))),
            mean_std(before_val) if before_val else "-",
            mean_std(before) if before else "-",
            ", ".join(f"{k} {v}" for k, v in steps.items()) or "-",
            ", ".join(rates) or "-",
        ])  # fmt: skip
    return rows


def contrast_rows(found: Mapping[str, Any]) -> list[list[str]]:
    return [[f"MedMerge - {method_label(m)}", found[m].text()] for m in CONTRASTS]


def choices_text(data: Mapping[str, Any]) -> str:
    """What validation chose, counted over seeds."""
    seeds = list(data["seeds"].values())

    def counted(method: str, key: str) -> str:
        values = [s["methods"][method].get(key) for s in seeds]
        names = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
        return ", ".join(f"{k} on {names.count(k)}" for k in sorted(set(names)))

    pilot = data.get("pilot") or {}
    means = {round(float(np.mean(v)), 6) for v in pilot.get("val_macro_f1", {}).values()}
    tied = len(means) == 1 and len(pilot.get("val_macro_f1", {})) > 1
    tie = " All coefficient rates tied on the pilot validation sets, so the first was kept."
    return (f"Chosen on validation, over the {len(seeds)} seeds: the best single source "
            f"{counted('best_single', 'chosen')}; Interp+FT's w of Source A "
            f"{counted('interpolate', 'weight')}.{tie if tied else ''}")  # fmt: skip


def render(design: str, budget: float, data: Mapping[str, Any], command: str) -> str:
    seeds = data["seeds"]
    n = len(seeds)
    found = comparisons(data)
    source_rows = [[name, f"{s['train']}", f"{s['test']['accuracy']:.3f}",
                    f"{s['test']['macro_f1']:.3f}", f"{s['seconds'] / 60:.1f}"]
                   for name, s in data["sources"].items()]  # fmt: skip
    pilot = data["pilot"] or {}
    lines = [
        f"## Proxy study {design.upper()} at {budget:g} of the labels: does the learnt merge add "
        "anything on MedMerge's premise?",
        "",
        f"{DESIGN_TEXT[design]}. Source A is the real ImageNet EfficientNet-Lite0 "
        "(`imagenet:efficientnet_lite0`) at 64 px, upsampled from MedMNIST's 28 px: a proxy of "
        "the paper's 224 px ImageNet + HAM10K/EyePACS/CheXpert backbones, not a reproduction.",
        "",
        f"{n} seeds; seed s merges with Source B replicate s mod {len(data['sources'])}. Each "
        "seed draws its labelled images and a validation set of the same fraction (at least 10 "
        "per class) afresh; the test set is fixed. LP, probe and FT each run 20 epochs (the "
        "same passes over the labelled images); every method's FT rate is chosen on its "
        "validation score among the rates listed; the probe's coefficient rate "
        f"({pilot.get('coef_lr', 'n/a')}) was chosen on the validation sets of pilot seeds "
        f"{pilot.get('seeds', [])} (mean validation macro-F1 per rate: "
        f"{ {k: round(float(np.mean(v)), 3) for k, v in pilot.get('val_macro_f1', {}).items()} }"
        "), never on a study seed. Interp+FT chooses w of Source A from 0, 0.25, 0.5, 0.75, 1 "
        "on validation after probing BN and head at each; Avg-probe+FT holds every "
        "coefficient at 1/2 and probes BN and head with MedMerge's budget.",
        "",
        choices_text(data),
        *_partial_lines(n),
        "",
        "| Source B replicate | train images | test accuracy | test macro-F1 | minutes |",
        "|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in source_rows],
        "",
        'Test and validation macro-F1 (mean ± std over seeds); "before FT" is after the LP or '
        "the probe; steps are optimiser steps per stage (FT at the chosen rate, and over all "
        "rates tried):",
        "",
        markdown_table(
            [
                "method",
                "test macro-F1",
                "test accuracy",
                "val macro-F1",
                "val before FT",
                "test before FT",
                "steps",
                "FT rates chosen",
            ],
            method_rows(data),
        ),
        "",
        "MedMerge against each method, test macro-F1, paired by seed: the mean difference, its "
        "95% interval from a hierarchical bootstrap (seeds, then test images within a seed, "
        "resampled together), the Wilcoxon signed-rank p over seeds Holm-adjusted over this "
        f"family of {len(CONTRASTS)}, the verdict (better / worse: interval and adjusted p agree; "
        f"equivalent: the 90% interval lies within ±{EQUIVALENCE_MARGIN}, TOST; else "
        "inconclusive) and the smallest effect this design detects (80% power):",
        "",
        markdown_table(
            ["contrast", "difference, interval, p, verdict (MDE)"], contrast_rows(found)
        ),
        "",
        "Wall time per seed (all methods, one thread, two seeds side by side on 2 cores): "
        f"{seed_minutes(seeds)}.",
        "",
        "Reproduce (the report re-renders from the committed collection with `--report-only`):",
        "",
        "```",
        command,
        "```",
    ]
    return "\n".join(lines)


def _partial_lines(n: int) -> list[str]:
    if n >= PLANNED_SEEDS:
        return []
    return ["", f"**Partial: {n} of the {PLANNED_SEEDS} seeds this design plans.** The missing "
            "seeds are to be run and pooled into the same collection; until then read the "
            "intervals" + (": with 8 seeds or fewer the Holm-adjusted Wilcoxon p over "
            f"{len(CONTRASTS)} contrasts cannot fall below 0.05, so no verdict is better or "
            "worse." if n <= 8 and len(CONTRASTS) >= 8 else ".")]  # fmt: skip


def print_contrasts(found: Mapping[str, Any], console: Console) -> None:
    table = Table(title="MedMerge against each method (test macro-F1)")
    table.add_column("contrast")
    table.add_column("result")
    for row in contrast_rows(found):
        table.add_row(*row)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.faithful_report")
    parser.add_argument("--design", required=True, choices=tuple(DESIGN_TEXT))
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("runs/faithful"))
    parser.add_argument("--collected", type=Path, default=Path("results/faithful"))
    parser.add_argument("--results", type=Path, default=Path("RESULTS.md"))
    parser.add_argument(
        "--report-only", action="store_true", help="render from the committed collection only"
    )
    parser.add_argument("--command", default="", help="the study's command, for the section")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    key = f"{args.design}-labels{args.budget:g}"
    path = args.collected / f"{key}.json"
    console = Console()
    if args.report_only:
        if not path.is_file():
            console.print(f"[red]error:[/] {path}: no collection (run without --report-only)")
            return 2
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = collect(args.out / key)
        if path.is_file():  # seeds collected before (an earlier machine's runs) are kept
            try:
                data = pooled(json.loads(path.read_text(encoding="utf-8")), data)
            except ValueError as exc:
                console.print(f"[red]error:[/] {path}: {exc}")
                return 2
        if not data["seeds"]:
            console.print(f"[red]error:[/] {args.out / key}: no finished seed")
            return 2
        atomic_write_json(path, {"design": args.design, "budget": args.budget,
                                 "command": args.command, **data})  # fmt: skip
    command = data.get("command") or args.command
    update_section(args.results, f"faithful-{key}", render(args.design, args.budget, data,
                                                          command))  # fmt: skip
    print_contrasts(comparisons(data), console)
    console.print(f"wrote {args.results} ({len(data['seeds'])} seeds) and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
