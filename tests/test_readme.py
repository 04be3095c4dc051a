"""The README's YAML examples parse and its experiment config is valid; its shell blocks are
valid bash, every documented command parses, and the cheap ones run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from medmerge_core.cli import build_parser
from medmerge_core.cli import main as cli_main
from medmerge_core.experiment.config import config_from_dict
from simulations import federated_probe, label_efficiency, reproduce

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


# --- shell blocks ------------------------------------------------------------------------------

ROOT = README.parent


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped,
    `a && b` split."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append([w for w in words[:cut] if w != "&"])
                words = words[cut + 1 :]
    return [c for c in out if c]


def test_every_shell_block_is_valid_bash() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        checked = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert checked.returncode == 0, (block, checked.stderr)


def test_every_documented_command_parses() -> None:
    """Each `medmerge`, study-driver and deploy-script line names real options and files, so
    a copied command fails only on the reader's own paths."""
    seen = set()
    for words in shell_commands():
        program = Path(words[0]).name
        if program == "medmerge":
            build_parser().parse_args(words[1:])
            seen.add(f"medmerge {words[1]}")
        elif words[:2] == ["python", "-m"] and words[2] == "simulations.reproduce":
            reproduce.parse_args(words[3:])
            seen.add(words[2])
        elif words[:2] == ["python", "-m"] and words[2] == "simulations.label_efficiency":
            label_efficiency.parse_args(words[3:])
            seen.add(words[2])
        elif words[:2] == ["python", "-m"] and words[2] == "simulations.federated_probe":
            federated_probe.parse_args(words[3:])
            seen.add(words[2])
        elif words[0].startswith("deploy/"):
            script = ROOT / words[0]
            assert script.is_file() and os.access(script, os.X_OK), words[0]
            seen.add("deploy")
    assert {"medmerge demo", "medmerge run", "medmerge pretrain", "medmerge evaluate",
            "medmerge export", "simulations.reproduce", "simulations.label_efficiency",
            "simulations.federated_probe", "deploy"} <= seen  # fmt: skip


def test_the_cheap_commands_run_as_written(tmp_path, monkeypatch) -> None:
    """The quick demo in place of the full one, then the README's evaluate and export lines
    verbatim, and its node-config line."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["demo", "--quick", "--out", "runs/demo", "--no-progress"]) == 0
    ran = 0
    for words in shell_commands():
        if Path(words[0]).name == "medmerge" and words[1] in ("evaluate", "export"):
            assert cli_main(words[1:]) == 0, words
            ran += 1
        elif words[0] == "deploy/write_node_config.sh":
            done = subprocess.run([str(ROOT / words[0]), *words[1:]], capture_output=True)
            assert done.returncode == 0, done.stderr
            ran += 1
    assert ran == 3
    assert (tmp_path / "runs/demo/target_eval.json").is_file()
    assert (tmp_path / "export/model.safetensors").is_file()
    assert (tmp_path / "nodes/site-1.toml").read_text().count("=") == 5  # with its identity
