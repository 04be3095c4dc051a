"""MkDocs hook (mkdocs.yml `hooks`): a line `<!-- module-list: PACKAGE -->` in a page becomes
PACKAGE's docstring, so the site quotes the one module list each package keeps, never a copy.

A marker naming a package without an `__init__.py` or without a docstring fails the build."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- module-list: ([\w.]+) -->$", flags=re.M)


def package_docstring(package: str) -> str:
    path = ROOT.joinpath(*package.split("."), "__init__.py")
    if not path.is_file():
        raise PluginError(f"module-list: {package} is not a package here ({path} is missing)")
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not docstring:
        raise PluginError(f"module-list: {path} has no docstring")
    return docstring


def render(match: re.Match[str]) -> str:
    package = match.group(1)
    path = "/".join(package.split(".")) + "/__init__.py"
    anchor = package.replace(".", "-")
    return (
        f"## `{package}` {{#{anchor}}}\n\n"
        f"*From the docstring of `{path}`:*\n\n{package_docstring(package)}\n"
    )


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return MARKER.sub(render, markdown)
