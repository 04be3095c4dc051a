"""The documentation site: it builds with `mkdocs build --strict`, every page is in its nav,
and the one module list each package keeps in its docstring (quoted by docs/layout.md) names
every module of the package."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_site_builds_strict(tmp_path) -> None:
    """About a second: every page, link, anchor, nav entry and module-list marker checked."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr
    layout = (tmp_path / "layout" / "index.html").read_text(encoding="utf-8")
    assert "module-list" not in layout and "site_policy" in layout  # the docstrings, quoted


def nav_pages(entries: list) -> set[str]:
    found = set()
    for entry in entries:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            found |= nav_pages(value) if isinstance(value, list) else {value}
    return found


def test_every_page_is_in_the_nav() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert nav_pages(nav) == pages


# The packages whose docstring is the module list, in the order docs/layout.md quotes them.
PACKAGES = [
    "medmerge_core",
    "medmerge_core.experiment",
    "medmerge_core.data",
    "medmerge_core.federation",
    "client",
    "server",
    "simulations",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_docstring_names_every_module(package: str) -> None:
    folder = ROOT.joinpath(*package.split("."))
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
    assert docstring, package
    modules = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
    modules += [p.parent.name for p in folder.glob("*/__init__.py")]
    missing = [m for m in sorted(modules) if not re.search(rf"`{m}[`./]", docstring)]
    assert not missing, f"{package}'s docstring does not name {missing}"


def test_the_layout_page_quotes_every_package() -> None:
    markers = re.findall(
        r"^<!-- module-list: ([\w.]+) -->$", (DOCS / "layout.md").read_text(), flags=re.M
    )
    assert markers == PACKAGES
