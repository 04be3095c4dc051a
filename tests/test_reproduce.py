"""Tiny end-to-end runs of the study drivers (issue 6 and issue 4 part 4) on generated data.

The real MedMNIST files are not needed: small .npz files in the official layout stand in for
them, so these tests run anywhere in well under a minute.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medmerge_core.errors import InputError
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.io import read_jsonl
from simulations import federated_probe, label_efficiency, reproduce, robustness, study
from simulations.common import median_range, paired_difference, update_section


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake breastmnist / pneumoniamnist .npz files: noise plus a bright square for class 1."""
    root = tmp_path_factory.mktemp("medmnist")
    rng = np.random.default_rng(0)
    for flag, sizes in (("breastmnist", (16, 8, 8)), ("pneumoniamnist", (16, 8, 8))):
        arrays = {}
        for split, n in zip(("train", "val", "test"), sizes, strict=True):
            labels = np.arange(n) % 2
            images = rng.integers(0, 120, (n, 28, 28)).astype(np.uint8)
            images[labels == 1, 8:20, 8:20] += 100
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
        np.savez(root / f"{flag}.npz", **arrays)
    return root


TINY = ["--arch", "shufflenet_v2_x0_5", "--image-size", "16", "--no-progress"]


def test_plan_covers_the_paper_ablations() -> None:
    specs = {spec.group: spec for spec in study.plan(study.STUDIES)}
    assert specs["main"].pipelines == ("ft", "lp_ft", "average_ft", "medmerge")
    assert specs["bn_frozen"].freeze_bn and not specs["main"].freeze_bn
    assert (specs["layer"].granularity, specs["parameter"].granularity) == ("layer", "parameter")
    assert specs["zeros_a"].sources == ("A", "zeros") and specs["zeros_b"].sources == ("B", "zeros")
    assert specs["three"].sources == ("A", "B", "C")
    settings = study.StudySettings(data_root=Path("data"), ablation_seeds=(0,))
    assert settings.seeds_for(specs["layer"]) == (0,)
    assert settings.seeds_for(specs["main"]) == (0, 1, 2, 3, 4)
    sources = {name: {"spec": name} for name in ("A", "B", "zeros")}
    config = study.make_config(settings, specs["bn_frozen"], 0, sources)
    assert config.merge.freeze_bn and config.pipelines == ["medmerge"]


def test_reproduce_tiny_end_to_end(data_root: Path, tmp_path: Path) -> None:
    """Main comparison and three sources (the ablations run the same MedMerge pipeline)."""
    results, figures = tmp_path / "RESULTS.md", tmp_path / "results"
    argv = [
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--figures",
        str(figures),
        *TINY,
        "--seeds",
        "0",
        "1",
        "--studies",
        "main",
        "three",
        "--lp-epochs",
        "1",
        "--ft-epochs",
        "1",
        "--merge-steps",
        "2",
        "--source-epochs",
        "1",
        "--synthetic-train",
        "16",
        "--synthetic-val",
        "8",
        "--lp-lr",
        "1e-3",
        "--source",
        "A=random:3",
        "--label-budget",
        "0.5",
    ]
    # --pipelines runs only MedMerge; the full command then adds the rest to the same folders.
    assert reproduce.main([*argv, "--pipelines", "medmerge"]) == 0
    run_root = tmp_path / "runs" / "breastmnist-shufflenet_v2_x0_5-16-labels0.5"
    assert set(ExperimentRun(run_root / "main-seed0").results()) == {"medmerge"}
    assert not (run_root / "source_c-seed0").exists()
    assert "Cost of the MedMerge probe" not in results.read_text()  # no LP-FT to compare with
    assert reproduce.main(argv) == 0
    assert len(ExperimentRun(run_root / "main-seed0").results()) == 6
    text = results.read_text()
    assert "<!-- reproduce-breastmnist-shufflenet_v2_x0_5-16-labels0.5:start -->" in text
    assert "stands in for ImageNet" in text and "python -m simulations.reproduce" in text
    assert "label budget of 0.5" in text and "weights from `random:3`" in text
    assert "pretrained on pneumoniamnist, from source A" in text
    assert "learning rates LP/probe 0.001" in text  # the deviation is stated
    split = run_root / "main-seed0" / "split.csv"
    assert split.read_text().count(",unused") == 8  # half of the 16 training labels
    for needle in (
        "FT A",
        "LP-FT B",
        "Avg+FT",
        "MedMerge",
        "A + B + C: MedMerge",
        "C alone: LP-FT C",
        "relative to LP",
        "Every run",
        "| MedMerge − Avg+FT | macro-F1 |",
        "| MedMerge A + B + C − MedMerge A + B | accuracy |",
        "Wilcoxon p",
        "| Holm p |",
        "Holm families: the main comparison (MedMerge against each of its 5 other methods)",
        "**A proxy study, not a reproduction.**",
        "(pediatric chest X-ray: a cross-modality source for this breast ultrasound target)",
    ):
        assert needle in text, needle
    for key in ("fig2_main", "fig2_ablations", "three_sources"):
        png = figures / f"breastmnist-shufflenet_v2_x0_5-16-labels0.5_{key}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"results/{png.name}" in text

    # With --report-only it rewrites the same tables, from what a repository keeps of a study:
    # without the sources' weights, their records still fill the sources table.
    for weights in (run_root / "sources").glob("*.pt"):
        weights.unlink()
    reproduce.main([*argv, "--report-only"])
    rendered = results.read_text()
    assert rendered.split("Every run")[1] == text.split("Every run")[1]
    assert rendered.split("Source pretraining")[0] == text.split("Source pretraining")[0]


def test_label_efficiency_tiny_end_to_end(data_root: Path, tmp_path: Path) -> None:
    results, figures = tmp_path / "RESULTS.md", tmp_path / "results"
    argv = [
        "--budgets",
        "0.5",
        "1.0",
        "--seeds-at",
        "0.5=0,1,2",
        "--",
        "--data-root",
        str(data_root),
        "--target",
        "pneumoniamnist",
        "--source",
        "B=pretrain:breastmnist@A",
        "--source",
        "A=random:1",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--figures",
        str(figures),
        *TINY,
        "--seeds",
        "0",
        "1",
        "--lp-epochs",
        "1",
        "--ft-epochs",
        "1",
        "--merge-steps",
        "2",
        "--source-epochs",
        "1",
    ]
    assert label_efficiency.main(argv) == 0
    text = results.read_text()
    assert "## Proxy study: label efficiency on pneumoniamnist" in text
    assert "| 0.5 (8 images) | 1 (16 images) |" in text
    assert re.search(r"\| FT A \| \S+ ± \S+ \(n=3\) \| \S+ ± \S+ \(n=2\) \|", text)
    assert "budget 0.5, MedMerge − LP-FT A:" in text
    assert "Holm families: one per budget" in text and "(0.5: 5, 1: 5 comparisons)" in text
    assert "The paper has no label-budget experiment" in text
    assert "(breast ultrasound: a cross-modality source for this pediatric chest X-ray" in text
    assert "too few seeds for an interval or a test" in text and "Wilcoxon p=" not in text
    assert "Test AUROC (threshold-free" in text
    assert "Class shares (normal / pneumonia) by split: train " in text
    assert "| test AUROC | test sensitivity normal | test sensitivity pneumonia |" in text
    assert "| 0.5 | 18 |" in text and "| 1 | 12 |" in text  # 6 methods x 3 and 2 seeds
    png = figures / "label_efficiency_pneumoniamnist-shufflenet_v2_x0_5-16.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "python -m simulations.label_efficiency" in text


def test_seeds_at_must_name_a_budget_and_integer_seeds(capsys: pytest.CaptureFixture) -> None:
    rest = ["--", "--data-root", "d"]
    _, _, seeds_at = label_efficiency.parse_args(
        ["--budgets", "0.5", "1.0", "--seeds-at", "1.0=3,4", *rest]
    )
    assert seeds_at == {1.0: (3, 4)}
    for bad in ("0.2=1", "0.5=a", "0.5", "0.5="):
        with pytest.raises(SystemExit):
            label_efficiency.parse_args(["--budgets", "0.5", "--seeds-at", bad, *rest])
        assert f"--seeds-at: expected BUDGET=SEED,... for a budget in --budgets, got '{bad}'" in (
            capsys.readouterr().err
        )


def test_generalisation_table_averages_every_run_of_a_budget() -> None:
    def run(val: float, test: float, auroc: float, sensitivities: tuple[float, float]) -> dict:
        per_class = {
            c: {"sensitivity": x} for c, x in zip(("no", "yes"), sensitivities, strict=True)
        }
        return {
            "stages": {"lp": {"val": {"macro_f1": 0.0}}, "ft": {"val": {"macro_f1": val}}},
            "test": {"macro_f1": test, "auroc": auroc},
            "clinical": {"classes": ["no", "yes"], "per_class": per_class},
        }

    curve = {
        0.5: {
            0: {"ft:A": run(0.8, 0.6, 0.7, (0.2, 1.0))},
            1: {"ft:A": run(0.9, 0.7, 0.9, (0.4, 0.8))},
        }
    }
    table = label_efficiency.generalisation_table(curve, ["no", "yes"])
    assert table.splitlines()[0].endswith("| test sensitivity no | test sensitivity yes |")
    assert table.splitlines()[2] == (
        "| 0.5 | 2 | 0.850 ± 0.050 | 0.650 ± 0.050 | 0.800 ± 0.100 "
        "| 0.300 ± 0.100 | 0.900 ± 0.100 |"
    )
    assert "| FT A | 0.800 ± 0.100 (n=2) |" in label_efficiency.method_table(
        curve, ["0.5"], "auroc"
    )


def test_source_specs_are_checked_and_ordered_by_init() -> None:
    settings = study.StudySettings(
        data_root=Path("data"),
        sources=(("C", "pretrain:synthetic:related_a@B"), ("B", "pretrain:x@A"), ("A", "w.pt")),
    )
    assert study.source_order(settings, {"C"}) == ["A", "B", "C"]
    assert study.describe_source("cifar10:resnet56").startswith("CIFAR-10-trained")
    assert study.describe_source("pretrain:synthetic:generic") == (
        "pretrained on synthetic `generic` task, from random init"
    )
    for sources, needle in (
        ((("A", "x"), ("B", "pretrain:y@B"), ("C", "z")), "@B must name another source"),
        ((("A", "x"), ("B", "y")), "give each of A, B, C once"),
    ):
        with pytest.raises(InputError, match=needle):
            study.StudySettings(data_root=Path("data"), sources=sources)
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data-root", "d", "--source", "D=x"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data-root", "d", "--label-budget", "1.5"])
    with pytest.raises(InputError, match="--pipelines: unknown"):
        study.StudySettings(data_root=Path("d"), pipelines=("medmerge", "fedavg"))
    parsed = reproduce.parse_args(["--data-root", "d", "--source", "A=cifar10:resnet20"])
    assert dict(parsed.sources)["A"] == "cifar10:resnet20" and parsed.tag.startswith("breast")


def test_robustness_tiny_end_to_end(data_root: Path, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    update_section(results, "other", "kept")  # another driver's section must survive
    argv = [
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        *TINY,
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--datasets",
        "breastmnist",
        "--max-train",
        "16",
        "--skip-layers",
        "0",
        "--tau",
        "-1",
    ]
    assert robustness.main(argv) == 0
    text = results.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    section = text.split("<!-- robustness:start -->")[1].split("<!-- robustness:end -->")[0]
    assert "python -m simulations.robustness" in section and "### breastmnist" in section
    assert "**A proxy study, not a reproduction.** The InMerge paper" in section
    for row in ("clean", "gaussian_noise/3", "blur/1", "contrast/2", "jpeg/3", "mean corrupted"):
        assert f"| {row} |" in section or f"| **{row}** |" in section, row
    # tau = -1 and no skipped layers: InMerge must have merged kernels, so it did something.
    assert " 0 of " not in section.split("at the initial weights")[0].split("merges")[-1]


def test_update_section_replaces_only_its_block(tmp_path: Path) -> None:
    path = tmp_path / "R.md"
    update_section(path, "a", "one")
    update_section(path, "b", "two")
    update_section(path, "a", "three")
    text = path.read_text()
    assert "three" in text and "one" not in text and "two" in text
    assert text.index("<!-- a:start -->") < text.index("<!-- b:start -->")


def test_paired_difference_and_median_range() -> None:
    assert paired_difference([0.5, 0.75, 1.0], [0.25, 1.0, 0.5]) == (
        "0.167 ± 0.312 (paired by seed; 2/3 seeds higher)"
    )
    assert median_range([3.0, 100.0, 5.0]) == "5.0 (3.0-100.0)"
    assert median_range([2.0]) == "2.0" and median_range([]) == "n/a"


def test_federated_probe_study_tiny_end_to_end(data_root: Path, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    argv = [
        "--data-root", str(data_root), "--out", str(tmp_path / "runs"), "--results", str(results),
        "--arch", "shufflenet_v2_x0_5", "--image-size", "16", "--source-a", "random:1",
        "--sites", "2",
        "--alpha", "5", "--seeds", "0", "1", "--probe-steps", "2", "--probe-rounds", "2",
        "--rounds", "1", "--source-epochs", "1",
    ]  # fmt: skip
    federated_probe.main(argv)
    text = results.read_text()
    title = "## Proxy study: federated merge learning on breastmnist (shufflenet_v2_x0_5, 16x16"
    assert title in text
    for partition in ("iid", "dirichlet"):
        for condition in federated_probe.CONDITIONS:
            assert f"| {partition} | {condition} | 2 |" in text
        assert f"| {partition} | federated - coordinator-all | macro-f1 |" in text
    assert "python -m simulations.federated_probe" in text
    assert "| Holm p |" in text and "Holm families: one per metric, the 4 macro-f1" in text
    # 2 seeds cannot reach p < 0.05: every verdict, and the words that follow it, say noise
    assert "of 8 comparisons, 0 favour the federated probe, 0 favour the other" in text
    assert text.count("within noise, no difference claimed") == 8
    # Each run is a whole federation: the coordinator's share is site 0's, the federated probe
    # checkpointed its rounds, and the upper bound's merge is reused across partitions.
    run = tmp_path / "runs"
    assert (run / "breastmnist-iid-federated-seed0/probe-checkpoint.pt").exists()
    assert not (run / "breastmnist-iid-coordinator-share-seed0/probe-checkpoint.pt").exists()
    merges = [
        read_jsonl(run / f"breastmnist-{p}-coordinator-all-seed1/metrics.jsonl")
        for p in ("iid", "dirichlet")
    ]
    assert [r["phase"] for r in merges[0]].count("merge") == 1
    assert [r["phase"] for r in merges[1]].count("merge") == 0  # reused, not learned again
    again = federated_probe.main([*argv, "--report-only"])  # reads the finished runs back
    assert again == 0 and results.read_text() == text
