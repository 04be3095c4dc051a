"""A faithful proxy of MedMerge's premise: an ImageNet backbone merged with a related medical one.

    python -m simulations.faithful --design s1 --data-root ../shared/data/medmnist \
        --budget 0.05 --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/faithful

Source A is the real ImageNet EfficientNet-Lite0 (`imagenet:efficientnet_lite0`) at 64 px,
upsampled from MedMNIST's 28. Source B depends on the design:
- `s1`, same modality and pathology (the paper's CheXpert -> RSNA): PneumoniaMNIST's training
  images split once into two disjoint class-stratified halves; B is A fine-tuned on half 1
  (another hospital's pneumonia model, `--replicates` independent fine-tunings), the target's
  labelled pool is half 2 at `--budget`.
- `s2`, same modality, another task: OrganAMNIST (abdominal CT) split by class. B is A
  fine-tuned on six organs (`S2_SOURCE_ORGANS`, at most `S2_SOURCE_IMAGES` slices), the target
  classifies the other five (`S2_TARGET_ORGANS`), on a fixed class-stratified test subset of
  `S2_TEST_IMAGES`. Each side keeps one left/right pair, so B has learnt CT appearance and
  laterality but never a target organ.
- `negative`, the cross-modality control: B is A fine-tuned on BreastMNIST (ultrasound), the
  target as in s1.

Every seed draws its labelled images from half 2 and a validation set of the same fraction
(class-stratified, at least `VAL_FLOOR` per class) from the official validation split; the test
set is the official one. Each seed is one resumable `run_experiment` folder, its data written
beside it as a MedMNIST .npz, and seed s merges with replicate s mod `--replicates` of B. Every
method's FT rate is chosen on validation (`--ft-lrs`, with the paper's 1e-5); the probe's
coefficient rate is chosen once on pilot seeds' validation (`--coef-lrs`). Two processes with
disjoint `--seeds` may share one `--out`: each source and the pilot are made once, under a lock.
`simulations.faithful_report` collects and reports a design.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medmerge_core.data.base import TaskData
from medmerge_core.data.splits import label_budget_index
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import ExperimentConfig, ModelConfig
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.io import atomic_savez, atomic_write_json
from medmerge_core.models import load_source
from medmerge_core.pretrain import pretrain_source
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.train import FitOptions, Runtime
from simulations.common import load_medmnist_file, set_threads

ARCH, SOURCE_A = "efficientnet_lite0", "imagenet:efficientnet_lite0"
DESIGNS = ("s1", "s2", "negative")
S2_SOURCE_ORGANS = (0, 1, 2, 3, 4, 5)  # bladder, femur-left/right, heart, kidney-left/right
S2_TARGET_ORGANS = (6, 7, 8, 9, 10)  # liver, lung-left/right, pancreas, spleen
S2_SOURCE_IMAGES = 3000  # B's training slices (a cap that keeps a replicate to minutes)
S2_TEST_IMAGES = 2000  # of the target organs' 10,351 test slices: evaluation stays cheap
PIPELINES = ("ft", "lp_ft", "average_ft", "average_probe", "interpolate", "medmerge",
             "best_single", "ensemble")  # fmt: skip
VAL_FLOOR = 10  # validation images per class at least, whatever the budget
SPLIT_SEED = 0  # the two hospitals' halves of PneumoniaMNIST: fixed for the whole study
PILOT_SEEDS = (100, 101)  # the coefficient rate is chosen on these, never on a study seed


@dataclass(frozen=True)
class Protocol:
    """The settings every method of a design shares (LP and probe epochs as FT's: the same
    number of passes over the labelled images)."""

    budget: float
    image_size: int = 64
    epochs: int = 20
    lp_lr: float = 1e-3
    ft_lrs: tuple[float, ...] = (1e-4, 1e-5)
    coef_lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    source_epochs: int = 10
    source_lr: float = 3e-4
    batch_size: int = 32
    replicates: int = 3


def _stratified(labels: np.ndarray, fraction: float, seed: int, floor: int = 1) -> np.ndarray:
    """A class-stratified, seeded share of rows, at least `floor` per class."""
    keep = label_budget_index(labels, fraction, seed)
    extra = []
    for c in np.unique(labels):
        have = int((labels[keep] == c).sum())
        if have < floor:
            rest = np.setdiff1d(np.flatnonzero(labels == c), keep)
            extra.append(np.random.default_rng([seed, int(c)]).permutation(rest)[: floor - have])
    return np.sort(np.concatenate([keep, *extra])).astype(np.int64)


def halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST's training rows as two disjoint, class-stratified halves."""
    first = label_budget_index(labels, 0.5, SPLIT_SEED)
    return first, np.setdiff1d(np.arange(len(labels)), first)


def organs(task: TaskData, keep: Sequence[int]) -> TaskData:
    """The task restricted to the classes `keep`, relabelled 0..len(keep)-1 in that order."""
    remap = np.full(task.num_classes, -1, np.int64)
    remap[list(keep)] = np.arange(len(keep))
    parts = []
    for split in (task.train, task.val, task.test):
        part = split.subset(np.flatnonzero(remap[split.labels] >= 0))
        parts.append(type(part)(part.images, remap[part.labels], part.ids, part.groups))
    names = tuple(task.class_names[c] for c in keep)
    return TaskData(task.name, *parts, names)


def _npz(task: TaskData, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> dict:
    arrays = {}
    for split, rows in (("train", train), ("val", val), ("test", test)):
        part = getattr(task, split)
        arrays[f"{split}_images"] = part.images[rows]
        arrays[f"{split}_labels"] = part.labels[rows].reshape(-1, 1).astype(np.uint8)
    return arrays


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One process at a time makes `path` (a source, the pilot), the other then reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


class Study:
    """One design's folders under `out/<design>-labels<budget>`: data, sources, pilot, seeds."""

    def __init__(self, design: str, data_root: Path, out: Path, protocol: Protocol) -> None:
        if design not in DESIGNS:
            raise InputError(f"--design: unknown '{design}'; expected one of {DESIGNS}")
        self.design, self.data_root, self.p = design, data_root, protocol
        self.root = out / f"{design}-labels{protocol.budget:g}"
        self.pneumonia = load_medmnist_file(data_root, "pneumoniamnist")

    def target(self) -> tuple[TaskData, np.ndarray, np.ndarray]:
        """The target task, its labelled pool (train rows) and its test rows."""
        if self.design != "s2":
            task = self.pneumonia
            return task, halves(task.train.labels)[1], np.arange(len(task.test))
        task = organs(load_medmnist_file(self.data_root, "organamnist"), S2_TARGET_ORGANS)
        test = label_budget_index(task.test.labels, S2_TEST_IMAGES, SPLIT_SEED)
        return task, np.arange(len(task.train)), test

    # -- sources ---------------------------------------------------------------------------

    def source_b(self, replicate: int, console: Console) -> Path:
        """Replicate `replicate` of Source B (made once, under a lock): A fine-tuned."""
        path = self.root / "sources" / f"B{replicate}.pt"
        with locked(path):
            record = path.with_suffix(".json")
            if record.exists():
                return path
            if self.design == "s1":
                task, rows = self.pneumonia, halves(self.pneumonia.train.labels)[0]
                what = "PneumoniaMNIST half 1"
            elif self.design == "s2":
                task = organs(load_medmnist_file(self.data_root, "organamnist"), S2_SOURCE_ORGANS)
                share = S2_SOURCE_IMAGES / len(task.train)
                rows, what = label_budget_index(task.train.labels, share, SPLIT_SEED), (
                    f"OrganAMNIST organs {list(S2_SOURCE_ORGANS)}")  # fmt: skip
            else:
                task = load_medmnist_file(self.data_root, "breastmnist")
                rows, what = np.arange(len(task.train)), "BreastMNIST (cross-modality)"
            # B's own validation: a tenth of its images, never the target's validation set
            held = _stratified(task.train.labels[rows], 0.1, 1000 + replicate)
            train = np.setdiff1d(np.arange(len(rows)), held)
            own = TaskData(task.name, task.train.subset(rows[train]), task.train.subset(
                rows[held]), task.test, task.class_names).resized(self.p.image_size)  # fmt: skip
            console.print(f"[bold]source B{replicate}[/]: A fine-tuned on {what} "
                          f"({len(own.train)} train, {len(own.val)} val)")  # fmt: skip
            start = time.perf_counter()
            metrics = pretrain_source(
                ARCH, own, path, StageSettings(self.p.source_epochs, self.p.source_lr),
                Runtime.detect("auto"), init=load_source(SOURCE_A, ARCH, own.in_channels),
                batch_size=self.p.batch_size, seed=replicate, init_spec=SOURCE_A,
                data_spec={"dataset": what, "train": len(own.train)},
                options=FitOptions(show_progress=False),
            )  # fmt: skip
            atomic_write_json(record, {"what": what, "train": len(own.train),
                                       "seconds": time.perf_counter() - start,
                                       "test": metrics})  # fmt: skip
        return path

    # -- the target ------------------------------------------------------------------------

    def target_file(self, seed: int) -> Path:
        """The seed's target as a MedMNIST .npz: its labelled share of half 2, a validation
        set of the same fraction (at least VAL_FLOOR per class), the official test set."""
        name = "organs_target" if self.design == "s2" else "pneumoniamnist"
        path = self.root / "data" / f"seed{seed}" / f"{name}.npz"
        if path.exists():
            return path
        task, pool, test = self.target()
        train = pool[_stratified(task.train.labels[pool], self.p.budget, seed)]
        val = _stratified(task.val.labels, self.p.budget, seed, VAL_FLOOR)
        atomic_savez(path, _npz(task, train, val, test))
        return path

    def config(self, name: str, seed: int, sources: dict[str, str], pipelines: Sequence[str],
               coef_lr: float, *, ft_epochs: int | None = None) -> ExperimentConfig:  # fmt: skip
        p = self.p
        return ExperimentConfig(
            name=name,
            output_dir=str(self.root),
            data={"format": "medmnist", "path": str(self.target_file(seed).resolve())},
            sources=sources,
            model=ModelConfig(arch=ARCH, image_size=p.image_size),
            pipelines=list(pipelines),
            seed=seed,
            batch_size=p.batch_size,
            lp=StageSettings(p.epochs, p.lp_lr),
            merge=ProbeSettings(coef_lr=coef_lr, epochs=p.epochs),
            ft=StageSettings(ft_epochs or p.epochs, p.ft_lrs[0]),
            ft_lr_choices=[] if ft_epochs else list(p.ft_lrs),
        )

    def coef_lr(self, console: Console) -> float:
        """The probe's coefficient rate with the best mean validation macro-F1 after the probe,
        on the pilot seeds (with B0), chosen once and kept in pilot.json."""
        record = self.root / "pilot.json"
        with locked(record):
            if record.exists():
                return float(json.loads(record.read_text(encoding="utf-8"))["coef_lr"])
            sources = {"a": SOURCE_A, "b": str(self.source_b(0, console))}
            scores: dict[str, list[float]] = {}
            for lr in self.p.coef_lrs:
                for seed in PILOT_SEEDS:
                    config = self.config(f"pilot-lr{lr:g}-seed{seed}", seed, sources,
                                         ["medmerge"], lr, ft_epochs=1)  # fmt: skip
                    results = run_experiment(config, show_progress=False)
                    val = results["medmerge"]["stages"]["probe"]["val"]["macro_f1"]
                    scores.setdefault(f"{lr:g}", []).append(val)
            means = {lr: float(np.mean(v)) for lr, v in scores.items()}
            chosen = max(means, key=means.get)
            atomic_write_json(record, {"coef_lr": float(chosen), "val_macro_f1": scores,
                                       "seeds": list(PILOT_SEEDS)})  # fmt: skip
            console.print(f"coefficient rate {chosen} (validation macro-F1 {means})")
            return float(chosen)

    def run_seed(self, seed: int, coef_lr: float, console: Console) -> dict[str, Any]:
        replicate = seed % self.p.replicates
        sources = {"a": SOURCE_A, "b": str(self.source_b(replicate, console))}
        console.print(f"[bold]{self.design}[/] seed {seed} (B{replicate})")
        start = time.perf_counter()
        config = self.config(f"seed{seed}", seed, sources, PIPELINES, coef_lr)
        folder = ExperimentRun.of(config).dir
        resumed = (folder / "metrics.jsonl").exists()  # a later run times only what was left
        results = run_experiment(config, show_progress=False)
        timing = folder / "wall_seconds.json"
        if not timing.exists():
            atomic_write_json(timing, {"seconds": time.perf_counter() - start,
                                       "replicate": replicate, "resumed": resumed})  # fmt: skip
        return results


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.faithful",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--design", choices=DESIGNS, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/faithful"))
    parser.add_argument("--budget", type=float, default=0.05, help="fraction of half 2 labelled")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--replicates", type=int, default=3, help="Source B fine-tunings")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20, help="LP, probe and FT epochs")
    parser.add_argument("--ft-lrs", type=float, nargs="+", default=[1e-4, 1e-5])
    parser.add_argument("--coef-lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--source-epochs", type=int, default=10, help="Source B's fine-tuning")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget: expected a fraction in (0, 1], got {args.budget}")
    if args.replicates < 1:
        parser.error("--replicates: at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    console = Console()
    protocol = Protocol(args.budget, args.image_size, args.epochs, ft_lrs=tuple(args.ft_lrs),
                        coef_lrs=tuple(args.coef_lrs), source_epochs=args.source_epochs,
                        replicates=args.replicates)  # fmt: skip
    if pilot := sorted(set(args.seeds) & set(PILOT_SEEDS)):
        console.print(
            f"[red]error:[/] --seeds: {pilot} are pilot seeds (they choose the coefficient rate)"
        )
        return 2
    try:
        study = Study(args.design, args.data_root, args.out, protocol)
        for replicate in dict.fromkeys(seed % args.replicates for seed in args.seeds):
            study.source_b(replicate, console)  # first, so two processes make two at once
        coef_lr = study.coef_lr(console)
        for seed in args.seeds:
            study.run_seed(seed, coef_lr, console)
    except InputError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
