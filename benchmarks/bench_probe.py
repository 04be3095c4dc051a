"""MedMerge probe step vs full fine-tuning step, cached vs uncached LP epoch, and how far the
default probe budget moves the coefficients on the synthetic target.

Ratios are measured side by side in one process: the variants are interleaved, each repeat
times several steps, and the median over repeats is reported (this machine is noisy). Every step
timed is `train.fit`'s own (`train.TrainStep`, finite checks included) on one fixed batch; the
probe step is the real one: its own AdamW groups (coefficients at their rate, no decay) and, for
`probe+clamp`, the simplex projection after each step.

    python benchmarks/bench_probe.py                 # CPU targets from the core issue
    python benchmarks/bench_probe.py --gpu           # adds DenseNet-121 @224 b64 on CUDA
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.batches import TensorBatches, extract_features
from medmerge_core.data.base import ArraySplit, BatchLoader
from medmerge_core.data.synthetic import make_task
from medmerge_core.experiment.demo import DemoSettings, pretrain_demo_sources
from medmerge_core.merge import MergedModel
from medmerge_core.models import build_model, load_source, split_head
from medmerge_core.probe import learn_merge
from medmerge_core.settings import DEFAULT_COEF_LR, DEFAULT_STEPS, ProbeSettings
from medmerge_core.train import FitOptions, Runtime, TrainStep, task_loss, trainable_parameters


def make_step(
    model: torch.nn.Module,
    runtime: Runtime,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: list[dict] | None = None,
    after_step: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """`fit`'s own step (`TrainStep`) on one batch already on the device, with AdamW over
    `groups` (by default every parameter that requires grad), so the timing is fit's step."""
    params = groups or [{"params": trainable_parameters(model)}]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    train_step = TrainStep(model, optimizer, runtime.grad_scaler(), runtime, after_step=after_step)
    x, y = runtime.inputs(x), y.to(runtime.device)

    def step() -> None:
        train_step(x, y, 0, 0)

    return step


def timed(fn: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def interleaved(
    fns: dict[str, Callable[[], None]], steps: int, repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up (allocator, cudnn autotune)
        timed(fn, 2, sync)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            times[name].append(timed(fns[name], steps, sync))
    return times


def probe_vs_ft(
    arch: str, size: int, batch: int, runtime: Runtime, steps: int, repeats: int
) -> tuple[dict[str, list[float]], float]:
    torch.manual_seed(0)
    sources = [load_source(f"random:{s}", arch, 3) for s in (1, 2)]
    ft_model = runtime.model(build_model(arch, 2, 3))
    probes = {
        name: runtime.model(MergedModel(build_model(arch, 2, 3), sources, constraint=constraint))
        for name, constraint in (("probe", "none"), ("probe+clamp", "clamp"))
    }
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    steps_by_name = {"ft": make_step(ft_model.train(), runtime, x, y)}
    for name, model in probes.items():
        groups = model.parameter_groups(DEFAULT_COEF_LR, 1e-4, 0.01)
        steps_by_name[name] = make_step(model.train(), runtime, x, y, groups, model.project_)
    times = interleaved(steps_by_name, steps, repeats, sync)
    ratios = {
        name: statistics.median(p / f for p, f in zip(times[name], times["ft"], strict=True))
        for name in probes
    }
    return times, ratios


def default_budget_movement(out: Path, runtime: Runtime) -> dict[str, float]:
    """|w - 0.5| over all kernels after the default probe on the demo's synthetic target."""
    settings = DemoSettings()
    generic, related = pretrain_demo_sources(out, settings, runtime, show_progress=False)
    sources = [load_source(str(p), settings.arch, 1) for p in (generic, related)]
    task = make_task("target", image_size=settings.image_size, seed=0)
    torch.manual_seed(0)
    learned = learn_merge(
        build_model(settings.arch, task.num_classes, 1),
        sources,
        ["generic", "related"],
        BatchLoader(task.train, 32, shuffle=True),
        BatchLoader(task.val, 256),
        ProbeSettings(),
        settings.lp.lr,
        0.01,
        runtime,
        options=FitOptions(name="medmerge probe", show_progress=False),
    )
    moved = np.concatenate([np.abs(c[0] - 0.5).ravel() for c in learned.coefficients.values()])
    return {
        "q50": float(np.median(moved)),
        "q90": float(np.quantile(moved, 0.9)),
        "max": float(moved.max()),
        "old_cap": settings.lp.lr * settings.lp.epochs * len(BatchLoader(task.train, 32)),
    }


def cached_vs_uncached_lp(size: int, n: int, repeats: int) -> tuple[float, float, float]:
    """One LP epoch on cached features vs one LP epoch through the frozen backbone."""
    runtime = Runtime.detect("cpu")
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1)
    backbone, head = split_head(model)
    backbone.eval()
    rng = np.random.default_rng(0)
    split = ArraySplit(rng.integers(0, 255, (n, size, size), dtype=np.uint8), np.arange(n) % 2)
    loader = BatchLoader(split, 32, shuffle=True)
    feats, labels = extract_features(backbone, BatchLoader(split, 128), runtime)
    cached = TensorBatches(feats, labels, 32, shuffle=True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)

    def epoch(batches, through_backbone: bool) -> None:
        for x, y in batches:
            if through_backbone:
                with torch.no_grad():
                    x = backbone(x)
            loss = task_loss(head(x), y, False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    times = interleaved(
        {"uncached": lambda: epoch(loader, True), "cached": lambda: epoch(cached, False)},
        1,
        repeats,
        lambda: None,
    )
    ratio = statistics.median(
        c / u for c, u in zip(times["cached"], times["uncached"], strict=True)
    )
    return statistics.median(times["uncached"]), statistics.median(times["cached"]), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA benchmarks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sources", type=Path, default=Path("runs/bench_probe/sources"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title="MedMerge probe step / full fine-tuning step (median of interleaved runs)")
    for column in (
        "device",
        "model",
        "input",
        "batch",
        "FT ms/step",
        "probe ms/step",
        "probe/FT",
        "probe+clamp/FT",
        "target",
    ):
        table.add_column(column, justify="right")
    cases = [("cpu", "resnet18", 64, 64, 1.10), ("cpu", "densenet121", 64, 32, 1.10)]
    if args.gpu and torch.cuda.is_available():
        cases.append(("cuda", "densenet121", 224, 64, 1.05))
    for device, arch, size, batch, target in cases:
        runtime = Runtime.detect(device)
        times, ratios = probe_vs_ft(arch, size, batch, runtime, args.steps, args.repeats)
        ratio = max(ratios.values())
        ft_ms = statistics.median(times["ft"]) * 1e3
        table.add_row(
            device,
            arch,
            f"{size}x{size}",
            str(batch),
            f"{ft_ms:.1f}",
            f"{statistics.median(times['probe']) * 1e3:.1f}",
            f"{ratios['probe']:.3f}",
            f"{ratios['probe+clamp']:.3f}",
            f"<= {target} {'ok' if ratio <= target else 'MISSED'}",
        )
        if device == "cuda":
            console.print(
                f"CUDA FT throughput {arch} @{size} b{batch} (AMP {runtime.amp_dtype}, "
                f"channels_last): {batch / (ft_ms / 1e3):.0f} img/s (target >= 2000 on H100)"
            )
    console.print(table)
    uncached, cached, ratio = cached_vs_uncached_lp(64, 512, max(3, args.repeats // 2))
    lp = Table(title="LP epoch (ResNet-18, 512 images 64x64, CPU): cached features vs uncached")
    for column in ("uncached s", "cached s", "cached/uncached", "target"):
        lp.add_column(column, justify="right")
    lp.add_row(
        f"{uncached:.3f}",
        f"{cached:.4f}",
        f"{ratio:.4f}",
        f"<= 0.1 {'ok' if ratio <= 0.1 else 'MISSED'}",
    )
    console.print(lp)
    moved = default_budget_movement(args.sources, Runtime.detect("cpu"))
    console.print(
        f"Default probe ({DEFAULT_STEPS} steps, coefficient lr {DEFAULT_COEF_LR:g}) on the "
        f"synthetic target: |w - 0.5| median {moved['q50']:.3f}, 90th percentile "
        f"{moved['q90']:.3f}, max {moved['max']:.3f}; the old budget (the demo's LP epochs x "
        f"steps x LP lr) capped it at about {moved['old_cap']:.3f}."
    )


if __name__ == "__main__":
    main()
