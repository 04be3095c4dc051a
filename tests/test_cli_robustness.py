"""The command line under stress: --set overrides, bad YAML, Ctrl-C, permissions, file modes
and a pretrain `--out` that already exists."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import medmerge_core.experiment.demo as demo
import medmerge_core.experiment.runner as runner
import medmerge_core.pretrain as pretrain
from medmerge_core.cli import main
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import load_config
from medmerge_core.io import atomic_torch_save, atomic_write_text, load_torch_file
from medmerge_core.settings import StageSettings
from medmerge_core.train import FitOptions, Runtime

CONFIG = (
    "name: x\n"
    "data: {format: synthetic, task: target}\n"
    "sources: {a: zeros, b: '${source_b}'}\n"
    "ft: {epochs: 1}\n"
)


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """The config; `run` on it must stop at the config (a bad --set never starts training)."""

    def no_run(*args, **kwargs):
        pytest.fail("the run started")

    monkeypatch.setattr(runner, "run_experiment", no_run)
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def main_no_escape(argv: list[str]) -> int:
    """main(argv); a KeyboardInterrupt that escapes fails the test instead of ending pytest."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")


def printed(capsys) -> str:
    """stdout with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


# 1. --set: placeholders and dotted config keys -------------------------------------------


def test_set_overrides_dotted_config_keys_with_yaml_values(config_file) -> None:
    config = load_config(
        config_file,
        {
            "source_b": "random:2",  # a ${placeholder}: filled as before
            "ft.epochs": "5",
            "ft.lr": "1e-4",
            "merge.steps": "100",
            "seed": "3",
            "amp": "true",
            "data.n_train": "40",
            "sources.b": "zeros",
            "inmerge.p": "0.5",  # a section the file does not have
        },
    )
    assert config.ft.epochs == 5 and isinstance(config.ft.epochs, int)
    assert config.ft.lr == pytest.approx(1e-4) and isinstance(config.ft.lr, float)
    assert config.merge.steps == 100 and config.seed == 3 and config.amp is True
    assert config.data == {"format": "synthetic", "task": "target", "n_train": 40}
    assert config.sources == {"a": "zeros", "b": "zeros"}
    assert config.inmerge is not None and config.inmerge.p == 0.5
    assert config.lp.epochs == 10  # untouched keys keep their values


def test_set_on_the_command_line_reaches_the_run(config_file, monkeypatch) -> None:
    seen = {}

    def fake_run(config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    argv = ["run", str(config_file), "--set", "source_b=zeros", "--set", "ft.epochs=5"]
    assert main_no_escape(argv) == 130
    assert seen["config"].ft.epochs == 5 and seen["config"].sources["b"] == "zeros"


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("ft.epochz=5", "error: --set ft.epochz=5: unknown key (did you mean 'epochs'?)"),
        ("sed=3", "error: --set sed=3: unknown key (did you mean 'seed'?)"),
        ("ft.epochs=five", "error: --set ft.epochs=five: expected int, got str ('five')"),
        ("batch_size=0", "error: --set batch_size=0: must be >= 1"),
        ("data.n_trian=4", "error: --set data.n_trian=4: unknown option for format"),
        ("ft.epochs.x=1", "error: --set ft.epochs.x=1: ft.epochs is not a mapping"),
        ("seed.x=1", "error: --set seed.x=1: seed: expected int, got dict"),
    ],
)
def test_set_of_an_unknown_key_or_bad_value_is_one_line(config_file, capsys, pair, message):
    assert main(["run", str(config_file), "--set", "source_b=zeros", "--set", pair]) == 2
    assert one_line_error(capsys).startswith(message)


def test_set_of_a_name_that_is_neither_placeholder_nor_key_is_refused(config_file, capsys):
    assert main(["run", str(config_file), "--set", "source_b=zeros", "--set", "root=/d"]) == 2
    assert one_line_error(capsys) == "error: --set root=/d: unknown key"


# 2. Invalid YAML says what is wrong ------------------------------------------------------


def test_invalid_yaml_includes_the_parser_problem(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsources: {a: zeros}\n\ndata: format: synthetic\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    assert str(info.value) == f"{path} line 4: invalid YAML (mapping values are not allowed here)"


# 3. Ctrl-C and permission errors are one clean line --------------------------------------


@pytest.fixture
def commands(config_file, tmp_path, monkeypatch):
    """argv for each subcommand, and a hook that makes the function it calls raise `exc`."""

    def make(exc: BaseException):
        def boom(*args, **kwargs):
            raise exc

        monkeypatch.setattr(runner, "run_experiment", boom)
        monkeypatch.setattr(pretrain, "pretrain_source", boom)
        monkeypatch.setattr(demo, "run_demo", boom)

    argv = {
        "run": ["run", str(config_file), "--set", "source_b=zeros"],
        "pretrain": [
            "pretrain",
            "--arch",
            "resnet18",
            "--data",
            "format=synthetic",
            "--data",
            "task=generic",
            "--data",
            "n_train=8",
            "--data",
            "n_val=4",
            "--data",
            "n_test=4",
            "--image-size",
            "16",
            "--out",
            str(tmp_path / "m.pt"),
        ],
        "demo": ["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"],
    }
    return argv, make


@pytest.mark.parametrize("command", ["run", "pretrain", "demo"])
def test_ctrl_c_is_one_line_and_exit_130(commands, capsys, command) -> None:
    argv, make = commands
    make(KeyboardInterrupt())
    assert main_no_escape(argv[command]) == 130
    assert capsys.readouterr().err == "interrupted; run the same command to resume\n"


@pytest.mark.parametrize("command", ["run", "pretrain", "demo"])
def test_permission_error_names_the_path(commands, capsys, command) -> None:
    argv, make = commands
    make(PermissionError(13, "Permission denied", "/shared/runs/x/results.json"))
    assert main(argv[command]) == 2
    assert one_line_error(capsys) == "error: /shared/runs/x/results.json: permission denied"


def test_an_unwritable_folder_names_the_file_not_the_temp_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".r.json.abc.tmp"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(tmp_path / "r.json", "{}")
    assert info.value.filename == str(tmp_path / "r.json")


# 4. Atomic writes give the mode a plain open() would -------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_atomic_writes_are_readable_like_plain_files(tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    finally:
        os.umask(old)
    for name in ("results.json", "model.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "results.json"]


# 5. pretrain --out onto an existing file -------------------------------------------------

PRETRAIN = [
    "pretrain",
    "--arch",
    "resnet18",
    "--data",
    "format=synthetic",
    "--data",
    "task=generic",
    "--data",
    "n_train=16",
    "--data",
    "n_val=8",
    "--data",
    "n_test=8",
    "--image-size",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--device",
    "cpu",
]


def test_pretrain_reuses_same_settings_and_refuses_different_ones(tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    assert main([*PRETRAIN, "--out", str(out)]) == 0
    assert f"saved {out}" in printed(capsys)
    settings = load_torch_file(out, "x")["settings"]
    assert settings["arch"] == "resnet18" and settings["lr"] == pytest.approx(1e-4)
    assert settings["data"]["task"] == "generic" and settings["data"]["image_size"] == 16
    assert (settings["epochs"], settings["batch_size"], settings["seed"]) == (1, 8, 0)
    assert settings["init"] is None and "weight_decay" in settings
    recorded = load_torch_file(out, "x")["environment"]  # what made it, for a reader
    assert recorded["packages"]["torch"] and recorded["threads"] >= 1 and recorded["cpu"]

    assert main([*PRETRAIN, "--out", str(out)]) == 0
    assert f"{out} exists, same settings: reused" in printed(capsys)

    assert main([*PRETRAIN, "--out", str(out), "--lr", "0.01"]) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "lr: 0.0001 saved, 0.01 now" in err

    assert main([*PRETRAIN[:6], "task=related_a", *PRETRAIN[7:], "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "different settings (data.task: 'generic' saved, 'related_a' now)" in err

    assert main([*PRETRAIN, "--out", str(out), "--init", "random:1"]) == 2
    assert "init: None saved, 'random:1' now" in one_line_error(capsys)


def test_pretrain_refuses_a_file_without_recorded_settings(tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    atomic_torch_save({"arch": "resnet18", "state_dict": {}}, out)  # an older version's file
    assert main([*PRETRAIN, "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "delete it or pick another --out" in err


def test_library_callers_keep_reusing_old_files_and_resume(tiny_task, tmp_path, monkeypatch):
    from medmerge_core.models import build_model, save_checkpoint

    out, stage, cpu = tmp_path / "src.pt", StageSettings(1, 1e-3), Runtime.detect("cpu")
    # Interrupted after training: the .ckpt stays, and a rerun finishes from it.
    real_evaluate = pretrain.evaluate
    monkeypatch.setattr(pretrain, "evaluate", lambda *a, **k: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):
        pretrain.pretrain_source(
            "resnet18", tiny_task, out, stage, cpu, options=FitOptions(show_progress=False)
        )
    assert out.with_suffix(".ckpt").exists() and not out.exists()
    monkeypatch.setattr(pretrain, "evaluate", real_evaluate)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: pytest.fail("retrained"))
    pretrain.pretrain_source(
        "resnet18", tiny_task, out, stage, cpu, options=FitOptions(show_progress=False)
    )
    assert out.exists() and not out.with_suffix(".ckpt").exists()
    assert load_torch_file(out, "x")["settings"]["epochs"] == 1

    with pytest.raises(InputError, match=r"src.pt: .*different settings \(seed: 0 saved, 1 now"):
        pretrain.pretrain_source("resnet18", tiny_task, out, stage, cpu, seed=1)

    old = tmp_path / "old.pt"
    save_checkpoint(old, build_model("resnet18", 2, 1), "resnet18")  # no settings recorded
    metrics = pretrain.pretrain_source("resnet18", tiny_task, old, stage, cpu)
    assert "accuracy" in metrics
