"""InMerge overhead benchmark: does merging before every step stay within 5% of a training step?

(a) Training-step time (forward + backward + AdamW) with ``inmerge_`` (p=0.3) applied before
    each step vs. without, on ResNet-50 and DenseNet-121. The two variants run interleaved (order
    alternating per repeat) on two identical models so drift and noise hit both; the reported
    figure is the median of the per-repeat time ratios (target: <= 1.05). The last column times
    ``inmerge_`` alone in the same repeats (1 + apply / plain step): steadier on a busy machine.
(b) One ``inmerge_`` application on ResNet-50 vs. one forward pass (eval, no_grad), median ratio.

On CUDA the step uses AMP (bf16 autocast) and channels_last. Random-init weights (no download).
Run: ``python benchmarks/bench_inmerge.py [--size 64 --batch 16 --device cpu --repeats 7]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmerge_core.inmerge import inmerge_
from medmerge_core.settings import InMergeSettings


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet50,densenet121", help="comma-separated")
    ap.add_argument("--size", type=int, default=64, help="input height = width")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per variant")
    ap.add_argument("--steps", type=int, default=3, help="training steps per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--p", type=float, default=0.3)
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch default). 1 gives steadier CPU numbers on a busy\n"
        "machine, where multi-threaded ops stall on OpenMP barriers",
    )
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(name: str, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _make_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: InMergeSettings | None,
    generator: torch.Generator,
) -> Callable[[], None]:
    """One training step; InMerge first when ``config`` is given (as a training loop would)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    cuda = x.device.type == "cuda"

    def step() -> None:
        if config is not None:
            inmerge_(model, config, generator)
        opt.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def _time(fn: Callable[[], object], n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def bench_train_step(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[float, float, float, float]:
    """Median s/step (plain, with InMerge), median per-repeat ratio, and 1 + InMerge alone / step.

    The last figure times ``inmerge_`` by itself in the same repeats; on a noisy machine it is a
    steadier estimate of the overhead than the difference of two whole-step timings.
    """
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    config = InMergeSettings(rule="absolute", p=args.p, tau=args.tau)
    gen = torch.Generator().manual_seed(args.seed)
    merged_model = _build(name, device, args.seed)
    plain = _make_step(_build(name, device, args.seed), x, y, None, torch.Generator())
    merged = _make_step(merged_model, x, y, config, gen)

    def apply_only() -> None:
        inmerge_(merged_model, config, gen)

    for fn in (plain, merged, apply_only):
        _time(fn, args.warmup, device)
    t_plain, t_merged, t_apply = [], [], []
    for rep in range(args.repeats):
        order = (plain, merged, apply_only) if rep % 2 == 0 else (apply_only, merged, plain)
        times = {id(fn): _time(fn, args.steps, device) for fn in order}
        t_plain.append(times[id(plain)])
        t_merged.append(times[id(merged)])
        t_apply.append(times[id(apply_only)])
    ratios = [m / p for m, p in zip(t_merged, t_plain, strict=True)]
    direct = [1.0 + a / p for a, p in zip(t_apply, t_plain, strict=True)]
    return (
        statistics.median(t_plain),
        statistics.median(t_merged),
        statistics.median(ratios),
        statistics.median(direct),
    )


def bench_apply_vs_forward(
    args: argparse.Namespace, device: torch.device
) -> tuple[float, float, float]:
    """Median seconds of one InMerge application and one forward pass, and their median ratio."""
    model = _build("resnet50", device, args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    config = InMergeSettings(rule="absolute", p=args.p, tau=args.tau)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def apply() -> None:
        model.train()
        inmerge_(model, config, gen)

    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast:
            model(x)

    _time(apply, args.warmup, device)
    _time(forward, args.warmup, device)
    t_apply, t_fwd, ratios = [], [], []
    for _ in range(args.repeats):
        t_apply.append(_time(apply, args.steps, device))
        t_fwd.append(_time(forward, args.steps, device))
        ratios.append(t_apply[-1] / t_fwd[-1])
    return statistics.median(t_apply), statistics.median(t_fwd), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=max(100, Console().width))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(
        f"device={device} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"load1={load:.1f} input={args.batch}x3x{args.size}x{args.size} "
        f"repeats={args.repeats} steps/repeat={args.steps} p={args.p} tau={args.tau}"
    )
    table = Table(title="InMerge overhead (medians over repeats)")
    for col in ("benchmark", "model", "baseline ms", "with InMerge ms", "ratio", "1+alone/step"):
        table.add_column(col, justify="left" if col in ("benchmark", "model") else "right")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t_plain, t_merged, ratio, direct = bench_train_step(name, args, device)
        verdict = "ok" if ratio <= 1.05 else "over 1.05"
        table.add_row(
            "train step fwd+bwd+AdamW",
            name,
            f"{t_plain * 1e3:.1f}",
            f"{t_merged * 1e3:.1f}",
            f"{ratio:.3f} ({verdict})",
            f"{direct:.3f}",
        )
    t_apply, t_fwd, ratio = bench_apply_vs_forward(args, device)
    table.add_row(
        "1 InMerge vs 1 forward",
        "resnet50",
        f"{t_fwd * 1e3:.1f} (fwd)",
        f"{t_apply * 1e3:.1f} (apply)",
        f"{ratio:.3f}",
        "-",
    )
    console.print(table)
    console.print(
        "target: train-step ratio <= 1.05 (overhead of 5% or less). Forward = eval, no_grad. "
        "1+alone/step = 1 + (InMerge alone) / (plain step), timed in the same repeats."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
