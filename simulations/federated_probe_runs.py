"""The federated probe study's settings and runs, apart from its report: one federation a run."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from client.client_app import app as client_app
from medmerge_core.errors import InputError
from medmerge_core.io import read_jsonl
from medmerge_core.settings import StageSettings
from server.server_app import run_federation
from simulations.inprocess import InProcessGrid
from simulations.study import StudySettings, prepare_sources

PARTITIONS = ("iid", "dirichlet")
SOURCE_B = "pretrain:pneumoniamnist@A"


@dataclass(frozen=True)
class FederatedProbeSettings:
    """The study's settings; the probe and fine-tuning ones are the run config's."""

    data_root: Path
    out: Path = Path("runs/federated_probe")
    results: Path = Path("RESULTS.md")
    target: str = "breastmnist"
    arch: str = "cifar_resnet56"
    source_a: str | None = None  # None: the arch's CIFAR-10 weights (`natural_source`)
    image_size: int = 28
    sites: int = 3
    alpha: float = 0.5  # Dirichlet concentration of the label-skewed partition
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    partitions: tuple[str, ...] = PARTITIONS
    # The probe: every learner (a coordinator, or each site of the federated probe, over
    # `probe_rounds` rounds) gets `probe_steps` steps, as one coordinator would.
    probe_steps: int = 300
    probe_rounds: int = 10
    probe_lr: float = 1e-3  # the probe's BN/head rate (probe-lr in the run config)
    probe_coef_lr: float = 1e-2
    rounds: int = 10  # federated fine-tuning rounds, ft.epochs local epochs each
    # Every site is honest here: direction screening off (-1). At 3 sites its default (0)
    # rejected honest replies whose cosine to the others' median update was -0.02 to -0.08.
    min_cosine: float = -1.0
    ft: StageSettings = field(default_factory=lambda: StageSettings(1, 1e-4))
    source: StageSettings = field(default_factory=lambda: StageSettings(5, 1e-3))  # pretraining
    source_train: int | None = None  # cap on Source B's training images
    batch_size: int = 32
    threads: int = 1
    report_only: bool = False
    argv: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = [p for p in self.partitions if p not in PARTITIONS]
        if bad:
            raise InputError(f"--partitions: unknown '{bad[0]}'; expected {PARTITIONS}")
        if self.sites < 2:
            raise InputError(f"--sites: need at least 2, got {self.sites}")

    @property
    def source_a_spec(self) -> str:
        return self.source_a or natural_source(self.arch)

    def run_dir(self, partition: str, condition: str, seed: int) -> Path:
        return self.out / f"{self.target}-{partition}-{condition}-seed{seed}"


def natural_source(arch: str) -> str:
    """The CIFAR-10 weights of a CIFAR ResNet (`cifar_resnet56` -> `cifar10:resnet56`)."""
    if not arch.startswith("cifar_resnet"):
        raise InputError(f"--arch: the study's Source A needs a CIFAR ResNet, got '{arch}'")
    return f"cifar10:{arch.removeprefix('cifar_')}"


def source_specs(s: FederatedProbeSettings, console: Console) -> dict[str, str]:
    """A and B as weights specs / checkpoint paths (B pretrained once, cached under --out)."""
    study = StudySettings(
        data_root=s.data_root,
        out=s.out,
        arch=s.arch,
        image_size=s.image_size,
        target=s.target,
        sources=(
            ("A", s.source_a_spec),
            ("B", SOURCE_B),
            ("C", "zeros"),
        ),  # fmt: skip  (C is not used)
        studies=("main",),
        source=s.source,
        source_train=s.source_train,
        batch_size=s.batch_size,
        report_only=s.report_only,
        progress=False,
    )
    info = prepare_sources(study, console)
    return {name: info[name]["spec"] for name in ("A", "B") if name in info}


def run_config(s: FederatedProbeSettings, partition: str, condition: str, seed: int) -> dict:
    folder = s.run_dir(partition, condition, seed)
    federated = condition == "federated"
    return {
        "output-dir": str(folder.parent),
        "run-name": folder.name,
        "arch": s.arch,
        "image-size": s.image_size,
        "seed": seed,
        "batch-size": s.batch_size,
        "label-skew": s.alpha if partition == "dirichlet" else 0.0,
        "probe-mode": "federated" if federated else "coordinator",
        "probe-rounds": s.probe_rounds,
        "probe-steps": s.probe_steps,
        "probe-lr": s.probe_lr,
        "probe-coef-lr": s.probe_coef_lr,
        "rounds": s.rounds,
        "ft-epochs": s.ft.epochs,
        "ft-lr": s.ft.lr,
        "ft-weight-decay": s.ft.weight_decay,
        "min-sites": 1,
        "min-cosine": s.min_cosine,
    }


def node_configs(
    s: FederatedProbeSettings, condition: str, sources: dict[str, str], folder: Path
) -> list[dict[str, Any]]:
    data = str((s.data_root / f"{s.target}.npz").resolve())
    disk = {"state-dir": str(folder / "site-state"), "audit-dir": str(folder / "audit")}
    nodes: list[dict[str, Any]] = [
        {"role": "institution", "name": name, "checkpoint": spec, **disk}
        for name, spec in sources.items()
    ]
    if condition != "federated":
        shard = {"shard": f"0/{s.sites}"} if condition == "coordinator-share" else {}
        nodes.append({"role": "coordinator", "data": data, **shard, **disk})
    nodes += [
        {"role": "site", "name": f"site-{i}", "data": data, "shard": f"{i}/{s.sites}", **disk}
        for i in range(s.sites)
    ]
    return nodes


def final_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    finals = [r for r in read_jsonl(path) if r.get("phase") == "final"]
    return finals[-1] if finals else None


def run_one(
    s: FederatedProbeSettings, partition: str, condition: str, seed: int, sources: dict[str, str]
) -> dict[str, Any] | None:
    folder = s.run_dir(partition, condition, seed)
    done = final_record(folder)
    if done is not None or s.report_only:
        return done
    shared = s.run_dir(PARTITIONS[0], condition, seed)
    if condition == "coordinator-all" and partition != PARTITIONS[0] and shared.exists():
        # The same merge (all the data, the same seed): reuse it; only fine-tuning differs.
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("sources.pt", "merged.pt", "coefficients.npz", "coefficient_summary.json"):
            if (shared / name).exists() and not (folder / name).exists():
                shutil.copy2(shared / name, folder / name)
    rc = run_config(s, partition, condition, seed)
    run_federation(InProcessGrid(client_app, node_configs(s, condition, sources, folder), rc), rc)
    return final_record(folder)


def merge_record(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.jsonl"
    merges = [r for r in read_jsonl(path) if r.get("phase") == "merge"] if path.exists() else []
    return merges[-1] if merges else {}
