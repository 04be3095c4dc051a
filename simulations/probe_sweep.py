"""Choose the probe's defaults (coefficient learning rate, step budget, constraint) on
validation data only, and show that the validation loss has levelled off by the default budget.

Two targets: the built-in synthetic target (ResNet-18 sources pretrained as in the demo) and
real BreastMNIST (Source A: the CIFAR-10 ResNet-20 from ../shared/weights; Source B: a ResNet-20
pretrained on PneumoniaMNIST from A). With a constant learning rate, one probe of N steps also
gives the probe of every shorter budget (its validation after each epoch), so each setting runs
once per seed. Test data is never loaded for selection: only the val split is evaluated.

    python -m simulations.probe_sweep --data-root ../shared/data/medmnist
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.data.base import BatchLoader, TaskData
from medmerge_core.data.synthetic import make_task
from medmerge_core.experiment.demo import DemoSettings, pretrain_demo_sources
from medmerge_core.io import atomic_write_json
from medmerge_core.models import build_model, load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.probe import learn_merge
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.train import FitOptions, Runtime
from simulations.common import (
    command_text,
    load_medmnist_file,
    markdown_table,
    relative,
    set_threads,
    update_section,
)

TARGETS = ("synthetic", "breastmnist")
HEAD_LR, HEAD_WEIGHT_DECAY, BATCH_SIZE = 1e-3, 0.01, 32
LOSS_RISE = 1.5  # a probe whose validation loss has risen past this is overfitting


def target_setup(
    target: str, data_root: Path, out: Path, runtime: Runtime
) -> tuple[str, TaskData, list[dict[str, torch.Tensor]], str]:
    """(arch, target task with val split, [source A, source B], description)."""
    source_dir = out / target / "sources"
    stage = StageSettings(3, 1e-3)
    if target == "synthetic":
        arch = "resnet18"
        generic, related = pretrain_demo_sources(
            source_dir, DemoSettings(), runtime, show_progress=False
        )
        a = load_source(str(generic), arch, 1)
        task = make_task("target", image_size=28, seed=0)
        text = "the demo's setting: ResNet-18 28x28, A generic, B related_a from A"
        b = load_source(str(related), arch, 1)
    else:
        arch = "cifar_resnet20"
        a = load_source("cifar10:resnet20", arch, 1)
        pneumonia = load_medmnist_file(data_root, "pneumoniamnist")
        pretrain_source(
            arch,
            pneumonia,
            source_dir / "B.pt",
            stage,
            runtime,
            init=a,
            batch_size=64,
            options=FitOptions(show_progress=False),
        )
        task = load_medmnist_file(data_root, "breastmnist")
        text = "CIFAR ResNet-20 28x28; A: CIFAR-10 weights, B: PneumoniaMNIST from A"
        b = load_source(str(source_dir / "B.pt"), arch, 1)
    return arch, task, [a, b], text


def probe_run(
    arch: str,
    task: TaskData,
    sources: list[dict[str, torch.Tensor]],
    settings: ProbeSettings,
    seed: int,
    runtime: Runtime,
) -> dict[str, Any]:
    """One probe; its per-epoch validation curve (with the step count) and final movement."""
    torch.manual_seed(seed)
    train = BatchLoader(task.train, BATCH_SIZE, shuffle=True, seed=seed)
    learned = learn_merge(
        build_model(arch, task.num_classes, task.in_channels),
        sources,
        ["A", "B"],
        train,
        BatchLoader(task.val, 256),
        settings,
        HEAD_LR,
        HEAD_WEIGHT_DECAY,
        runtime,
        options=FitOptions(name="medmerge probe", show_progress=False),
    )
    assert learned.fit is not None
    per_epoch = len(train)
    curve = [
        {
            "step": min((h["epoch"] + 1) * per_epoch, settings.steps or 0),
            "val_loss": h["val_loss"],
            "val_macro_f1": h["val_macro_f1"],
        }
        for h in learned.fit.history
    ]
    movement = np.concatenate([np.abs(c[0] - 0.5).ravel() for c in learned.coefficients.values()])
    return {
        "curve": curve,
        "best_epoch": learned.fit.best_epoch,
        "movement_q50": float(np.median(movement)),
        "movement_q90": float(np.quantile(movement, 0.9)),
        "seconds": learned.fit.seconds,
    }


def at_budget(curve: Sequence[dict[str, float]], budget: int) -> dict[str, float]:
    """What a probe of `budget` steps hands on: fit keeps the epoch with the best validation
    macro-F1 among those that ended within the budget (the first on ties)."""
    within = [c for c in curve if c["step"] <= budget] or list(curve[:1])
    best = max(within, key=lambda c: c["val_macro_f1"])
    return {**best, "end_loss": within[-1]["val_loss"]}


def settings_grid(coef_lrs: Sequence[float], steps: int) -> list[ProbeSettings]:
    grid = [ProbeSettings(coef_lr=lr, steps=steps) for lr in coef_lrs]
    # The constraints at the rates where they can bind (softmax moves w about half as far).
    for constraint, rates in (("clamp", coef_lrs[-3:-1]), ("softmax", coef_lrs[-2:])):
        grid += [ProbeSettings(coef_lr=lr, steps=steps, constraint=constraint) for lr in rates]
    return grid


def run_sweep(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    runtime = Runtime.detect("cpu")
    collected: dict[str, Any] = {}
    for target in args.targets:
        arch, task, sources, text = target_setup(target, args.data_root, args.out, runtime)
        collected[target] = {"text": text, "runs": {}}
        for settings in settings_grid(args.coef_lrs, args.steps):
            for seed in args.seeds:
                key = f"{settings.constraint}-lr{settings.coef_lr:g}-{args.steps}-seed{seed}"
                path = args.out / target / f"{key}.json"
                if path.exists():
                    run = json.loads(path.read_text())
                else:
                    run = probe_run(arch, task, sources, settings, seed, runtime)
                    atomic_write_json(path, run)
                    end = run["curve"][-1]
                    console.print(
                        f"{target} {key}: val loss {end['val_loss']:.4f} "
                        f"F1 {end['val_macro_f1']:.3f} ({run['seconds']:.0f} s)"
                    )
                collected[target]["runs"][key] = run
    return collected


def summarise(
    collected: dict[str, Any], budgets: Sequence[int], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Per target, setting and budget, mean over seeds: the selected epoch's validation
    macro-F1 and loss, and the validation loss at the end of the budget."""
    rows = []
    for target, data in collected.items():
        for setting in _settings(data):
            runs = [data["runs"][f"{setting}-seed{s}"] for s in seeds]
            for budget in budgets:
                points = [at_budget(r["curve"], budget) for r in runs]
                rows.append(
                    {
                        "target": target,
                        "setting": setting,
                        "budget": budget,
                        "val_macro_f1": float(np.mean([p["val_macro_f1"] for p in points])),
                        "val_loss": float(np.mean([p["val_loss"] for p in points])),
                        "end_loss": float(np.mean([p["end_loss"] for p in points])),
                        "movement_q50": float(np.mean([r["movement_q50"] for r in runs])),
                    }
                )
    return rows


def _settings(data: dict[str, Any]) -> list[str]:
    return sorted({k.rsplit("-seed", 1)[0] for k in data["runs"]})


def plot_curves(collected: dict[str, Any], path: Path, default: str, default_steps: int) -> None:
    """Validation loss (top) and macro-F1 (bottom) against probe steps, mean over seeds."""
    from medmerge_core.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, len(collected), figsize=(6.5 * len(collected), 7.5), squeeze=False)
    for column, (target, data) in enumerate(collected.items()):
        for setting in _settings(data):
            if not setting.startswith("none-") and setting != default:
                continue
            runs = [v for k, v in data["runs"].items() if k.startswith(setting + "-seed")]
            steps = [c["step"] for c in runs[0]["curve"]]
            width = 2.4 if setting == default else 1.0
            for row, metric in enumerate(("val_loss", "val_macro_f1")):
                values = np.mean([[c[metric] for c in r["curve"]] for r in runs], axis=0)
                axes[row][column].plot(steps, values, lw=width, label=setting)
        for row, label in enumerate(("validation loss", "validation macro-F1")):
            ax = axes[row][column]
            ax.axvline(default_steps, color="gray", ls="--", lw=0.8)
            ax.set_xlabel("probe optimiser steps")
            ax.set_ylabel(f"{label} (mean over seeds)")
            ax.set_title(target)
            ax.legend(fontsize=7)
    fig.suptitle("MedMerge probe by coefficient learning rate (dashed: default budget)")
    save_figure(fig, path)


def departure_sentence(collected: dict[str, Any]) -> str:
    """One sentence: how this sweep departs from the MedMerge paper's probe."""
    return (
        "**A proxy study, not a reproduction.** The paper trains its probe with AdamW at lr "
        "1e-4 for 50 epochs on 224x224 images with DenseNet-121 / ResNet-50 sources (ImageNet-1K "
        "and HAM10K, EyePACS or CheXpert) and reports no sweep; this one chooses the coefficient "
        "rate, step budget and constraint on the validation splits of "
        + " and ".join(collected)
        + " at 28x28, with the small sources named above each table."
    )


def results_section(
    rows: list[dict[str, Any]], collected: dict[str, Any], args: argparse.Namespace, figure: str
) -> str:
    lines = [
        "## Proxy study: probe settings sweep (validation only)",
        "",
        departure_sentence(collected),
        "",
        f"Command: `{args.command}`",
        "",
        "BN and head at lr 1e-3 (weight decay 0.01), batch 32, coefficients without weight "
        f"decay; seeds {', '.join(map(str, args.seeds))}. Each cell: validation macro-F1 / "
        "loss of the epoch the probe keeps (best validation macro-F1 within the budget), then "
        "the validation loss at the end of the budget; mean over seeds. Last column: median "
        f"|w - 0.5| over all kernels after the {args.steps}-step probe. No test data is used.",
        "",
    ]
    for target, data in collected.items():
        lines += [f"**{target}** ({data['text']}; {len(data['runs'])} probes)", ""]
        header = ["setting", *(f"{b} steps" for b in args.budgets), "median move"]
        table = []
        for setting in _settings(data):
            mine = [r for r in rows if r["target"] == target and r["setting"] == setting]
            cells = [
                f"{r['val_macro_f1']:.3f} / {r['val_loss']:.3f} ({r['end_loss']:.3f})" for r in mine
            ]
            cells.append(f"{mine[-1]['movement_q50']:.3f}")
            table.append([setting, *cells])
        lines += [markdown_table(header, table), ""]
    lines += [*choose(rows, collected, args), "", f"![validation curves]({figure})", ""]
    return "\n".join(lines)


def _mean_curve(runs: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        {"step": points[0]["step"], "val_loss": float(np.mean([p["val_loss"] for p in points]))}
        for points in zip(*(r["curve"] for r in runs), strict=True)
    ]


def choose(
    rows: list[dict[str, Any]], collected: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    """The stated rule, applied: at the default budget, drop the unconstrained rates whose mean
    validation loss has risen past LOSS_RISE x its minimum on any target (overfitting or
    instability), then take the best mean validation macro-F1 over the targets."""
    budget, lines = args.default_steps, []
    candidates: dict[str, float] = {}
    for setting in sorted({r["setting"] for r in rows}):
        mine = [r for r in rows if r["setting"] == setting and r["budget"] == budget]
        rises = []
        for _target, data in collected.items():
            runs = [v for k, v in data["runs"].items() if k.startswith(setting + "-seed")]
            curve = _mean_curve(runs)
            rises.append(at_budget_loss(curve, budget) / min(c["val_loss"] for c in curve))
        f1 = float(np.mean([r["val_macro_f1"] for r in mine]))
        verdict = "kept" if max(rises) <= LOSS_RISE else "dropped (loss rose)"
        lines.append(
            f"- {setting}: validation loss at {budget} steps / its minimum = "
            + ", ".join(f"{v:.2f}" for v in rises)
            + f" ({', '.join(collected)}); mean validation macro-F1 {f1:.3f}; {verdict}"
        )
        if setting.startswith("none-") and max(rises) <= LOSS_RISE:
            candidates[setting] = f1
    best = max(candidates, key=candidates.__getitem__) if candidates else "none"
    header = [
        f"Rule (set after looking at the curves; the {LOSS_RISE:g}x threshold is a judgment): at "
        f"{budget} steps, drop a rate whose mean "
        f"validation loss exceeds {LOSS_RISE:g}x its minimum on either target, then take the "
        f"highest mean validation macro-F1 over both targets; a constraint becomes the default "
        f"only if it beats that. Chosen: **{best}** at {budget} steps.",
        "",
    ]
    return header + lines + ["", *levelling(collected, best, budget)]


def levelling(collected: dict[str, Any], setting: str, budget: int) -> list[str]:
    """Where the chosen probe's mean validation loss bottoms out, per target."""
    lines = []
    for target, data in collected.items():
        runs = [v for k, v in data["runs"].items() if k.startswith(setting + "-seed")]
        if not runs:
            continue
        curve = _mean_curve(runs)
        low = min(curve, key=lambda c: c["val_loss"])
        lines.append(
            f"- {setting} on {target}: lowest mean validation loss {low['val_loss']:.3f} at step "
            f"{low['step']}; {at_budget_loss(curve, budget):.3f} at {budget}; "
            f"{curve[-1]['val_loss']:.3f} at {curve[-1]['step']}"
        )
    return lines


def at_budget_loss(curve: Sequence[dict[str, float]], budget: int) -> float:
    within = [c for c in curve if c["step"] <= budget] or list(curve[:1])
    return within[-1]["val_loss"]


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/medmnist"))
    parser.add_argument("--out", type=Path, default=Path("runs/probe_sweep"))
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--coef-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--budgets", nargs="+", type=int, default=[50, 100, 200, 300, 600])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("RESULTS.md"))
    parser.add_argument("--figure", type=Path, default=Path("results/probe_sweep.png"))
    parser.add_argument("--default", default="none-lr0.01-600", help="setting drawn bold")
    parser.add_argument("--default-steps", type=int, default=300)
    args = parser.parse_args(argv)
    args.command = command_text("simulations.probe_sweep", argv)
    set_threads(args.threads)
    console = Console()
    collected = run_sweep(args, console)
    rows = summarise(collected, args.budgets, args.seeds)
    table = Table(title="probe sweep: validation loss / macro-F1")
    for column in ("target", "setting", "budget", "val F1", "val loss", "end loss", "moved"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["target"],
            r["setting"],
            str(r["budget"]),
            f"{r['val_macro_f1']:.3f}",
            f"{r['val_loss']:.4f}",
            f"{r['end_loss']:.4f}",
            f"{r['movement_q50']:.3f}",
        )
    console.print(table)
    plot_curves(collected, args.figure, args.default, args.default_steps)
    figure = relative(args.figure, args.results)
    update_section(args.results, "probe-sweep", results_section(rows, collected, args, figure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
