"""What gpu_check's sections share (targets, sizes, budget, record), so none imports the script."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = 1
SECTIONS = ("gpu_tests", "probe_ratio", "ft_throughput", "demo", "federation")
PROBE_ARCHS = ("resnet18", "densenet121")
PROBE_TARGET = 1.05  # probe step / FT step, the worse of probe and probe+clamp
FT_TARGET = 2000.0  # DenseNet-121 FT img/s at 224 on H100/H200 (timm: 914 on an RTX 3090)
# The paper's comparison, which the demo runs from its two sources.
DEMO_METHODS = (
    "ft:generic",
    "ft:related",
    "lp_ft:generic",
    "lp_ft:related",
    "average_ft",
    "medmerge",
)
SIM_GPUS = 0.5  # client-resources-num-gpus: two ClientApps share the GPU
SIM_CPUS = 2


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one run: the lent GPU's or the CPU smoke run's.

    `needs`: seconds a section is expected to take (it is skipped when less is left);
    `caps`: the most a subprocess section may run before it is stopped."""

    device: str
    probe_size: int
    probe_batch: int
    probe_steps: int
    probe_repeats: int
    ft_size: int
    ft_batch: int
    ft_steps: int
    ft_repeats: int
    simulate: bool
    needs: dict[str, float]
    caps: dict[str, float]


GPU_PLAN = Plan(
    device="cuda",
    probe_size=224,
    probe_batch=64,
    probe_steps=5,
    probe_repeats=5,
    ft_size=224,
    ft_batch=256,
    ft_steps=4,
    ft_repeats=5,
    simulate=True,
    needs={"gpu_tests": 60, "probe_ratio": 40, "ft_throughput": 30, "demo": 45, "federation": 90},
    caps={"gpu_tests": 200, "federation": 240},
)
SMOKE_PLAN = Plan(
    device="cpu",
    probe_size=32,
    probe_batch=4,
    probe_steps=1,
    probe_repeats=1,
    ft_size=32,
    ft_batch=4,
    ft_steps=1,
    ft_repeats=1,
    simulate=False,
    needs={name: 1 for name in SECTIONS},
    caps={"gpu_tests": 120, "federation": 400},  # the simulation only with --simulate
)


@dataclass
class Context:
    out: Path
    plan: Plan
    smoke: bool
    deadline: float  # time.monotonic() at which the budget ends

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, section: str) -> float:
        """Seconds a subprocess of `section` may run: its cap, or what is left of the budget."""
        return max(1.0, min(self.plan.caps[section], self.left()))

    @property
    def sync(self) -> Callable[[], None]:
        return torch.cuda.synchronize if self.plan.device == "cuda" else (lambda: None)

    def runtime(self):
        from medmerge_core.train import Runtime

        # CUDA: bf16 autocast (fp16 without bf16) + channels_last; CPU smoke: fp32.
        return Runtime.detect(self.plan.device)


@dataclass
class Section:
    """What a section found. `status` is derived from the targets unless set."""

    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # parts not run: why
    status: str | None = None
    reason: str | None = None

    def check(
        self, name: str, value: float | None, op: str, threshold: float, *, speed: bool = False
    ) -> None:
        """A target: `value op threshold` (op '<=', '>=' or '=='); None: not measured. A speed
        target (`speed`) is judged on CUDA only; any other is a check judged in smoke runs too."""
        compare = {"<=": float.__le__, ">=": float.__ge__, "==": float.__eq__}[op]
        ok = None if value is None else bool(compare(float(value), float(threshold)))
        self.targets.append(
            {
                "name": name,
                "kind": "speed" if speed else "check",
                "value": value,
                "target": f"{op} {threshold:g}",
                "pass": ok,
            }
        )

    def record(self, smoke: bool) -> dict[str, Any]:
        """The section's JSON record; in a smoke run speed targets are not judged (pass None)."""
        if smoke:
            for t in self.targets:
                if t["kind"] == "speed":
                    t["pass"] = None
        status, reason = self.status, self.reason
        missed = [t["name"] for t in self.targets if t["pass"] is False]
        unmeasured = [t["name"] for t in self.targets if t["pass"] is None and not smoke]
        if status is None and (missed or unmeasured):
            status = "fail"
            reason = reason or "; ".join(
                part
                for part in (
                    f"missed: {', '.join(missed)}" if missed else "",
                    f"not measured: {', '.join(unmeasured)}" if unmeasured else "",
                )
                if part
            )
        elif status is None and smoke:
            status = "smoke"
            reason = reason or (
                "smoke run on the CPU at tiny sizes: code path checked, speed targets not judged"
            )
        elif status is None:
            status = "pass"
        return {
            "status": status,
            "reason": reason,
            "figures": self.figures,
            "targets": self.targets,
            "skipped": self.skipped,
        }
