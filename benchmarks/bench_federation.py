"""Federation benchmark: overhead vs one process, bytes per round, and the fp16 option.

1. `--bytes`: bytes on the wire per fine-tuning round (server -> sites and back, one model per
   site each way, plus the evaluation broadcast) for ResNet-18 and DenseNet-121, fp32 vs fp16.
2. `--overhead`: the same collect / merge / fine-tune work (a) through the federation on an
   in-process Grid (message packing, fp16, screening, FedAvg, InMerge, checkpoints) and (b) as
   plain function calls in one process; prints the ratio.
   `--simulation` adds (c): the same run through Flower's own simulation engine (`flwr run`
   against a local simulation SuperLink: Ray, one virtual node per role, `--sim-cpus` CPUs per
   ClientApp: 1 as in docs/federation.md runs two at a time on one thread each; 2 runs one at a time
   on both cores, as (b) does; several values run side by side), timed from
   `flwr run` to the run's end, with a table of where the extra time goes (start-up,
   collect, merge, fine-tune, shut-down: (b)'s phases against (c)'s, read off the
   ServerApp's streamed log). Ray runs its workers at niceness 15, so any other job on the
   machine slows (c) more than (a) and (b): measure on an idle machine.
3. `--fp16`: final test metrics of the same run with fp32 and fp16 weights on the wire.
4. `--probe-modes`: the default simulation (`flwr run`) with the coordinator's probe and with
   the federated probe (`probe-mode = "federated"`), interleaved: wall time, merge phase, bytes
   per probe round.
5. `--privacy`: the per-round cost of DP-FedAvg (`dp = "server"`, noise 1) and of SecAgg+
   (`secagg = true`, alone and with client-side DP; docs/secure-aggregation.md) as ratios to
   plain FedAvg, the same run on the in-process Grid side by side (interleaved, medians), the
   MB the sites upload per round, and the epsilon each reports. In process there is no
   ClientApp start per message, so SecAgg+'s three extra exchanges cost less here than over
   the network (tests/test_secagg_network.py).
Every federated run prints the kernels InMerge merged on each round's aggregate.

Usage: python benchmarks/bench_federation.py [--bytes] [--overhead [--simulation]] [--fp16]
       [--privacy] [--probe-modes]
       [--sim-cpus C [C ...]] [--out DIR] [--rounds R] [--n-train N] [--repeats K]
       (defaults 2, 200, 1; val/test are 2/5 and 3/5 of N)
       `--rounds 3 --n-train 400` is the pyproject's default simulation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from rich.console import Console
from rich.table import Table

from client.client_app import app as client_app
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.roles import Node
from medmerge_core.federation.transport import ModelInfo, compress, model_reference, transport_keys
from medmerge_core.models import build_model
from server.server_app import run_federation

# benchmarks/ and simulations/ are not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.flower_simulation import PHASES, simulated
from simulations.inprocess import InProcessGrid

SIM_NODES = [{"partition-id": i, "num-partitions": 6} for i in range(6)]


def bytes_per_round() -> None:
    print(f"{'arch':14} {'params':>10} {'fp32 MB/round':>14} {'fp16 MB/round':>14}  (3 sites)")
    for arch in ("resnet18", "densenet121"):
        model = build_model(arch, 3, 1)
        meta, _, norm = model_reference(ModelInfo(arch, 3, 1))
        keys = transport_keys(meta, norm, fedbn=False)
        state = {k: v for k, v in model.state_dict().items() if k in keys}
        row = []
        for fp16 in (False, True):
            one = ArrayRecord(compress(state, fp16)).count_bytes()
            row.append(3 * one * 3 / 2**20)  # train down + train up + evaluate down, 3 sites
        params = sum(p.numel() for p in model.parameters())
        print(f"{arch:14} {params:>10,} {row[0]:>14.1f} {row[1]:>14.1f}")


def one_process(run_config: dict) -> tuple[float, dict[str, float]]:
    """The federation's work as direct calls: 2 backbones, 1 merge, R rounds x 3 sites.

    Returns (seconds, seconds per phase)."""
    began = time.perf_counter()
    nodes = [Node.from_configs(n, run_config) for n in SIM_NODES]
    sources = [n.backbone()[0] for n in nodes if n.settings.role == "institution"]
    collected = time.perf_counter()
    coordinator = next(n for n in nodes if n.settings.role == "coordinator")
    state, info, _, _ = coordinator.merge(sources, ["a", "b"])
    merged = time.perf_counter()
    sites = [n for n in nodes if n.settings.role == "site"]
    for server_round in range(1, FederationConfig.from_run_config(run_config).rounds + 1):
        updates = [s.train(state, info, server_round, None) for s in sites]
        total = sum(n for _, n, _ in updates)
        state = {
            k: sum(u[k].double() * n / total for u, n, _ in updates).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in state.items()
        }
        for s in sites:
            s.evaluate(state, info, None)
    end = time.perf_counter()
    phases = {
        "start-up": 0.0,
        "collect": collected - began,
        "merge": merged - collected,
        "fine-tune": end - merged,
        "shut-down": 0.0,
    }
    return end - began, phases


def federated(run_config: dict) -> tuple[float, dict, dict[str, float]]:
    began = time.perf_counter()
    history = run_federation(InProcessGrid(client_app, SIM_NODES, run_config), run_config)
    seconds = time.perf_counter() - began
    print(f"InMerge kernels merged per round: {[h.get('inmerge_kernels') for h in history]}")
    return seconds, history[-1], {"rounds": [h["seconds"] for h in history]}


SECURE = {"secagg": True, "min-sites": 3, "min-cosine": -1.0, "outlier-factor": float("inf")}
PRIVACY_VARIANTS: dict[str, dict] = {
    "FedAvg": {},
    "DP-FedAvg": {"dp": "server", "dp-noise-multiplier": 1.0},
    "SecAgg+": SECURE,
    "SecAgg+ DP": {
        **SECURE,
        "dp": "client",
        "dp-noise-multiplier": 1.0,
        "secagg-clipping-range": 1.0,
    },
}


def privacy_cost(small: dict, repeats: int) -> None:
    """Seconds and MB uploaded per fine-tuning round with DP-FedAvg and SecAgg+ against plain
    FedAvg, interleaved in a rotating order; medians over the rounds of every repeat."""
    names = list(PRIVACY_VARIANTS)
    rounds: dict[str, list[float]] = {k: [] for k in names}
    up: dict[str, float] = {}
    for repeat in range(repeats):
        for kind in names[repeat % len(names) :] + names[: repeat % len(names)]:
            name = f"privacy-{kind.replace(' ', '-').replace('+', '')}-{repeat}"
            _, record, timing = federated({**small, **PRIVACY_VARIANTS[kind], "run-name": name})
            rounds[kind] += timing["rounds"]
            up[kind] = record["bytes_train_up"] / 2**20
            print(f"repeat {repeat}: {kind} rounds {timing['rounds']}, epsilon "
                  f"{record.get('dp_epsilon', '-')}")  # fmt: skip
    table = Table(title="Privacy per fine-tuning round (median seconds; ratio to FedAvg)")
    for column in ("mode", "seconds", "ratio", "MB up"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    plain = statistics.median(rounds["FedAvg"])
    for kind in names:
        seconds = statistics.median(rounds[kind])
        table.add_row(kind, f"{seconds:.2f}", f"{seconds / plain:.3f}", f"{up[kind]:.1f}")
    Console().print(table)


def probe_mode_cost(small: dict, repeats: int, out: Path, cpus: int) -> None:
    """The default simulation with the coordinator's probe and with the federated probe,
    interleaved: wall time from `flwr run` to the end, the merge phase, and bytes."""
    modes = ("coordinator", "federated")
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    merge: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(repeats):
        for mode in modes[repeat % 2 :] + modes[: repeat % 2]:
            name = f"mode-{mode}-{repeat}"
            config = {**small, "run-name": name, "probe-mode": mode}
            took, record, phases = simulated(config, out / f"flwr-{name}", cpus)
            seconds[mode].append(took)
            merge[mode].append(phases["merge"])
            lines = (out / name / "metrics.jsonl").read_text().splitlines()
            probe = [json.loads(x) for x in lines if '"probe-round"' in x]
            sent = [f"{r['mbytes']:.2f}" for r in probe]
            print(f"repeat {repeat}: {mode} {took:.1f} s (merge {phases['merge']:.1f} s), "
                  f"last round test accuracy {record['eval_accuracy']:.4f}"
                  + (f", MB per probe round {sent}" if sent else ""))  # fmt: skip
    base, fed = (statistics.median(seconds[m]) for m in modes)
    print(
        f"simulation, {cpus} CPU/ClientApp (median of {repeats}): coordinator {base:.1f} s "
        f"(merge {statistics.median(merge['coordinator']):.1f} s), federated {fed:.1f} s "
        f"(merge {statistics.median(merge['federated']):.1f} s), ratio {fed / base:.2f}x"
    )


Timing = tuple[float, dict, dict[str, float]]  # seconds, last round's record, seconds per phase


def _one_process(small: dict, name: str) -> Timing:
    seconds, phases = one_process({**small, "run-name": name})
    return seconds, {}, phases


def overhead(
    small: dict, repeats: int, sim_cpus: list[int], out: Path, last: dict[bool, dict]
) -> None:
    """Median over interleaved repeats (the order rotates) of each variant / one process, and
    where the simulation's extra time goes, phase by phase."""
    variants: dict[str, Callable[[str], Timing]] = {
        "one process": lambda name: _one_process(small, name),
        "in-process grid": lambda name: federated({**small, "run-name": name}),
    }
    for cpus in sim_cpus:
        variants[f"simulation, {cpus} CPU/ClientApp"] = lambda name, cpus=cpus: simulated(
            {**small, "run-name": name}, out / f"flwr-{name}", cpus
        )
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for repeat in range(repeats):
        names = list(variants)
        for kind in names[repeat % len(names) :] + names[: repeat % len(names)]:
            took, record, split = variants[kind](f"{''.join(filter(str.isalnum, kind))}-{repeat}")
            seconds[kind].append(took)
            if split and "rounds" not in split:
                phases[kind].append(split)
            accuracy = f", last round test accuracy {record['eval_accuracy']:.4f}" if record else ""
            print(f"repeat {repeat}: {kind} {took:.1f} s{accuracy}")
            if kind == "in-process grid":  # the fp32 reference of --fp16
                last.setdefault(False, record)
    base = seconds.pop("one process")
    print(f"one process: median {statistics.median(base):.1f} s over {repeats} repeat(s)")
    for kind, times in seconds.items():
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        print(
            f"{kind}: median {statistics.median(times):.1f} s, ratio to one process "
            f"{statistics.median(ratios):.2f}x (target <= 1.3x)"
        )
    if sim_cpus:
        _phase_table(phases)


def _phase_table(phases: dict[str, list[dict[str, float]]]) -> None:
    """Median seconds per phase; the simulations' are read off their streamed logs (0.5 s
    steps), so each column's extra time over one process is visible phase by phase."""
    table = Table(title="Where the time goes (median seconds per phase over repeats)")
    table.add_column("phase")
    timed = {kind: runs for kind, runs in phases.items() if runs}
    for kind in timed:
        table.add_column(kind, justify="right")
    for phase in PHASES:
        medians = [statistics.median(run[phase] for run in runs) for runs in timed.values()]
        base = medians[0]  # one process
        table.add_row(phase, f"{base:.1f}", *(f"{m:.1f} ({m - base:+.1f})" for m in medians[1:]))
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--simulation", action="store_true", help="with --overhead: flwr run")
    parser.add_argument(
        "--sim-cpus",
        type=int,
        nargs="+",
        default=[1],
        help="CPUs per ClientApp; several values run side by side (docs/federation.md: 1)",
    )
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--privacy", action="store_true", help="DP-FedAvg / FedAvg per round")
    parser.add_argument(
        "--probe-modes",
        action="store_true",
        help="the simulation with probe-mode coordinator vs federated (first --sim-cpus)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=200, help="synthetic train images")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved, order rotating")
    args = parser.parse_args()
    everything = not (args.bytes or args.overhead or args.fp16 or args.privacy or args.probe_modes)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_federation_"))
    small = {
        "output-dir": str(out),
        "rounds": args.rounds,
        "synthetic-n-train": args.n_train,
        "synthetic-n-val": args.n_train * 2 // 5,
        "synthetic-n-test": args.n_train * 3 // 5,
    }
    if args.bytes or everything:
        bytes_per_round()
    last: dict[bool, dict] = {}  # fp16 -> the last round's record
    if args.overhead or everything:
        overhead(small, args.repeats, args.sim_cpus if args.simulation else [], out, last)
    if args.privacy or everything:
        privacy_cost(small, max(args.repeats, 3))
    if args.probe_modes:
        probe_mode_cost(small, args.repeats, out, args.sim_cpus[0])
    if args.fp16 or everything:
        for fp16 in (False, True):
            if fp16 not in last:  # the fp32 run is the overhead run when that was measured
                last[fp16] = federated({**small, "run-name": f"fp16-{fp16}", "fp16": fp16})[1]
            rec = last[fp16]
            print(
                f"fp16={fp16!s:5}  MB/round {rec['mbytes']:.1f}  test acc "
                f"{rec['eval_accuracy']:.4f}  macro-F1 {rec['eval_macro_f1']:.4f}  "
                f"AUROC {rec['eval_auroc']:.4f}"
            )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
