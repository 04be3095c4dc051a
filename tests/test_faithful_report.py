"""The faithful study's report collects finished seeds into one file and renders from it alone."""

from __future__ import annotations

import json

import numpy as np

from medmerge_core.io import atomic_savez, atomic_write_json
from simulations import faithful, faithful_report

TRAINED = ["ft:a", "ft:b", "lp_ft:a", "lp_ft:b", "average_ft", "average_probe", "interpolate",
           "medmerge"]  # fmt: skip


def fake_seed(folder, seed: int, accuracy: dict[str, float]) -> None:
    """A finished seed as run_experiment leaves it: results.json and test predictions."""
    rng = np.random.default_rng(seed)
    labels = np.arange(120) % 2
    results = {}
    for method in TRAINED:
        right = rng.random(len(labels)) < accuracy.get(method, 0.7)
        predicted = np.where(right, labels, 1 - labels)
        probs = np.eye(2, dtype=np.float32)[predicted] * 0.8 + 0.1
        atomic_savez(folder / "predictions" / f"{method.replace(':', '_')}.npz",
                     {"probabilities": probs, "labels": labels})  # fmt: skip
        f1 = float(np.mean(right))
        stages = {"ft": {"val": {"macro_f1": f1}, "steps": 80, "steps_all_rates": 160, "lr": 1e-4}}
        if method != "ft:a" and method != "ft:b" and method != "average_ft":
            stages["before_ft"] = {"val": {"macro_f1": 0.6}, "test": {"macro_f1": 0.5}}
        results[method] = {"test": {"macro_f1": f1, "accuracy": f1}, "stages": stages}
    best = max(("ft:a", "ft:b"), key=lambda m: results[m]["stages"]["ft"]["val"]["macro_f1"])
    results["best_single"] = {**results[best], "chosen": best, "derived": True}
    results["ensemble"] = {"test": {"macro_f1": 0.7, "accuracy": 0.7}, "stages": {},
                           "members": ["ft:a", "ft:b"], "derived": True}  # fmt: skip
    atomic_write_json(folder / "results.json", results)
    atomic_write_json(folder / "wall_seconds.json", {"seconds": 480.0, "replicate": seed % 3})


def test_collect_then_render_from_the_collection_alone(tmp_path) -> None:
    root = tmp_path / "runs" / "s1-labels0.05"
    for seed in range(10):
        fake_seed(root / f"seed{seed}", seed, {"medmerge": 0.9, "average_probe": 0.9})
    (root / "seed10").mkdir()  # an unfinished seed is left out
    atomic_write_json(root / "seed3" / "wall_seconds.json",  # timed only what was left
                      {"seconds": 60.0, "replicate": 0, "resumed": True})  # fmt: skip
    atomic_write_json(root / "sources" / "B0.json", {"what": "x", "train": 10, "seconds": 60,
                      "test": {"accuracy": 0.8, "macro_f1": 0.7}})  # fmt: skip
    out, results, report = tmp_path / "runs", tmp_path / "results", tmp_path / "R.md"
    args = ["--design", "s1", "--out", str(out), "--command", "cmd",
            "--collected", str(results), "--results", str(report)]  # fmt: skip
    assert faithful_report.main(args) == 0
    collected = json.loads((tmp_path / "results/s1-labels0.05.json").read_text())
    assert sorted(collected["seeds"], key=int) == [str(s) for s in range(10)]
    assert len(collected["seeds"]["0"]["methods"]["medmerge"]["predicted"]) == 120
    first = (tmp_path / "R.md").read_text()
    # MedMerge (right 90% of the time) against FT a (70%): a verdict the data decide
    row = next(line for line in first.splitlines() if line.startswith("| MedMerge - FT a |"))
    assert ", better" in row
    row = next(line for line in first.splitlines() if line.startswith("| MedMerge - Avg-probe"))
    assert ", better" not in row and ", worse" not in row
    assert "10 seeds" in first and "FT ensemble (reference)" in first and "cmd" in first
    wall = "8.0 (8.0-8.0) minutes (median, min-max; left out, resumed after an interruption: seed 3"
    assert wall in first
    # the collection alone renders the same section
    import shutil

    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "R.md").unlink()
    assert faithful_report.main([*args, "--report-only"]) == 0
    assert (tmp_path / "R.md").read_text() == first
    assert faithful.PIPELINES[-2:] == ("best_single", "ensemble")


def test_seeds_of_another_day_pool_only_with_the_same_source_replicates(tmp_path) -> None:
    root = tmp_path / "runs" / "s1-labels0.05"
    record = {"what": "x", "train": 10, "seconds": 60, "test": {"accuracy": 0.8, "macro_f1": 0.7}}
    fake_seed(root / "seed0", 0, {})
    fake_seed(root / "seed1", 1, {})
    atomic_write_json(root / "sources" / "B0.json", record)
    args = ["--design", "s1", "--out", str(tmp_path / "runs"), "--collected",
            str(tmp_path / "c"), "--results", str(tmp_path / "R.md")]  # fmt: skip
    assert faithful_report.main(args) == 0
    import shutil

    shutil.rmtree(tmp_path / "runs")  # another day: seed 2 on a re-made, identical B0
    fake_seed(root / "seed2", 2, {})
    atomic_write_json(root / "sources" / "B0.json", {**record, "seconds": 70})
    assert faithful_report.main(args) == 0
    path = tmp_path / "c" / "s1-labels0.05.json"
    assert sorted(json.loads(path.read_text())["seeds"]) == ["0", "1", "2"]
    before = path.read_text()
    fake_seed(root / "seed3", 3, {})  # a B0 that is another model: refused, nothing written
    atomic_write_json(root / "sources" / "B0.json", {**record, "test": {"accuracy": 0.5}})
    assert faithful_report.main(args) == 2
    assert path.read_text() == before
