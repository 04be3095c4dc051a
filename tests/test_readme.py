"""The README and every docs/ page say what is true: each YAML block parses and the experiment
config validates, each TOML block parses and the site policies validate, each shell block is
valid bash, every documented command parses (options, files, run-config keys), and the cheap
ones run as written. The README is a front door: its two commands first, CI running the second,
one command per entry point, at most 250 lines."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from medmerge_core.cli import build_parser
from medmerge_core.cli import main as cli_main
from medmerge_core.experiment.config import config_from_dict
from medmerge_core.federation.site_policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """The README, then every page of the documentation site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_blocks(language: str, page: Path | None = None) -> list[str]:
    """Every ```language block of one page, or of all of them."""
    found = []
    for path in [page] if page else pages():
        text = path.read_text(encoding="utf-8")
        found += re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)
    return found


# --- the front door ------------------------------------------------------------------------


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # It starts with the two commands: the fresh-machine setup + demo, then the tests ...
    first_heading = text.index("\n## ")
    fences = re.findall(r"^```(\w*)\n(.*?)^```", text[:first_heading], flags=re.S | re.M)
    assert [language for language, _ in fences] == ["bash", "bash"]
    setup, tests = (block.strip() for _, block in fences)
    assert setup == (
        "python3.11 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]'"
        " && .venv/bin/medmerge demo"
    )
    assert tests == ".venv/bin/python -m pytest -q"
    # ... and CI runs that test command after the same install.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci and "-c constraints.txt -e '.[dev]'" in "\n".join(ci)


ENTRY_POINT_DRIVERS = {  # the study drivers that have a command line (a `main`)
    path.stem
    for path in (ROOT / "simulations").glob("*.py")
    if re.search(r"^def main\(", path.read_text(encoding="utf-8"), flags=re.M)
}


def test_the_readme_shows_one_command_per_entry_point() -> None:
    commands = shell_commands(README)
    subcommands = {words[1] for words in commands if words[0] == "medmerge"}
    (parser_choices,) = (
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert subcommands == set(parser_choices)
    drivers = {words[2].split(".", 1)[1] for words in commands if words[:2] == ["python", "-m"]}
    assert drivers == ENTRY_POINT_DRIVERS
    flwr = [words for words in commands if words[:2] == ["flwr", "run"]]
    kinds = ["deployment" if "hospitals" in words else "simulation" for words in flwr]
    assert sorted(kinds) == ["deployment", "simulation"]
    benchmarks = {Path(words[1]).name for words in commands if words[0] == "python"}
    assert {"gpu_check.py", "check_identical.py"} <= benchmarks


# --- YAML and TOML -------------------------------------------------------------------------


def test_every_yaml_block_parses_and_the_config_example_validates() -> None:
    blocks = code_blocks("yaml")
    assert blocks, "no YAML example in the README or docs/"
    parsed = [yaml.safe_load(block) for block in blocks]
    configs = [p for p in parsed if isinstance(p, dict) and {"name", "sources"} <= set(p)]
    assert configs, "no experiment config among the YAML blocks"
    for data in configs:
        config = config_from_dict(data, {"data_root": "/data"})
        assert config.data["path"] == "/data/breastmnist.npz"
        assert config.merge.steps == 300 and config.merge.coef_lr == 1e-2


POLICY_TABLES = {"approvals", "serve", "apps", "privacy", "limits"}


def toml_documents() -> list[str]:
    """Every TOML block, and every TOML heredoc (`<<'TOML'`) of a shell block."""
    heredocs = [
        doc
        for block in code_blocks("bash")
        for doc in re.findall(r"<<'TOML'\n(.*?)^TOML$", block, flags=re.S | re.M)
    ]
    return code_blocks("toml") + heredocs


def test_every_toml_block_parses_and_the_site_policies_validate() -> None:
    policies = 0
    for document in toml_documents():
        raw = tomllib.loads(document)
        if raw and set(raw) <= POLICY_TABLES:
            policy = parse_policy(raw, Path("/etc/medmerge/policy.toml"))
            assert policy.roles == ("site",), policy
            policies += 1
    assert policies >= 2  # docs/site-policy.md's full example and the guide's heredoc


# --- shell blocks --------------------------------------------------------------------------


SEPARATORS = {"&&", "||", ";", "&", "|"}


def shell_words(line: str) -> list[str]:
    """One line's words as bash splits them, each of `&& || ; & |` a word of its own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def shell_commands(page: Path | None = None) -> list[list[str]]:
    """Every command of the bash blocks (one page's, or all): continuation lines joined,
    comments and heredoc bodies dropped, split at `&&`, `;`, `&` and pipes, and without the
    `NAME=value` environment assignments in front."""
    out: list[list[str]] = [[]]
    for block in code_blocks("bash", page):
        block = re.sub(r"<<'(\w+)'\n.*?^\1$", "", block, flags=re.S | re.M)
        for line in block.replace("\\\n", " ").splitlines():
            for word in shell_words(line):
                if word in SEPARATORS:
                    out.append([])
                elif out[-1] or not re.match(r"^[A-Za-z_]\w*=", word):
                    out[-1].append(word)
            out.append([])
    return [c for c in out if c]


def test_every_shell_block_is_valid_bash() -> None:
    # The README: its two commands and the entry points; docs/: 27 blocks when this was written.
    assert len(code_blocks("bash", README)) >= 3
    assert len(code_blocks("bash")) - len(code_blocks("bash", README)) >= 27
    for block in code_blocks("bash"):
        checked = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert checked.returncode == 0, (block, checked.stderr)


RUN_CONFIG_KEYS = set(
    tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"][
        "config"
    ]
)


def check_command(words: list[str]) -> str | None:
    """Parse one documented command as its program would; the name of what was checked, or
    None for a command this test does not know (ssh, systemctl, ...)."""
    program = Path(words[0]).name
    if program == "medmerge":
        build_parser().parse_args(words[1:])
        return f"medmerge {words[1]}"
    if words[:2] == ["python", "-m"] and words[2].startswith("simulations."):
        module = importlib.import_module(words[2])
        if hasattr(module, "parse_args"):
            module.parse_args(words[3:])
        else:
            assert callable(module.main), words[2]  # parses its own arguments in main()
        return words[2]
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        assert (ROOT / words[1]).is_file(), words[1]
        return "benchmarks"
    if words[0].startswith("deploy/"):
        script = ROOT / words[0]
        assert script.is_file() and os.access(script, os.X_OK), words[0]
        return "deploy"
    if words[:2] == ["flwr", "run"]:
        settings = words[words.index("-c") + 1] if "-c" in words else ""
        for pair in shlex.split(settings):
            assert pair.split("=", 1)[0] in RUN_CONFIG_KEYS, (pair, words)
        return "flwr run"
    return None


def test_every_documented_command_parses() -> None:
    """Each `medmerge`, study-driver, benchmark, deploy-script and `flwr run` line names real
    options, files and run-config keys, so a copied command fails only on the reader's paths."""
    seen = {check_command(words) for words in shell_commands()}
    subcommands = {f"medmerge {name}" for name in ("demo", "run", "pretrain", "evaluate")}
    subcommands |= {f"medmerge {name}" for name in ("export", "identity", "site")}
    drivers = {f"simulations.{name}" for name in ENTRY_POINT_DRIVERS}
    assert subcommands | drivers | {"benchmarks", "deploy", "flwr run"} <= seen


def test_the_cheap_commands_run_as_written(quick_demo, tmp_path, monkeypatch) -> None:
    """The quick demo (`medmerge demo --quick`) in place of the full one, then every documented
    evaluate and export line verbatim, and every node-config line that writes under the working
    directory (the guide's write to /etc and are only parsed above)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(quick_demo, "runs/demo")
    unique = list(dict.fromkeys(tuple(words) for words in shell_commands()))
    ran = 0
    for words in unique:
        if words[0] == "medmerge" and words[1] in ("evaluate", "export"):
            assert cli_main(list(words[1:])) == 0, words
            ran += 1
        elif words[0] == "deploy/write_node_config.sh" and not Path(words[1]).is_absolute():
            done = subprocess.run([str(ROOT / words[0]), *words[1:]], capture_output=True)
            assert done.returncode == 0, done.stderr
            ran += 1
    assert ran == 3  # the README's and the docs' lines are the same three commands
    assert (tmp_path / "runs/demo/target_eval.json").is_file()
    assert (tmp_path / "export/model.safetensors").is_file()
    assert (tmp_path / "nodes/site-1.toml").read_text().count("=") == 5  # with its identity


# --- links ---------------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings, as MkDocs' toc extension makes them (and docs/hooks.py
    for each `<!-- module-list: PACKAGE -->`: PACKAGE with its dots as dashes)."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    ids = {
        package.replace(".", "-")
        for package in re.findall(r"^<!-- module-list: ([\w.]+) -->$", text, flags=re.M)
    }
    for heading in re.findall(r"^#+ (.*)$", text, flags=re.M):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        text = re.sub(r"`", "", heading)
        ids.add(explicit.group(1) if explicit else slugify(text, "-"))
    return ids


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    """The README's links (MkDocs checks the site's own, but not the README's) and every
    page's: the file exists, and so does the heading a `#anchor` names."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}"
