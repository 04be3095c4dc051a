"""The site runtime (`medmerge-clientapp`) and the site's CLI (`medmerge site ...`).

Flower starts every ClientApp as a fresh `flwr-clientapp` process, which installs the app
bundle (FAB) the SuperLink delivered and imports it with the bundle first on `sys.path`: a
check inside the bundle is only as good as the bundle. So deploy/start_supernode.sh makes
Flower start `medmerge-clientapp` instead (the site's reviewed install, found first on PATH as
`flwr-clientapp`). It is Flower's own `flwr-clientapp` with one step added between pulling the
task and installing the bundle: the site policy (`medmerge_core.federation.site_policy`)
checks the bundle's digest, computed from the delivered bytes, and the run config against
the node's policy and approvals. A refusal is raised there, before any delivered file is
written or imported, so Flower replies with an error that names the rule; the node logs it
and writes it to its audit log. After installing, the installed copy that Flower will import
is checked against the same digest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medmerge_core.errors import InputError
from medmerge_core.federation.protocol import SECAGG_RECORD
from medmerge_core.federation.site_approvals import read_approvals, set_status
from medmerge_core.federation.site_digests import (
    fab_digest,
    fab_files,
    files_digest,
    installed_digest,
)
from medmerge_core.federation.site_enforcement import decide, refuse
from medmerge_core.federation.site_policy import Refusal, load_policy

log = logging.getLogger("flwr")  # the ClientApp process's own log (the SuperNode's log file)


def check_task(message: Any, context: Any, fab_content: bytes, fab_name: str) -> str | None:
    """The site's check of one pulled task, before its bundle is installed: raises
    PolicyRefusal (logged and audited) or returns the bundle's digest (None without a
    policy, when nothing is checked)."""
    node_config, run_config = dict(context.node_config), dict(context.run_config)
    if not node_config.get("policy"):
        return None
    message_type, run_id = message.metadata.message_type, message.metadata.run_id
    try:
        digest = fab_digest(fab_content)
    except InputError as exc:
        raise refuse(
            node_config,
            run_config,
            message_type,
            run_id,
            Refusal("apps.require-approved", str(exc)),
            "site-runtime",
            None,
            log,
        ) from None
    secure = SECAGG_RECORD in message.content.config_records  # a SecAgg+ stage
    refusal = decide(node_config, run_config, message_type, digest, fab_name, secure)
    if refusal is not None:
        raise refuse(
            node_config, run_config, message_type, run_id, refusal, "site-runtime", digest, log
        )
    return digest


def check_installed(message: Any, context: Any, app_dir: Path, digest: str) -> None:
    """The installed copy Flower is about to import must be the bundle that was checked."""
    found = installed_digest(app_dir)
    if found != digest:
        refusal = Refusal(
            "apps.require-approved",
            f"the installed app {app_dir.name} ({found[:16]}) is not the checked "
            f"bundle ({digest[:16]})",
        )
        raise refuse(
            dict(context.node_config),
            dict(context.run_config),
            message.metadata.message_type,
            message.metadata.run_id,
            refusal,
            "site-runtime",
            found,
            log,
        )


def guard(runtime: Any, forget: bool = True) -> None:
    """Wrap Flower's ClientApp runtime module (`flwr.supernode.runtime.run_clientapp`, in this
    process only): `pull_task_input` keeps the task it pulled, and `install_from_fab` checks it
    first. A refusal raised there reaches Flower's own handler, which replies to the message
    with an error whose reason is the refusal. `forget`: drop the project's modules this check
    imported once the bundle is approved (`_forget_site_modules`; off only in tests, which
    share one interpreter)."""
    from flwr.common.config import get_project_dir

    pull: Callable[..., Any] = runtime.pull_task_input
    install: Callable[..., Any] = runtime.install_from_fab
    pulled: dict[str, Any] = {}

    def pull_task_input(client: Any) -> Any:
        pulled["task"] = task = pull(client)
        return task

    def install_from_fab(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pulled["task"]
        digest = check_task(message, context, fab_content, f"{run.fab_id} {run.fab_version}")
        installed = install(fab_content, *args, **kwargs)
        if digest is not None:
            check_installed(
                message, context, get_project_dir(run.fab_id, run.fab_version, fab.hash_str), digest
            )
        if forget:  # with or without a policy: the bundle runs as Flower would run it
            _forget_site_modules()
        return installed

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab


def _forget_site_modules() -> None:
    """Once the bundle is approved, the project's modules this check imported from the site's
    install are forgotten, so the approved bundle runs as Flower would run it (its own copy)."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("medmerge_core", "client")]:
        del sys.modules[name]


def main() -> None:
    """`medmerge-clientapp`: `flwr-clientapp` (same arguments) with the site's check."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    guard(run_clientapp)
    flwr_clientapp()


# ---------------------------------------------------------------------------- medmerge site


def app_digest(path: Path) -> tuple[str, str]:
    """(the app digest, Flower's FAB hash) of a FAB file, or of a project folder as `flwr run
    FOLDER` would bundle it (Flower's own build), so the digest is the one the node computes."""
    import hashlib

    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            fab = build_fab_from_disk(path)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: cannot be bundled as a Flower app ({exc})") from exc
    elif path.is_file():
        fab = path.read_bytes()
        fab_files(fab)  # a one-line error for a file that is no FAB
    else:
        raise InputError(f"{path}: no such FAB file or app folder")
    return files_digest(fab_files(fab)), hashlib.sha256(fab).hexdigest()


def site_command(args: argparse.Namespace) -> list[str]:
    """`medmerge site show | digest | approve | reject | revoke | pending`; the lines to print."""
    if args.site_command == "digest":
        digest, fab_hash = app_digest(args.app)
        return [digest] if args.quiet else [f"app digest {digest}", f"FAB sha256 {fab_hash}"]
    policy = load_policy(args.policy.resolve())
    if args.site_command == "show":
        lines = policy.describe()
        approvals = read_approvals(policy.approvals)
        lines.append(f"approvals: {len(approvals)}" + ("" if approvals else " (none yet)"))
        for entry in sorted(approvals.values(), key=lambda a: (a.status, a.updated)):
            lines.append(
                f"  {entry.status:<8} {entry.kind:<10} {entry.digest}  {entry.name}  "
                f"{entry.updated} by {entry.by}{'  ' + entry.note if entry.note else ''}"
            )
        return lines
    status = {
        "approve": "approved",
        "reject": "rejected",
        "revoke": "revoked",
        "pending": "pending",
    }[args.site_command]
    if (args.digest is None) == (args.app is None):
        raise InputError(f"site {args.site_command}: give a DIGEST or --app PATH (one of them)")
    digest = args.digest if args.digest is not None else app_digest(args.app)[0]
    kind = "app" if args.app is not None else args.kind
    entry = set_status(policy.approvals, digest, status, kind, args.name, args.note)
    return [f"{entry.status} {entry.kind} {entry.digest} in {policy.approvals}"]


def add_site_parser(sub: Any) -> None:
    """The `medmerge site` subcommands, kept with their code; `medmerge` finds them through the
    `medmerge.commands` entry point (pyproject.toml)."""
    site = sub.add_parser("site", help="a site's policy: show it, digest an app, approve apps")
    site.set_defaults(handler=site_command)
    ssub = site.add_subparsers(
        dest="site_command", required=True, metavar="{show,digest,approve,reject,revoke,pending}"
    )
    show = ssub.add_parser("show", help="what this node would accept: its policy and approvals")
    show.add_argument("--policy", type=Path, required=True, help="the node's policy.toml")
    digest = ssub.add_parser(
        "digest",
        help="the digest of an app: a .fab file or a project folder (as flwr run sends it)",
    )
    digest.add_argument("app", type=Path)
    digest.add_argument("--quiet", action="store_true", help="print the digest alone")
    for name, text in (
        ("approve", "approve an app (or run config) digest"),
        ("reject", "reject a digest"),
        ("revoke", "withdraw an approval"),
        ("pending", "put a digest up for review"),
    ):
        cmd = ssub.add_parser(name, help=text)
        cmd.add_argument("digest", nargs="?", default=None, help="64 hex digits")
        cmd.add_argument("--app", type=Path, default=None, help="a .fab file or project folder")
        cmd.add_argument("--policy", type=Path, required=True, help="the node's policy.toml")
        cmd.add_argument("--kind", choices=("app", "run-config"), default=None)
        cmd.add_argument("--name", default="", help="what it is (kept with the decision)")
        cmd.add_argument("--note", default="", help="why (kept with the decision)")
