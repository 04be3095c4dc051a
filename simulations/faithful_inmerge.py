"""InMerge on the faithful study's footing: S1's target, the ImageNet source, corrupted tests.

    python -m simulations.faithful_inmerge --data-root ../shared/data/medmnist \
        --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/faithful
    python -m simulations.faithful_inmerge --report --out runs/faithful

The ImageNet EfficientNet-Lite0 (`imagenet:efficientnet_lite0`, 64 px) is fine-tuned on each
S1 seed's target (PneumoniaMNIST half 2 at `--budget` of its labels, the validation set of the
same fraction: `simulations.faithful` makes the same files) three ways, each for
`--epochs` + `--phase-epochs` epochs at the FT rate chosen on validation (`--ft-lrs`):
- `baseline`: no InMerge;
- `public`: the InMerge public code's settings: p 0.3, cosine above tau 0.3, alpha 0.8, the
  first 10 convs never merged, merging only in a separate phase after `--epochs` of normal
  training (the phase's epochs are the last `--phase-epochs`);
- `quantile`: the project's default (`InMergeSettings()`: p 0.3, a cosine above the layer's own
  0.9-quantile, alpha 0.8, the deepest half of the main-path convs, from the first epoch).
Each model keeps its best epoch on validation, so the public phase can be passed over; how
often it was kept is reported. Every model is tested on the clean test set and 12 corrupted
copies (`medmerge_core.corruptions`: 4 corruptions x 3 severities, one corruption seed). Each
InMerge variant is compared with the baseline on clean and on corrupted images by the
faithful study's statistics (hierarchical bootstrap, each test image resampled with all its
corrupted copies, TOST at 0.02, Holm over the four contrasts). `--report` collects the run
folders into the committed `results/faithful/inmerge-labels<budget>.json` (keeping the seeds
it already holds, so seeds run on another machine or day add up) and renders the section;
`--report-only` re-renders from that file.
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

from medmerge_core.errors import InputError
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.io import atomic_write_json
from simulations.common import (
    markdown_table,
    mean_std,
    seed_minutes,
    set_threads,
    update_section,
)
from simulations.equivalence import (
    EQUIVALENCE_MARGIN,
    compare_methods,
    holm_verdicts,
    macro_f1,
)
from simulations.faithful_inmerge_runs import METHOD, VARIANTS, InMergeStudy, source_activity

# -- collecting and reporting ------------------------------------------------------------------


def collect(root: Path) -> dict[str, Any]:
    """Every seed whose three variants finished, with per-image predictions."""
    seeds: dict[str, Any] = {}
    labels = None
    for timing in sorted(root.glob("wall_seconds-seed*.json"),
                         key=lambda p: int(p.stem.rsplit("seed", 1)[1])):  # fmt: skip
        seed = timing.stem.rsplit("seed", 1)[1]
        variants = {}
        for variant in VARIANTS:
            run = ExperimentRun(root / f"{variant}-seed{seed}")
            entry = run.results().get(METHOD)
            cached = run.dir / "conditions.json"
            if entry is None or not cached.exists():
                break
            found = json.loads(cached.read_text(encoding="utf-8"))
            labels = labels or found["labels"]
            ft = entry["stages"]["ft"]
            variants[variant] = {
                "lr": ft.get("lr"),
                "best_epoch": ft["best_epoch"],
                "val_macro_f1": ft["val"]["macro_f1"],
                "steps": ft.get("steps_all_rates", ft["steps"]),
                "merged": found["merged"],
                "predicted": found["predicted"],
            }
        else:
            seeds[seed] = {**json.loads(timing.read_text(encoding="utf-8")),
                           "variants": variants}  # fmt: skip
    return {"seeds": seeds, "labels": labels}


def _digits(text: str) -> np.ndarray:
    return (np.frombuffer(text.encode(), np.uint8) - ord("0")).astype(np.int64)


def _predictions(data: Mapping[str, Any], variant: str, condition: str) -> list[np.ndarray]:
    """Per seed, the predicted classes: `clean`, or every corrupted copy in one array."""
    out = []
    for seed in data["seeds"].values():
        predicted = seed["variants"][variant]["predicted"]
        keys = ["clean"] if condition == "clean" else [k for k in predicted if "/" in k]
        out.append(np.concatenate([_digits(predicted[k]) for k in keys]))
    return out


def comparisons(data: Mapping[str, Any], *, n_boot: int = 2000) -> dict[tuple[str, str], Any]:
    """Each InMerge variant against the baseline, clean and corrupted: one Holm family."""
    labels = _digits(data["labels"])
    copies = sum("/" in k for k in next(iter(data["seeds"].values()))["variants"]["baseline"][
        "predicted"])  # fmt: skip
    family, keys = [], []
    for condition, n in (("clean", 1), ("corrupted", copies)):
        truth = [np.tile(labels, n)] * len(data["seeds"])
        base = _predictions(data, "baseline", condition)
        for variant in VARIANTS[1:]:
            ours = _predictions(data, variant, condition)
            family.append(compare_methods(ours, base, truth, int(labels.max()) + 1,
                                          n_boot=n_boot, copies=n))  # fmt: skip
            keys.append((variant, condition))
    return dict(zip(keys, holm_verdicts(family), strict=True))


def _scores(data: Mapping[str, Any], variant: str, keys: Sequence[str]) -> list[float]:
    """Per seed, macro-F1 over the images of `keys` (pooled)."""
    labels = _digits(data["labels"])
    out = []
    for seed in data["seeds"].values():
        predicted = seed["variants"][variant]["predicted"]
        pred = np.concatenate([_digits(predicted[k]) for k in keys])
        out.append(macro_f1(pred, np.tile(labels, len(keys)), int(labels.max()) + 1))
    return out


def variant_rows(data: Mapping[str, Any], epochs: int) -> list[list[str]]:
    first = next(iter(data["seeds"].values()))["variants"]["baseline"]["predicted"]
    corruptions = sorted({k.split("/")[0] for k in first if "/" in k})
    rows = []
    for variant in VARIANTS:
        runs = [s["variants"][variant] for s in data["seeds"].values()]
        in_phase = sum(r["best_epoch"] >= epochs for r in runs)
        rates: dict[str, int] = {}
        for r in runs:  # a single rate is not a choice, so the run records none
            rate = f"{r['lr'] if r['lr'] is not None else data['protocol']['ft_lrs'][0]:g}"
            rates[rate] = rates.get(rate, 0) + 1
        rows.append([
            variant,
            mean_std(_scores(data, variant, ["clean"])),
            mean_std(_scores(data, variant, [k for k in first if "/" in k])),
            *[mean_std(_scores(data, variant, [k for k in first if k.startswith(c + "/")]))
              for c in corruptions],
            mean_std([r["val_macro_f1"] for r in runs]),
            f"{in_phase}/{len(runs)}",
            ", ".join(f"{k}: {v}" for k, v in sorted(rates.items())),
        ])  # fmt: skip
    return rows


def render(data: Mapping[str, Any], command: str) -> str:
    p = data["protocol"]
    seeds = data["seeds"]
    first = next(iter(seeds.values()))["variants"]["baseline"]["predicted"]
    corruptions = sorted({k.split("/")[0] for k in first if "/" in k})
    found = comparisons(data)
    merged = {v: [s["variants"][v]["merged"] for s in seeds.values()] for v in VARIANTS[1:]}
    lines = [
        f"## Proxy study: InMerge on S1's target with the ImageNet source ({p['budget']:g} of "
        "the labels)",
        "",
        "Does InMerge make a fine-tuned model more robust? The ImageNet EfficientNet-Lite0 at "
        f"64 px is fine-tuned on S1's target (PneumoniaMNIST half 2, {p['budget']:g} of its "
        f"labels, {len(seeds)} seeds, the same target files as S1) for {p['epochs']} + "
        f"{p['phase_epochs']} epochs at the rate chosen on validation from {p['ft_lrs']}, "
        "keeping the best epoch on validation: `baseline` without InMerge; `public` with the "
        "InMerge public code's settings (p 0.3, cosine > tau 0.3, alpha 0.8, the first 10 convs "
        f"skipped, merging only in the last {p['phase_epochs']} epochs, a separate phase after "
        "normal training); `quantile`, the project's default (p 0.3, the layer's 0.9-quantile "
        "of cosines, alpha 0.8, the deepest half of the main-path convs, every epoch). A proxy "
        "of the InMerge paper (which trains VGG/ResNet from scratch on full datasets at 224 "
        "px), not a reproduction.",
        "",
        "What one application of each rule merges (InMerge's own draws, seed 0): on the "
        f"ImageNet weights, public {data['activity']['public']}, quantile "
        f"{data['activity']['quantile']}; on the fine-tuned models, public "
        f"{_range_text(merged['public'])}, quantile {_range_text(merged['quantile'])}.",
        "",
        "Test macro-F1 (mean ± std over seeds; corrupted: pooled over the 12 corrupted copies, "
        "and per corruption over its 3 severities), the validation macro-F1 of the kept epoch, "
        "how often the kept epoch was in the public merging phase, and the FT rates chosen:",
        "",
        markdown_table(
            [
                "variant",
                "clean",
                "corrupted",
                *corruptions,
                "val macro-F1",
                f"kept epoch >= {p['epochs']}",
                "FT rates chosen",
            ],
            variant_rows(data, p["epochs"]),
        ),
        "",
        "Each InMerge variant against the baseline, test macro-F1 paired by seed: the mean "
        "difference, its 95% interval from a hierarchical bootstrap (seeds, then test images, "
        "each image with all its corrupted copies), the Wilcoxon p over seeds Holm-adjusted over "
        f"these {len(found)}, the verdict (margin ±{EQUIVALENCE_MARGIN}) and the smallest "
        "effect this design detects (80% power):",
        "",
        markdown_table(
            ["contrast", "difference, interval, p, verdict (MDE)"],
            [[f"{v} − baseline, {c}", r.text()] for (v, c), r in found.items()],
        ),
        "",
        f"Wall time per seed (three fine-tunings and 13 test sets, one thread, two seeds side "
        f"by side on 2 cores): {seed_minutes(seeds)}.",
        "",
        "Reproduce (`--report-only` re-renders from the committed collection):",
        "",
        "```",
        command,
        "```",
    ]
    return "\n".join(lines)


def _range_text(values: Sequence[str | None]) -> str:
    merged = sorted(int(v.split(" of ")[0]) for v in values if v)
    if not merged:
        return "n/a"
    rest = values[0].split(" of ", 1)[1] if values[0] else ""
    return f"{merged[0]}-{merged[-1]} of {rest}" if merged[0] != merged[-1] else values[0]


def print_contrasts(found: Mapping[tuple[str, str], Any], console: Console) -> None:
    table = Table(title="InMerge against the baseline (test macro-F1)")
    table.add_column("contrast")
    table.add_column("result")
    for (variant, condition), result in found.items():
        table.add_row(f"{variant}, {condition}", result.text())
    console.print(table)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.faithful_inmerge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/medmnist"))
    parser.add_argument("--out", type=Path, default=Path("runs/faithful"))
    parser.add_argument("--budget", type=float, default=0.05, help="fraction of half 2 labelled")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=20, help="normal training epochs")
    parser.add_argument("--phase-epochs", type=int, default=10, help="the public merging phase")
    parser.add_argument("--ft-lrs", type=float, nargs="+", default=[1e-4, 1e-5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="collect the runs and render")
    parser.add_argument("--report-only", action="store_true", help="render the committed file")
    parser.add_argument("--collected", type=Path, default=Path("results/faithful"))
    parser.add_argument("--results", type=Path, default=Path("RESULTS.md"))
    parser.add_argument("--command", default="", help="the study's command, for the section")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget: expected a fraction in (0, 1], got {args.budget}")
    if args.epochs < 1 or args.phase_epochs < 1:
        parser.error("--epochs and --phase-epochs: at least 1")
    return args


def report(args: argparse.Namespace, console: Console) -> int:
    key = f"inmerge-labels{args.budget:g}"
    path = args.collected / f"{key}.json"
    if args.report_only:
        if not path.is_file():
            console.print(f"[red]error:[/] {path}: no collection (run with --report)")
            return 2
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = collect(args.out / key)
        protocol = {"budget": args.budget, "epochs": args.epochs,
                    "phase_epochs": args.phase_epochs, "ft_lrs": args.ft_lrs}  # fmt: skip
        if path.is_file():  # seeds collected before (an earlier machine's runs) are kept
            earlier = json.loads(path.read_text(encoding="utf-8"))
            if earlier["protocol"] != protocol:
                console.print(f"[red]error:[/] {path}: collected with {earlier['protocol']}, "
                              f"not {protocol}")  # fmt: skip
                return 2
            data = {"seeds": {**earlier["seeds"], **data["seeds"]},
                    "labels": data["labels"] or earlier["labels"]}  # fmt: skip
        if len(data["seeds"]) < 2:  # paired statistics need two seeds at least
            console.print(f"[red]error:[/] {args.out / key}: {len(data['seeds'])} finished "
                          "seeds; a report needs 2 finished seeds")  # fmt: skip
            return 2
        data = {"command": args.command, "activity": source_activity(), "protocol": protocol,
                **data}  # fmt: skip
        atomic_write_json(path, data)
    update_section(args.results, f"faithful-{key}", render(data, data.get("command") or
                                                           args.command))  # fmt: skip
    print_contrasts(comparisons(data), console)
    console.print(f"wrote {args.results} ({len(data['seeds'])} seeds) and {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    console = Console()
    try:
        if args.report or args.report_only:
            return report(args, console)
        study = InMergeStudy(args.data_root, args.out, args.budget, args.epochs,
                             args.phase_epochs, args.ft_lrs)  # fmt: skip
        for seed in args.seeds:
            study.run_seed(seed, console)
    except InputError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
