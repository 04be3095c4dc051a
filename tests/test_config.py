"""The YAML schema: unknown keys, wrong types and missing fields are one-line errors."""

from __future__ import annotations

import pytest

from medmerge_core.errors import InputError
from medmerge_core.experiment.config import config_from_dict, load_config

BASE = {
    "name": "t",
    "data": {"format": "synthetic", "task": "target"},
    "sources": {"a": "random:1", "b": "random:2"},
}


def test_defaults_and_scientific_notation(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: t\ndata: {format: synthetic, task: target}\n"
        "sources: {a: 'random:1', b: 'random:2'}\nlp: {epochs: 3, lr: 1e-4}\n"
    )
    config = load_config(path)
    assert config.lp.lr == pytest.approx(1e-4) and config.lp.epochs == 3
    assert config.ft.lr == pytest.approx(1e-5)  # the paper's FT learning rate
    assert config.merge.granularity == "kernel" and config.merge.freeze_bn is False
    assert config.pipelines == ["ft", "lp_ft", "average_ft", "medmerge"]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"lp": {"epochs": 3, "lrr": 1}}, r"lp.lrr: unknown key \(did you mean 'lr'\?\)"),
        ({"batch_size": "32"}, r"batch_size: expected int, got str"),
        ({"merge": {"freeze_bn": "no"}}, r"merge.freeze_bn: expected bool"),
        ({"pipelines": ["ft", "lpft"]}, r"pipelines: unknown 'lpft'"),
        ({"merge": {"granularity": "channel"}}, r"merge.granularity: unknown 'channel'"),
        ({"sources": {"a": "random:1"}}, r"sources: .* need at least 2 sources"),
        ({"inmerge": {"p": "high"}}, r"inmerge.p: expected float"),
        ({"modell": {}}, r"modell: unknown key"),
        ({"data": {"format": "synthetic"}}, r"data.task: required for format 'synthetic'"),
        ({"data": {"format": "chexpert", "root": "/x", "policy": "U-Twos"}}, r"data.policy"),
        ({"data": {"format": "mnist"}}, r"data.format: unknown value 'mnist'"),
    ],
)
def test_bad_fields_are_named(patch: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        config_from_dict({**BASE, **patch})


def test_missing_required_key() -> None:
    with pytest.raises(InputError, match=r"^sources: missing$"):
        config_from_dict({"name": "t", "data": {"format": "synthetic"}})


def test_variables_are_substituted_and_missing_ones_named() -> None:
    data = {**BASE, "data": {"format": "aptos", "root": "${data_root}/aptos"}}
    assert config_from_dict(data, {"data_root": "/d"}).data["root"] == "/d/aptos"
    with pytest.raises(InputError, match=r"\$\{data_root\}: not set"):
        config_from_dict(data)


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(InputError, match=r"config not found: .*none.yaml"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml line .*: invalid YAML"):
        load_config(bad)
