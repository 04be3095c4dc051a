"""One settings module: each setting declared once, read the same way from YAML, from Flower's
flat run config and from a driver's command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medmerge_core.coerce import (
    add_arguments,
    build,
    flat_keys,
    from_arguments,
    from_flat,
)
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import config_from_dict
from medmerge_core.settings import (
    InMergeSettings,
    ProbeSettings,
    StageSettings,
)


@dataclass(frozen=True)
class Driver:
    data_root: Path
    seeds: tuple[int, ...] = (0, 1)
    cap: int | None = None
    ft: StageSettings = field(default_factory=lambda: StageSettings(20, 1e-5))
    inmerge: InMergeSettings = field(default_factory=InMergeSettings)
    progress: bool = True


def test_a_partial_block_keeps_the_fields_documented_default() -> None:
    config = config_from_dict(
        {
            "name": "x",
            "data": {"format": "synthetic", "task": "target"},
            "sources": {"a": "random:1"},
            "pipelines": ["ft"],
            "ft": {"epochs": 3},
        }
    )
    assert config.ft == StageSettings(epochs=3, lr=1e-5)  # ExperimentConfig's FT lr, not 1e-4
    with pytest.raises(InputError, match=r"^ft\.lr: must be > 0"):
        build(type(config), {**config.to_dict(), "ft": {"lr": 0.0}})


def test_flat_keys_name_every_block_field_with_its_prefix() -> None:
    keys = flat_keys(Driver)
    assert keys["ft-weight-decay"] == ("ft", "weight_decay")
    assert keys["inmerge-skip-layers"] == ("inmerge", "skip_layers")
    assert keys["inmerge-deep-fraction"] == ("inmerge", "deep_fraction")
    assert "inmerge" not in keys  # not optional: no on/off switch
    parsed = from_flat(Driver, {"data-root": "d", "seeds": [3, 4], "ft-lr": 1, "inmerge-p": 0.5})
    assert parsed.seeds == (3, 4) and parsed.ft == StageSettings(20, 1.0)
    assert parsed.inmerge == InMergeSettings(p=0.5)
    with pytest.raises(
        InputError, match=r"^where: unknown key 'ft-lrr' \(did you mean 'ft-lr'\?\)"
    ):
        from_flat(Driver, {"data-root": "d", "ft-lrr": 1}, "where")
    with pytest.raises(InputError, match=r"^where ft-epochs: must be >= 0"):
        from_flat(Driver, {"data-root": "d", "ft-epochs": -1}, "where")


def test_command_line_options_come_from_the_dataclass() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Driver, prefixes={"inmerge": ""})
    args = parser.parse_args(
        [
            "--data-root",
            "x",
            "--seeds",
            "5",
            "6",
            "--ft-lr",
            "0.1",
            "--rule",
            "absolute",
            "--tau",
            "-1",
            "--no-progress",
        ]
    )
    driver = from_arguments(Driver, args)
    assert driver == Driver(
        Path("x"),
        (5, 6),
        None,
        StageSettings(20, 0.1),
        InMergeSettings(rule="absolute", tau=-1.0),
        False,
    )
    assert from_arguments(Driver, parser.parse_args(["--data-root", "x"])) == Driver(Path("x"))
    with pytest.raises(SystemExit):
        parser.parse_args([])  # data_root has no default: required
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-root", "x", "--rule", "cosine"])  # a Literal: its choices


def test_probe_budget_epochs_win_over_the_default_steps() -> None:
    assert ProbeSettings(epochs=2).stage(1e-3, 0.01) == StageSettings(2, 1e-3, 0.01)
    assert ProbeSettings(steps=7).stage(1e-3, 0.0) == StageSettings(0, 1e-3, 0.0, steps=7)
    assert not ProbeSettings(steps=0).trains and ProbeSettings(epochs=1).trains
