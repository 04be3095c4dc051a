"""The InMerge proxy study: the public code's settings as stated, and a report that collects the
finished seeds, pairs every corrupted copy with its clean image, and re-renders from its file."""

from __future__ import annotations

import json
import shutil

import numpy as np

from medmerge_core.io import atomic_write_json
from medmerge_core.settings import InMergeSettings
from simulations import faithful_inmerge as study
from simulations import faithful_inmerge_runs as inmerge_runs

CONDITIONS = ["clean", *(f"{c}/{s}" for c in ("blur", "noise") for s in (1, 2))]


def test_the_public_settings_merge_only_in_the_phase_after_normal_training() -> None:
    public = inmerge_runs.variant_settings("public", epochs=20)
    assert (public.p, public.rule, public.tau, public.alpha) == (0.3, "absolute", 0.3, 0.8)
    assert public.skip_layers == 10 and public.start_epoch == 20
    assert inmerge_runs.variant_settings("quantile", 20) == InMergeSettings()
    assert inmerge_runs.variant_settings("baseline", 20) is None


def fake_seed(root, seed: int, right: dict[str, float]) -> None:
    """A seed as run_seed leaves it: each variant's results.json and conditions.json."""
    rng = np.random.default_rng(seed)
    labels = np.arange(80) % 2
    for variant in inmerge_runs.VARIANTS:
        folder = root / f"{variant}-seed{seed}"
        predicted = {}
        for key in CONDITIONS:
            hit = rng.random(len(labels)) < right[variant] - (0.1 if "/" in key else 0)
            predicted[key] = "".join(str(int(p)) for p in np.where(hit, labels, 1 - labels))
        # one FT rate (--ft-lrs 1e-4) is no choice, so the run records no "lr"
        ft = {"best_epoch": 25 if variant == "public" else 5, "val": {"macro_f1": 0.7}, "steps": 90}
        atomic_write_json(folder / "results.json", {inmerge_runs.METHOD: {"stages": {"ft": ft}}})
        merged = None if variant == "baseline" else f"{seed} of 50 drawn kernels in 40 layers"
        atomic_write_json(folder / "conditions.json", {"predicted": predicted, "merged": merged,
                          "labels": "".join(str(int(t)) for t in labels)})  # fmt: skip
    atomic_write_json(root / f"wall_seconds-seed{seed}.json", {"seconds": 300.0})


def test_collect_compares_each_variant_on_clean_and_corrupted_images(tmp_path, monkeypatch) -> None:
    root = tmp_path / "runs" / "inmerge-labels0.05"
    for seed in range(10):
        fake_seed(root, seed, {"baseline": 0.7, "public": 0.7, "quantile": 0.95})
    (root / "baseline-seed10").mkdir()  # an unfinished seed is left out
    activity = {"public": "0 of 9 drawn kernels in 40 layers", "quantile": "1 of 9 drawn"}
    monkeypatch.setattr(study, "source_activity", lambda: activity)
    results, report = tmp_path / "results", tmp_path / "R.md"
    args = ["--report", "--out", str(tmp_path / "runs"), "--collected", str(results),
            "--results", str(report), "--command", "cmd", "--ft-lrs", "1e-4"]  # fmt: skip
    assert study.main(args) == 0
    collected = json.loads((results / "inmerge-labels0.05.json").read_text())
    assert sorted(collected["seeds"], key=int) == [str(s) for s in range(10)]
    found = study.comparisons(collected, n_boot=300)
    assert set(found) == {(v, c) for v in ("public", "quantile") for c in ("clean", "corrupted")}
    assert found[("quantile", "corrupted")].verdict == "better"
    assert found[("public", "clean")].verdict != "better"
    # corrupted copies are resampled with their image: the interval is not 4 copies narrower
    clean_se = found[("quantile", "clean")].bootstrap.standard_error
    assert found[("quantile", "corrupted")].bootstrap.standard_error > 0.3 * clean_se
    first = report.read_text()
    assert "| public | " in first and "10/10" in first and "0-9 of 50 drawn kernels" in first
    assert "cmd" in first and "10 seeds" in first and "| 0.0001: 10 |" in first
    shutil.rmtree(tmp_path / "runs")
    report.unlink()
    assert study.main([*args[1:], "--report-only"]) == 0
    assert report.read_text() == first


def test_a_report_needs_two_finished_seeds(tmp_path, capsys) -> None:
    fake_seed(
        tmp_path / "runs" / "inmerge-labels0.05", 0, dict.fromkeys(inmerge_runs.VARIANTS, 0.7)
    )
    args = ["--report", "--out", str(tmp_path / "runs"), "--collected", str(tmp_path / "c"),
            "--results", str(tmp_path / "R.md")]  # fmt: skip
    assert study.main(args) == 2
    assert "2 finished seeds" in capsys.readouterr().out and not (tmp_path / "c").exists()


def test_seeds_collected_earlier_are_kept_and_a_changed_protocol_is_refused(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(study, "source_activity", lambda: {"public": "x", "quantile": "y"})
    runs = tmp_path / "runs" / "inmerge-labels0.05"
    for seed in (0, 1):
        fake_seed(runs, seed, dict.fromkeys(inmerge_runs.VARIANTS, 0.7))
    args = ["--report", "--out", str(tmp_path / "runs"), "--collected", str(tmp_path / "c"),
            "--results", str(tmp_path / "R.md")]  # fmt: skip
    assert study.main(args) == 0
    shutil.rmtree(runs)  # another day: only seed 2's runs are on this machine
    fake_seed(runs, 2, dict.fromkeys(inmerge_runs.VARIANTS, 0.7))
    assert study.main(args) == 0
    collected = json.loads((tmp_path / "c" / "inmerge-labels0.05.json").read_text())
    assert sorted(collected["seeds"]) == ["0", "1", "2"]
    assert study.main([*args, "--phase-epochs", "5"]) == 2
    assert json.loads((tmp_path / "c" / "inmerge-labels0.05.json").read_text()) == collected
