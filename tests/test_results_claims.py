"""RESULTS.md says what its renderers compute: proxy-study titles and departures, sources'
modalities, Holm families, and prose verdicts derived from the computed verdicts.

No training: the renderers run on hand-made results, and the federated-probe and
label-efficiency sections are re-rendered from the committed results/ trees.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
from rich.console import Console

from simulations import (
    departures,
    federated_probe,
    label_efficiency,
    reproduce,
    reproduce_findings,
    reproduce_report,
)
from simulations.stats import PairedComparison

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "RESULTS.md"
DATA_ROOT = ROOT.parent / "shared" / "data" / "medmnist"


def section(text: str, key: str) -> str:
    return text.split(f"<!-- {key}:start -->\n", 1)[1].split(f"<!-- {key}:end -->", 1)[0]


def command(body: str, module: str) -> list[str]:
    line = next(x for x in body.splitlines() if x.startswith(f"python -m {module} "))
    return shlex.split(line)[3:]


def test_every_generated_section_is_titled_and_described_as_a_proxy_study() -> None:
    text = RESULTS.read_text(encoding="utf-8")
    keys = [line[5:-len(":start -->")] for line in text.splitlines()
            if line.startswith("<!-- ") and line.endswith(":start -->")]  # fmt: skip
    assert len(keys) >= 6
    for key in keys:
        body = section(text, key)
        assert body.startswith("## Proxy study"), key
        if not key.startswith("faithful-"):  # that driver states its departure in its own words
            assert "**A proxy study, not a reproduction.**" in body, key


def test_no_source_is_called_same_modality_where_it_is_not() -> None:
    text = RESULTS.read_text(encoding="utf-8")
    assert "same-modality source" not in text
    cases = (
        ("reproduce-breastmnist-cifar_resnet56-28", "pneumoniamnist"),
        ("federated-probe-breastmnist", "pneumoniamnist"),
        ("label-efficiency-pneumoniamnist-cifar_resnet56-28", "breastmnist"),
    )
    for key, b in cases:
        assert f"pretrained on {b}" in section(text, key)
        assert "a cross-modality source for this" in section(text, key), key


def test_no_claim_that_npz_files_are_committed() -> None:
    text = RESULTS.read_text(encoding="utf-8")
    assert "probabilities and\nlearnt coefficients are kept" not in text
    assert "are `.npz` files (git-ignored)" in text and "not committed" in text
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "*.npz" in gitignore


def test_modality_relation_and_departure() -> None:
    assert departures.modality_relation("pneumoniamnist", "breastmnist")[0] == ("cross-modality")
    assert departures.modality_relation("chestmnist", "pneumoniamnist")[0] == "same-modality"
    assert departures.modality_relation("synthetic:x", "breastmnist") == ("", "")
    text = departures.departure_text(
        "breastmnist",
        28,
        "cifar_resnet56",
        {"A": "cifar10:resnet56", "B": "pretrain:pneumoniamnist@A"},
    )
    assert (
        "pediatric chest X-ray" in text
        and "a cross-modality source for this breast ultrasound" in text
    )
    assert "instead of ImageNet-1K" in text
    same = departures.departure_text("pneumoniamnist", 28, "r", {"B": "pretrain:chestmnist@A"})
    assert "a same-modality source" in same and "cross-modality" not in same


def _run(f1: float, acc: float) -> dict:
    return {"test": {"macro_f1": f1, "accuracy": acc}}


def test_reproduce_findings_adjust_each_family_by_holm() -> None:
    """On 6 seeds MedMerge is above FT A on every seed (raw p = 2/64 < 0.05, a verdict alone),
    but Holm over the 5 baselines lifts p past 0.05: the table says within noise."""
    baselines = ("ft:A", "ft:B", "lp_ft:A", "lp_ft:B", "average_ft")
    main = {}
    for seed in range(6):
        wiggle = 0.01 * ((-1) ** seed) * (seed + 1)
        runs = {m: _run(0.8 + wiggle * (i + 1) / 7, 0.85 + wiggle / 3) for i, m in
                enumerate(baselines[1:])}  # fmt: skip
        runs["ft:A"] = _run(0.7 + 0.001 * seed, 0.75)
        runs["medmerge"] = _run(0.8 + 0.002 * seed, 0.85)
        main[seed] = runs
    rows = reproduce_findings.findings({"main": main})
    first = next(r for r in rows if r[0] == "MedMerge − FT A" and r[1] == "macro-F1")
    assert first[4] == "0.031" and first[5].endswith("(of 5)") and float(first[5][:5]) >= 0.05
    assert first[-1] == "within noise"
    assert len(rows) == 10  # 5 baselines x 2 metrics
    text = reproduce_findings.families_text({"main": main})
    assert "MedMerge against each of its 5 other methods" in text


def _comparison(verdict: str, holm: float) -> PairedComparison:
    return PairedComparison(10, (0.1,) * 10, 0.1, 0.05, 0.15, 0.002, 10, verdict, holm, 4)


def test_federated_summary_words_follow_the_computed_verdict() -> None:
    families = {
        "macro_f1": {("iid", "coordinator-share"): _comparison("A better", 0.008),
                     ("iid", "coordinator-all"): _comparison("within noise", 0.2)},
        "accuracy": {("iid", "coordinator-share"): _comparison("B better", 0.008),
                     ("iid", "coordinator-all"): _comparison("within noise", 0.2)},
    }  # fmt: skip
    lines = federated_probe.verdict_summary(families)
    assert "1 favour the federated probe, 1 favour the other learner and 2 are within" in lines[0]
    assert "cannot give p" not in lines[0]  # 10 seeds can reach p < 0.05
    share = next(x for x in lines if "one site's share" in x)
    assert "macro-F1 +0.100" in share and "the federated probe is better" in share
    assert "the federated probe is worse" in share
    every = next(x for x in lines if "all the labels" in x)
    assert every.count("within noise, no difference claimed") == 2 and "better" not in every


def test_federated_probe_section_is_what_the_committed_runs_render(tmp_path: Path) -> None:
    """The section re-renders from results/federated_probe unchanged, Holm column and verdict
    words included; the prose never claims a difference its verdicts do not make."""
    text = RESULTS.read_text(encoding="utf-8")
    key = "federated-probe-breastmnist"
    body = section(text, key)
    argv = command(body, "simulations.federated_probe")
    s = dataclasses.replace(
        federated_probe.parse_args([*argv, "--report-only"]),
        out=ROOT / "results" / "federated_probe",
        results=tmp_path / "RESULTS.md",
        argv=tuple(argv),
    )
    federated_probe.run_study(s)
    assert section(tmp_path.joinpath("RESULTS.md").read_text(encoding="utf-8"), key) == body
    assert "| Holm p |" in body and "Holm families: one per metric" in body
    rows = ("| iid | federated - ", "| dirichlet | federated - ")
    verdicts = [x.split(" | ")[-1].rstrip(" |") for x in body.splitlines() if x.startswith(rows)]
    assert len(verdicts) == 8
    summary = body.split("What the paired verdicts say")[1]
    assert summary.count("within noise, no difference claimed") == verdicts.count("within noise")
    prose = text.split("### What the federated-probe numbers show", 1)[1].split("<!-- ", 1)[0]
    if all(v == "within noise" for v in verdicts):  # then the prose claims no difference
        assert "beat" not in prose and "did not reach" not in prose


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs the MedMNIST files of ../shared")
def test_label_efficiency_section_is_what_the_committed_runs_render(tmp_path: Path) -> None:
    text = RESULTS.read_text(encoding="utf-8")
    key = "label-efficiency-pneumoniamnist-cifar_resnet56-28"
    body = section(text, key)
    argv = command(body, "simulations.label_efficiency")
    base, budgets, seeds_at = label_efficiency.parse_args([*argv, "--report-only"])
    base = dataclasses.replace(
        base, data_root=DATA_ROOT, out=ROOT / "results" / "label_efficiency", results=RESULTS
    )
    curve = label_efficiency.collect(base, budgets, Console(quiet=True), seeds_at)
    figure = ROOT / "results" / f"label_efficiency_{base.target}-{base.arch}-{base.image_size}.png"
    rendered = label_efficiency.results_section(base, curve, figure, argv)
    assert rendered.rstrip("\n") == body.rstrip("\n")
    assert "Holm families: one per budget" in body


def test_reproduce_parses_its_sections_commands() -> None:
    """The 10-seed section (its run folders are gone) still names a command the driver takes,
    and its departure sentence is the renderer's."""
    body = section(RESULTS.read_text(encoding="utf-8"), "reproduce-breastmnist-cifar_resnet56-28")
    s = reproduce.parse_args(command(body, "simulations.reproduce"))
    assert reproduce_report.departure_sentence(s) in body
