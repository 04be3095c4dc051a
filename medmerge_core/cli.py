"""The `medmerge` command: `run CONFIG.yaml` and `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from medmerge_core.errors import InputError, NonFiniteLossError


def _variables(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"--set {pair}: expected NAME=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipelines of a YAML config (resumes a run folder)")
    run.add_argument("config", type=Path)
    run.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="fill ${NAME} in the config, e.g. --set data_root=/data",
    )
    run.add_argument("--no-progress", action="store_true")
    demo = sub.add_parser("demo", help="pretrain two sources and compare methods on synthetic data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke version (seconds)")
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.command == "run":
            from medmerge_core.config import load_config
            from medmerge_core.experiment import run_experiment
            from medmerge_core.report import detail_table, table1

            config = load_config(args.config, _variables(args.set))
            results = run_experiment(config, show_progress=not args.no_progress)
            target = str(config.data.get("task") or config.data.get("flag") or config.name)
            console.print(table1(target, [results]))
            console.print(detail_table([results]))
            console.print(f"run folder: {Path(config.output_dir) / config.name}")
        else:
            from medmerge_core.demo import DemoSettings, run_demo

            settings = DemoSettings.quick() if args.quick else DemoSettings()
            run_demo(args.out, settings, device=args.device, show_progress=not args.no_progress)
    except (InputError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
