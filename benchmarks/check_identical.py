"""Are two checkouts' results bit-identical? For refactors that must not change a result.

Run in each checkout (same machine, same thread count), then compare the two reports:

    OMP_NUM_THREADS=1 python benchmarks/check_identical.py run /tmp/before   # in the old tree
    OMP_NUM_THREADS=1 python benchmarks/check_identical.py run /tmp/after    # in the new tree
    python benchmarks/check_identical.py compare /tmp/before /tmp/after

`run` executes the full `medmerge demo` and a fixed-seed in-process federation (ShuffleNet at
16x16, 2 rounds, a 20-step probe, InMerge with the paper's absolute rule) and writes a SHA-256
of every checkpoint's tensors plus the demo's test metrics to OUT/report.json.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = {
    "arch": "shufflenet_v2_x0_5", "image-size": 16, "synthetic-n-train": 32,
    "synthetic-n-val": 16, "synthetic-n-test": 16, "rounds": 2, "probe-steps": 20,
    "min-sites": 2, "inmerge-rule": "absolute", "inmerge-tau": -1.0, "batch-size": 16,
}  # fmt: skip
NODES = [
    {"role": "institution", "checkpoint": "random:1", "name": "a"},
    {"role": "institution", "checkpoint": "random:2", "name": "b"},
    {"role": "coordinator", "data": "synthetic:target", "shard": "0/3"},
    {"role": "site", "data": "synthetic:target", "shard": "1/3", "name": "s1"},
    {"role": "site", "data": "synthetic:target", "shard": "2/3", "name": "s2"},
]


def digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a checkpoint's tensors, key by key."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    sha = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        sha.update(key.encode())
        if torch.is_tensor(value):
            sha.update(value.contiguous().numpy().tobytes())
        else:
            sha.update(repr(value).encode())
    return sha.hexdigest()[:16]


def run(out: Path) -> None:
    sys.path.insert(0, str(ROOT))  # simulations/ is not installed
    from client.client_app import app as client_app
    from server.server_app import run_federation
    from simulations.inprocess import InProcessGrid

    out.mkdir(parents=True, exist_ok=True)
    config = {**RUN_CONFIG, "output-dir": str(out / "fed")}
    history = run_federation(InProcessGrid(client_app, NODES, config), config)
    demo = [sys.executable, "-m", "medmerge_core.cli", "demo", "--out", str(out / "demo"),
            "--no-progress"]  # fmt: skip
    subprocess.run(demo, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "demo" / "target" / "results.json").read_text())
    checkpoints = sorted([*(out / "fed").rglob("*.pt"), *(out / "demo").rglob("checkpoints/*.pt")])
    report = {
        "federation_history": [{k: v for k, v in r.items() if k != "seconds"} for r in history],
        "demo_test_metrics": {method: r["test"] for method, r in results.items()},
        "checkpoints": {str(p.relative_to(out)): digest(p) for p in checkpoints},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"wrote {out / 'report.json'}")


def compare(first: Path, second: Path) -> int:
    a, b = (json.loads((p / "report.json").read_text()) for p in (first, second))
    differ = [key for key in ("demo_test_metrics", "federation_history") if a[key] != b[key]]
    files = sorted(set(a["checkpoints"]) | set(b["checkpoints"]))
    differ += [f for f in files if a["checkpoints"].get(f) != b["checkpoints"].get(f)]
    print(
        f"{len(files)} checkpoints compared; "
        + ("identical" if not differ else f"differ: {differ}")
    )
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
