"""Runs a researcher can watch: progress per batch / plain log lines, optional TensorBoard
tracking through `fit`'s epoch hook, and the confusion-matrix figure of every method."""

from __future__ import annotations

import io
import os
import re
import stat
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

import medmerge_core.experiment.runner as runner
import medmerge_core.progress as progress
import medmerge_core.report as report
import medmerge_core.train as train
from medmerge_core.data.base import BatchLoader
from medmerge_core.errors import InputError
from medmerge_core.experiment.run_folder import ExperimentRun
from medmerge_core.io import _umask
from medmerge_core.models import build_model
from medmerge_core.settings import StageSettings
from tests.test_experiment import make_config

EXPERIMENTS = Path(__file__).parent.parent / "docs" / "experiments.md"
NUMBER = r"\d+\.\d{3}"
# stage name, epoch i/n, running train loss, step j/m, images/s, ETA for the stage
PLAIN_LINE = re.compile(
    rf"(?P<stage>ft:a ft): epoch (?P<epoch>\d+)/2 loss {NUMBER}, step (?P<step>\d+)/4, "
    rf"\d+ img/s, ETA \d+:\d\d:\d\d(?P<end>, val F1 {NUMBER} \(\d+\.\d s\))?"
)


def _fit(task, show_progress: bool = True, **kwargs):
    torch.manual_seed(0)
    return train.fit(
        build_model("shufflenet_v2_x0_5", 2, 1),  # the loop is the same for any arch
        BatchLoader(task.train, 16, shuffle=True),  # 64 images: 4 steps per epoch
        BatchLoader(task.val, 32),
        kwargs.pop("stage", StageSettings(2, 1e-3)),
        train.Runtime.detect("cpu"),
        options=train.FitOptions(name="ft:a ft", show_progress=show_progress),
        **kwargs,
    )


def test_a_log_file_gets_a_plain_line_per_epoch_and_at_most_every_interval(
    tiny_task, capsys, monkeypatch
) -> None:
    """stdout not a terminal (nohup, a batch scheduler): no bar, plain lines."""
    # an interval longer than any stage (on a loaded CI machine one took 30 s): a line per epoch
    monkeypatch.setattr(progress, "PLAIN_LINE_SECONDS", float("inf"))
    _fit(tiny_task)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    matches = [PLAIN_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(m["epoch"], m["step"], bool(m["end"])) for m in matches] == [
        ("1", "4", True),
        ("2", "4", True),
    ]
    assert lines[-1].split(", ETA ")[1].startswith("0:00:00,")  # the stage is done

    monkeypatch.setattr(progress, "PLAIN_LINE_SECONDS", 0.0)  # an interval shorter than a step
    _fit(tiny_task)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    matches = [PLAIN_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    steps = [(m["epoch"], m["step"], bool(m["end"])) for m in matches]
    per_epoch = [("1", "1", False), ("1", "2", False), ("1", "3", False), ("1", "4", False)]
    assert steps == [*per_epoch, ("1", "4", True), *[(("2", s, e)) for _, s, e in per_epoch],
                     ("2", "4", True)]  # fmt: skip

    _fit(tiny_task, show_progress=False)
    assert capsys.readouterr().out == ""


def test_in_a_terminal_the_bar_advances_per_batch(tiny_task, monkeypatch) -> None:
    screen = io.StringIO()
    bars: list[Progress] = []
    make_bar = progress.progress_bar

    def terminal_bar(enabled: bool = True) -> Progress:
        bar = make_bar(enabled, Console(file=screen, force_terminal=True, width=120))
        bars.append(bar)
        return bar

    monkeypatch.setattr(progress, "progress_bar", terminal_bar)
    seen: list[tuple[float, str]] = []

    def look(model, epoch) -> None:  # before each forward: what the bar shows so far
        task = bars[-1].tasks[0]
        seen.append((task.completed, task.description))

    _fit(tiny_task, before_step=look)
    task = bars[-1].tasks[0]
    assert [completed for completed, _ in seen] == list(range(8))  # one step per batch
    assert {d for _, d in seen} == {"ft:a ft epoch 1/2", "ft:a ft epoch 2/2"}
    assert task.total == 8 and task.completed == 8
    assert task.fields["status"].startswith("loss ") and "val F1" in task.fields["status"]
    assert "ETA" not in screen.getvalue()  # no plain lines under a bar

    seen.clear()  # a step budget: the bar counts the budget's steps, not whole epochs
    _fit(tiny_task, before_step=look, stage=StageSettings(0, 1e-3, steps=6))
    assert bars[-1].tasks[0].total == 6 and bars[-1].tasks[0].completed == 6
    assert [completed for completed, _ in seen] == list(range(6))


def test_tracking_is_validated_once_and_before_the_run_folder(
    tiny_task, tmp_path, monkeypatch
) -> None:
    with pytest.raises(InputError, match=r"^tracking: unknown 'tensorbord'; expected one of"):
        make_config(tmp_path, tracking="tensorbord")
    config = make_config(tmp_path, pipelines=["ft"], tracking="tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(InputError) as error:
        runner.run_experiment(config, task=tiny_task, show_progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("tracking: tensorboard is not installed")
    assert "pip install -e '.[tracking]'" in message
    assert not (tmp_path / "runs").exists()  # nothing left behind


def test_tensorboard_events_hold_every_stage_metric_and_the_coefficients(
    tiny_task, tmp_path
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # merge.steps 3 with 2 batches per epoch: 2 probe epochs
    plain = make_config(tmp_path, pipelines=["medmerge"])
    config = make_config(tmp_path, pipelines=["medmerge"], tracking="tensorboard")
    results = runner.run_experiment(config, task=tiny_task, show_progress=False)
    events = tmp_path / "runs" / "tiny" / "tensorboard" / "medmerge"
    assert list(events.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    metrics = [f"val_{k}" for k in ("accuracy", "macro_f1", "auroc", "loss")]
    expected = {f"{stage}/{key}" for stage in ("probe", "ft") for key in ["train_loss", *metrics]}
    assert expected <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("probe/train_loss")] == [0, 1]
    assert [e.step for e in acc.Scalars("ft/val_macro_f1")] == [0]
    best = results["medmerge"]["stages"]["ft"]["val"]["macro_f1"]
    assert acc.Scalars("ft/val_macro_f1")[0].value == pytest.approx(best)
    assert set(acc.Tags()["histograms"]) == {"probe/coefficients/a", "probe/coefficients/b"}
    first, second = acc.Histograms("probe/coefficients/a"), acc.Histograms("probe/coefficients/b")
    assert [e.step for e in first] == [0, 1]
    kernels = sum(row["coefficients"] for row in _summary(tmp_path)["layers"])
    last_a, last_b = first[-1].histogram_value, second[-1].histogram_value
    assert last_a.num == last_b.num == kernels  # every kernel, once per source
    assert last_a.sum + last_b.sum == pytest.approx(kernels, rel=1e-4)  # d = 2: w and 1 - w
    # tracking cannot change a result: switching it on or off resumes the same folder
    ExperimentRun.check(plain)


def test_every_single_label_method_gets_a_confusion_figure(
    tiny_task, tmp_path, monkeypatch, caplog
) -> None:
    pytest.importorskip("matplotlib")
    runner.run_experiment(
        make_config(tmp_path, pipelines=["ft"]), task=tiny_task, show_progress=False
    )
    run = tmp_path / "runs" / "tiny"
    for name in ("ft_a.png", "ft_b.png"):
        figure = run / "confusion" / name
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stat.S_IMODE(os.stat(figure).st_mode) == 0o666 & ~_umask()
    assert not [p for p in (run / "confusion").iterdir() if p.name.startswith(".")]
    assert not (run / "tensorboard").exists()  # tracking is off by default

    def no_matplotlib():
        raise RuntimeError("plotting needs matplotlib")

    monkeypatch.setattr(report, "pyplot", no_matplotlib)
    results = runner.run_experiment(
        make_config(tmp_path, name="bare", pipelines=["ft"]), task=tiny_task, show_progress=False
    )
    assert set(results) == {"ft:a", "ft:b"} and "no ft_a.png" in caplog.text
    assert not (tmp_path / "runs" / "bare" / "confusion").exists()


def test_the_documented_run_folder_table_lists_the_new_files() -> None:
    section = EXPERIMENTS.read_text(encoding="utf-8")
    start = section.index("| file | what |")
    table = section[start : section.index("\n\n", start)]
    for entry in ("`confusion/<method>.png`", "`tensorboard/<method>/`"):
        assert f"| {entry} |" in table, entry
    assert "tracking: none" in section


def _summary(tmp_path: Path) -> dict:
    import json

    return json.loads((tmp_path / "runs" / "tiny" / "coefficient_summary.json").read_text())
