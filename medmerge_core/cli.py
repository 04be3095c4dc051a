"""The `medmerge` command: `run CONFIG.yaml`, `pretrain`, `demo`, `evaluate`, `export`,
`identity` (sign and show federation node identity tokens) and `site` (a site's policy and
app approvals; docs/site-policy.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from medmerge_core.errors import InputError, NonFiniteLossError
from medmerge_core.settings import CHECKPOINT_MINUTES


def _data_spec(pairs: list[str]) -> dict[str, Any]:
    """`--data KEY=VALUE` pairs as a data spec, each value read as YAML."""
    spec: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--data {pair}: expected KEY=VALUE")
        try:
            spec[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError(f"--data {pair}: invalid YAML value") from exc
    return spec


def _variables(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"{pair}: expected NAME=VALUE")
        out[key] = value
    return out


def _pretrain(args: argparse.Namespace, console: Console) -> None:
    from medmerge_core.data.registry import load_task, validate_spec
    from medmerge_core.models import load_source
    from medmerge_core.pretrain import pretrain_source
    from medmerge_core.settings import StageSettings
    from medmerge_core.train import FitOptions, Runtime

    spec = _data_spec(args.data)
    validate_spec(spec, where="--data")
    task = load_task(spec, image_size=args.image_size, seed=args.seed)
    init = load_source(args.init, args.arch, task.in_channels) if args.init else None
    existed = args.out.exists()
    metrics = pretrain_source(
        args.arch,
        task,
        args.out,
        StageSettings(args.epochs, args.lr),
        Runtime.detect(args.device),
        init=init,
        batch_size=args.batch_size,
        seed=args.seed,
        init_spec=args.init,
        data_spec={**spec, "image_size": args.image_size},
        reuse_unrecorded=False,
        options=FitOptions(checkpoint_minutes=args.checkpoint_minutes),
    )
    done = f"{args.out} exists, same settings: reused" if existed else f"saved {args.out}"
    console.print(
        f"{done}; test accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    )


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    from medmerge_core.io import atomic_write_json
    from medmerge_core.saved_model import (
        class_name_warning,
        evaluate_saved,
        evaluation_tables,
        load_saved_model,
    )

    if args.out is not None and args.out.is_dir():
        raise InputError(f"--out: {args.out} is a folder; give a .json file")
    saved = load_saved_model(args.model, args.method)
    report = evaluate_saved(saved, _data_spec(args.data), split=args.split, device=args.device)
    for table in evaluation_tables(report):
        console.print(table)
    warning = class_name_warning(saved, report)
    if warning:
        console.print(warning, markup=False, soft_wrap=True)
    if args.out is not None:
        atomic_write_json(args.out, report)
        console.print(f"wrote {args.out}", markup=False, soft_wrap=True)


def _export(args: argparse.Namespace, console: Console) -> None:
    from medmerge_core.export import check_out_dir, export_saved
    from medmerge_core.saved_model import load_saved_model

    check_out_dir(args.out)
    written, note = export_saved(load_saved_model(args.model, args.method), args.out)
    if note:
        console.print(note, markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(str(p) for p in written)}", markup=False, soft_wrap=True)


def _identity(args: argparse.Namespace, console: Console) -> None:
    """`identity sign` writes an operator-signed token; `identity show` prints one's contents."""
    from medmerge_core.federation.identity import (
        IdentityError,
        inspect_token,
        read_token,
        sign_identity,
        verify_token,
    )
    from medmerge_core.io import atomic_write_text

    if args.identity_command == "sign":
        if args.out.is_dir():
            raise InputError(f"--out: {args.out} is a folder; give the token file to write")
        token = sign_identity(args.operator_key, args.node_key, args.name, args.role)
        atomic_write_text(args.out, token + "\n")
        identity = inspect_token(token)
        console.print(
            f"wrote {args.out}: {identity.name} ({identity.role}), key {identity.fingerprint}",
            markup=False,
            soft_wrap=True,
        )
        return
    token = read_token(args.file)
    if args.operator_pub is None:
        identity, checked = inspect_token(token), "not checked (give --operator-pub)"
    else:
        try:
            line = args.operator_pub.read_text(encoding="ascii")
        except (OSError, UnicodeError) as exc:
            raise IdentityError(f"--operator-pub: cannot read {args.operator_pub}") from exc
        identity, checked = verify_token(token, line), "valid"
    key_type = identity.public_key.split()[0]
    for label, value in (
        ("name", identity.name),
        ("role", identity.role),
        ("key", f"{key_type} {identity.fingerprint}"),
        ("operator signature", checked),
    ):
        console.print(f"{label}: {value}", markup=False, soft_wrap=True)


def _identity_parser(sub: Any) -> None:
    ident = sub.add_parser("identity", help="sign or show a federation node's identity token")
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="{sign,show}")
    sign = isub.add_parser(
        "sign", help="sign a hospital's name, role and SuperNode public key (operator only)"
    )
    sign.add_argument(
        "--operator-key", type=Path, required=True, help="the operator's Ed25519 private key"
    )
    sign.add_argument(
        "--node-key", type=Path, required=True, help="the hospital's SuperNode public key (.pub)"
    )
    sign.add_argument("--name", required=True, help="the node's name (a safe file name)")
    sign.add_argument("--role", required=True, help="institution, coordinator or site")
    sign.add_argument("--out", type=Path, required=True, help="the token file to write")
    show = isub.add_parser("show", help="print a token's name, role and key fingerprint")
    show.add_argument("file", type=Path)
    show.add_argument(
        "--operator-pub",
        type=Path,
        default=None,
        help="the operator's public key file: also check the token's signature",
    )


def _data_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="KEY=VALUE",
        help=f"data spec entries, {example}",
    )


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("--method", default=None, help="which method's model of a run folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipelines of a YAML config (resumes a run folder)")
    run.add_argument("config", type=Path)
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fill ${NAME} in the config (--set data_root=/data) or override a config key, "
        "the value read as YAML (--set ft.epochs=5 --set merge.steps=100)",
    )
    run.add_argument("--no-progress", action="store_true")
    pre = sub.add_parser("pretrain", help="pretrain a source backbone on a dataset (resumable)")
    pre.add_argument("--arch", required=True)
    _data_argument(pre, "e.g. --data format=ham10000 --data root=/d/HAM")
    pre.add_argument("--init", default=None, help="source spec to start from (e.g. an enum)")
    pre.add_argument("--image-size", type=int, default=224)
    pre.add_argument("--epochs", type=int, default=10)
    pre.add_argument("--lr", type=float, default=1e-4)
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="auto")
    pre.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=CHECKPOINT_MINUTES,
        help="training time between resume checkpoints (0: after every epoch)",
    )
    pre.add_argument("--out", type=Path, required=True)
    demo = sub.add_parser("demo", help="pretrain two sources and compare methods on synthetic data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke version (seconds)")
    demo.add_argument(
        "--imagenet", action="store_true", help="the ImageNet EfficientNet-Lite0 as generic source"
    )
    demo.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser(
        "evaluate", help="score a saved model on a data spec (its training preprocessing)"
    )
    _model_arguments(ev)
    _data_argument(ev, "as for pretrain (--data format=medmnist --data flag=breastmnist)")
    ev.add_argument("--split", default="test", choices=("test", "val", "train", "all"))
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", type=Path, default=None, help="also write the report (JSON)")
    ex = sub.add_parser(
        "export", help="write model.safetensors + model.json (+ model.onnx) for use elsewhere"
    )
    _model_arguments(ex)
    ex.add_argument("--out", type=Path, required=True, help="folder to write into")
    _identity_parser(sub)
    _plugin_parsers(sub)
    return parser


COMMAND_PLUGINS = "medmerge.commands"


def _plugin_parsers(sub: Any) -> None:
    """Subcommands that other installed packages add (`medmerge site ...` from the site
    runtime, `client.site_runtime`): the core names no Flower-side package. Each entry point
    adds its parser and sets `handler`, a function of the arguments returning lines to print."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=COMMAND_PLUGINS):
        entry.load()(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "run":
            from medmerge_core.experiment.config import load_config
            from medmerge_core.experiment.run_folder import ExperimentRun
            from medmerge_core.experiment.runner import run_experiment
            from medmerge_core.report import detail_table, table1

            config = load_config(args.config, _variables(args.set))
            results = run_experiment(config, show_progress=not args.no_progress)
            target = str(config.data.get("task") or config.data.get("flag") or config.name)
            console.print(table1(target, [results]))
            console.print(detail_table([results]))
            console.print(f"run folder: {ExperimentRun.of(config).dir}")
        elif args.command == "pretrain":
            _pretrain(args, console)
        elif args.command == "evaluate":
            _evaluate(args, console)
        elif args.command == "export":
            _export(args, console)
        elif args.command == "identity":
            _identity(args, console)
        elif handler := getattr(args, "handler", None):
            for line in handler(args):
                print(line)
        else:
            from medmerge_core.experiment.demo import DemoSettings, run_demo

            if args.imagenet:
                settings = DemoSettings.imagenet(quick=args.quick)
            else:
                settings = DemoSettings.quick() if args.quick else DemoSettings()
            run_demo(args.out, settings, device=args.device, show_progress=not args.no_progress)
    except (InputError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        path = exc.filename if exc.filename is not None else exc
        print(f"error: {path}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
