"""Disk traffic of `medmerge demo`: bytes written while it runs and bytes it leaves behind.

    python benchmarks/bench_disk.py [--baseline OTHER_CHECKOUT] [--repeats K] [--quick]

Runs the demo in a fresh process per run, with this checkout (and, side by side, interleaved,
another checkout such as a `git worktree` of an older commit) first on `sys.path`, and reads the
process's own counters from /proc/self/io when it exits: `wchar` (every byte passed to write(),
what the run asks of the disk; `write_bytes` is what reached the device so far and depends on
when the kernel flushes) and the bytes left in the output folder. Prints the medians and the
ratio to the baseline. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import json, runpy, sys
sys.path.insert(0, {root!r})
sys.argv = ["medmerge", "demo", "--out", {out!r}, "--no-progress", *{extra!r}]
try:
    runpy.run_module("medmerge_core.cli", run_name="__main__")
finally:
    with open("/proc/self/io") as f:
        counters = dict(line.split(": ") for line in f.read().splitlines())
    print("IO " + json.dumps({{k: int(v) for k, v in counters.items()}}), file=sys.stderr)
"""


def demo_traffic(checkout: Path, out: Path, quick: bool) -> dict[str, float]:
    code = WRAPPER.format(root=str(checkout), out=str(out), extra=["--quick"] if quick else [])
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - began
    lines = [line for line in proc.stderr.splitlines() if line.startswith("IO ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"demo in {checkout} failed:\n{proc.stderr[-3000:]}")
    io = json.loads(lines[-1][3:])
    left = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"written": io["wchar"], "device": io["write_bytes"], "left": left, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the demo's tiny smoke version")
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT}
    if args.baseline is not None:
        checkouts = {"baseline": args.baseline.resolve(), **checkouts}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="bench_disk_") as scratch:
        for repeat in range(args.repeats):
            names = list(checkouts)
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                out = Path(scratch) / f"{name.replace(' ', '_')}-{repeat}"
                result = demo_traffic(checkouts[name], out, args.quick)
                runs[name].append(result)
                print(f"repeat {repeat}: {name}: " + ", ".join(
                    f"{k} {v / 2**20:.1f} MB" if k != "seconds" else f"{v:.1f} s"
                    for k, v in result.items()))  # fmt: skip
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    for name, m in medians.items():
        print(
            f"{name}: written {m['written'] / 2**20:.1f} MB (reached the device "
            f"{m['device'] / 2**20:.1f} MB), left {m['left'] / 2**20:.1f} MB, {m['seconds']:.1f} s"
        )
    if "baseline" in medians:
        base, now = medians["baseline"], medians["this checkout"]
        print(
            f"ratio to baseline: written {now['written'] / base['written']:.3f} (target <= 0.1), "
            f"left {now['left'] / base['left']:.3f}"
        )


if __name__ == "__main__":
    main()
