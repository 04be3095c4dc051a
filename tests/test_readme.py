"""The README's YAML examples parse, and its experiment config is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from medmerge_core.config import config_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_every_yaml_block_parses_and_the_config_example_validates() -> None:
    blocks = yaml_blocks()
    assert blocks, "the README has no YAML example"
    parsed = [yaml.safe_load(block) for block in blocks]
    configs = [p for p in parsed if isinstance(p, dict) and {"name", "sources"} <= set(p)]
    assert configs, "no experiment config among the README's YAML blocks"
    for data in configs:
        config = config_from_dict(data, {"data_root": "/data"})
        assert config.data["path"] == "/data/breastmnist.npz"
        assert config.merge.steps == 300 and config.merge.coef_lr == 1e-2
