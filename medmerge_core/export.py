"""Using a trained model outside its run: score it on any data spec, or export it.

A model is named by a run folder (`medmerge run` / `medmerge demo`, with a method id) or by a
checkpoint file. Its preprocessing (image size, channels, normalisation) is read from the
checkpoint, where experiment.run_experiment, the one place final models are saved, records it
(`usage_record`); older checkpoints fall back to their run folder's config.yaml, to a pretrained
source's recorded settings, and to the project's only normalisation (ImageNet statistics; their
mean for grayscale), so nothing is guessed.

The export is framework-neutral: `model.safetensors` (the state dict, keys exactly as
`build_model` / torchvision name them), `model.json` (everything needed to rebuild the model and
feed it) and `model.onnx` when the `onnx` package is importable.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.table import Table
from rich.text import Text
from torch import nn

from medmerge_core.cifar_resnet import CIFAR_ARCHS
from medmerge_core.data.base import (
    ArraySplit,
    BatchLoader,
    TaskData,
    normalization,
    preprocessing_record,
)
from medmerge_core.errors import InputError
from medmerge_core.io import atomic_write, atomic_write_json, load_torch_file, read_jsonl
from medmerge_core.metrics import clinical_report
from medmerge_core.models import (
    StateDict,
    build_model,
    head_name,
    identify_arch,
    stem_conv_name,
    unwrap_checkpoint,
)
from medmerge_core.train import EVAL_BATCH_SIZE, Runtime, predict, probabilities, scored

EXPORT_FORMAT = "medmerge-export/1"
ONNX_OPSET = 17
SPLIT_CHOICES = ("test", "val", "train", "all")


def usage_record(task: TaskData, run_dir: Path | None = None) -> dict[str, Any]:
    """The checkpoint fields a user of a final model needs: its preprocessing, its classes and
    the software that made it (the run's last environment.jsonl entry)."""
    environment = read_jsonl(Path(run_dir) / "environment.jsonl") if run_dir else []
    return {
        "preprocessing": preprocessing_record(task.image_size, task.in_channels),
        "class_names": [str(c) for c in task.class_names],
        "multilabel": bool(task.multilabel),
        "software": _software(environment[-1]) if environment else None,
    }


def _software(entry: Mapping[str, Any]) -> dict[str, Any]:
    packages = entry.get("packages") or {}
    return {
        "medmerge-federation": packages.get("medmerge-federation"),
        "git_commit": entry.get("git_commit"),
        "torch": packages.get("torch"),
        "torchvision": packages.get("torchvision"),
    }


@dataclass(frozen=True)
class SavedModel:
    """A trained model's weights with everything needed to feed it and read its output."""

    checkpoint: Path
    arch: str
    state_dict: StateDict
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    multilabel: bool | None = None
    method: str | None = None
    run_dir: Path | None = None
    seed: int = 0  # the run's data seed, so a random split is the one the run used
    software: dict[str, Any] | None = None

    def build(self) -> nn.Module:
        """The model with its weights, in eval mode on the CPU."""
        with torch.random.fork_rng(devices=[]):  # no side effect on the caller's RNG
            model = build_model(self.arch, self.num_classes, self.in_channels)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise InputError(
                f"{self.checkpoint}: the weights do not fit {self.arch} ({first})"
            ) from exc
        return model.eval()

    def preprocessing(self) -> dict[str, Any]:
        return preprocessing_record(self.image_size, self.in_channels)


# -- finding and reading a model ----------------------------------------------------------


def resolve_checkpoint(target: Path, method: str | None) -> tuple[Path, Path | None, str | None]:
    """(checkpoint file, its run folder or None, method id or None) for RUN_OR_CHECKPOINT."""
    from medmerge_core.experiment import file_stem, load_results  # experiment imports this

    target = Path(target)
    if target.is_file():
        if method is not None:
            raise InputError(f"--method: {target} is a checkpoint file, not a run folder")
        parent = target.parent
        in_run = parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file()
        return target, parent.parent if in_run else None, None
    if not target.is_dir():
        raise InputError(f"{target}: no such run folder or checkpoint file")
    folder = target / "checkpoints"
    stems = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not stems:
        raise InputError(f"{target}: not a run folder with models (no checkpoints/*.pt)")
    try:
        recorded = list(load_results(target))
    except (OSError, ValueError):
        recorded = []
    ids = [m for m in recorded if file_stem(m) in stems]
    ids += [s for s in stems if s not in {file_stem(m) for m in ids}]
    available = ", ".join(ids)
    if method is None:
        if len(ids) > 1:
            raise InputError(f"--method: {target} has {len(ids)} models; pick one of {available}")
        chosen = ids[0]
    else:
        exact = [m for m in ids if method in (m, file_stem(m))]
        matches = exact or [m for m in ids if m.partition(":")[0] == method]
        if not matches:
            raise InputError(f"--method: no model '{method}' in {target}; available: {available}")
        if len(matches) > 1:
            raise InputError(
                f"--method: '{method}' is ambiguous in {target}; pick one of {', '.join(matches)}"
            )
        chosen = matches[0]
    return folder / f"{file_stem(chosen)}.pt", target, chosen


def load_saved_model(target: Path, method: str | None = None) -> SavedModel:
    """The model RUN_OR_CHECKPOINT names, its preprocessing found (never guessed), or a
    one-line InputError naming the file or field."""
    path, run_dir, method_id = resolve_checkpoint(target, method)
    obj = load_torch_file(path, "cannot load checkpoint")
    state, arch = unwrap_checkpoint(obj, path)
    meta: Mapping[str, Any] = obj if isinstance(obj, Mapping) else {}
    arch = arch or identify_arch(state)
    if arch is None:
        raise InputError(f"{path}: records no 'arch' and its keys match no known architecture")
    with torch.device("meta"):
        reference = build_model(arch, 2, 3)
    head, stem = head_name(reference) + ".weight", stem_conv_name(reference) + ".weight"
    for key in (head, stem):
        if key not in state:
            raise InputError(f"{path}: not a full {arch} model ('{key}' missing)")
    num_classes, in_channels = int(state[head].shape[0]), int(state[stem].shape[1])
    config = _run_config(run_dir) if run_dir is not None else {}
    settings = meta.get("settings") if isinstance(meta.get("settings"), Mapping) else {}
    task = settings.get("task") if isinstance(settings.get("task"), Mapping) else {}
    pre = meta.get("preprocessing") if isinstance(meta.get("preprocessing"), Mapping) else {}
    image_size = pre.get("image_size") or task.get("image_size")
    image_size = image_size or (config.get("model") or {}).get("image_size")
    if not isinstance(image_size, int) or image_size < 1:
        raise InputError(
            f"{path}: records no image size (an older checkpoint outside its run folder); use "
            "the run folder, or a checkpoint written by `medmerge run` or `medmerge pretrain`"
        )
    recorded_channels = pre.get("in_channels", task.get("in_channels", in_channels))
    if recorded_channels != in_channels:
        raise InputError(
            f"{path}: records {recorded_channels} input channels, its stem has {in_channels}"
        )
    default_mean, default_std = normalization(in_channels)
    class_names = meta.get("class_names") or task.get("classes")
    class_names = class_names or _results_classes(run_dir, method_id)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # a record of another task: the head is the truth
    multilabel = meta.get("multilabel", task.get("multilabel"))
    software = meta.get("software") or (_run_software(run_dir) if run_dir else None)
    return SavedModel(
        checkpoint=path,
        arch=arch,
        state_dict=state,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=tuple(float(v) for v in pre.get("mean", default_mean)),
        std=tuple(float(v) for v in pre.get("std", default_std)),
        class_names=tuple(str(c) for c in class_names) if class_names else None,
        multilabel=multilabel if isinstance(multilabel, bool) else None,
        method=method_id or (meta.get("method") if isinstance(meta.get("method"), str) else None),
        run_dir=run_dir,
        seed=int(config.get("seed", settings.get("seed", 0)) or 0),
        software=software,
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML ({type(exc).__name__})") from exc
    return data if isinstance(data, dict) else {}


def _results_classes(run_dir: Path | None, method: str | None) -> list[str] | None:
    """Class names from the run's clinical report (written since before checkpoints had them)."""
    if run_dir is None or method is None:
        return None
    from medmerge_core.experiment import load_results  # experiment imports this module

    try:
        clinical = load_results(run_dir).get(method, {}).get("clinical") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return clinical.get("classes")


def _run_software(run_dir: Path) -> dict[str, Any] | None:
    environment = read_jsonl(run_dir / "environment.jsonl")
    return _software(environment[-1]) if environment else None


# -- evaluate -----------------------------------------------------------------------------


def evaluate_saved(
    saved: SavedModel,
    spec: Mapping[str, Any],
    *,
    split: str = "test",
    device: str = "auto",
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Score the model on one split of a data spec, preprocessed as it was trained.

    The data is decoded at the model's image size and converted to its channels (formats that
    decode files are asked for that colour; arrays are converted as PIL's "L" does), then
    normalised as in training. Returns the JSON report: metrics, and for single-label models
    the clinical report (per-class sensitivity / specificity, bootstrap CIs)."""
    from medmerge_core.data.registry import FORMAT_OPTIONS, load_task, validate_spec

    if split not in SPLIT_CHOICES:
        raise InputError(f"--split: unknown '{split}'; expected one of {', '.join(SPLIT_CHOICES)}")
    fmt, _ = validate_spec(spec, where="--data")
    spec = dict(spec)
    if "color" in FORMAT_OPTIONS[fmt] and spec.get("color") is None:
        spec["color"] = "gray" if saved.in_channels == 1 else "rgb"
    runtime = Runtime.detect(device)
    task = load_task(spec, image_size=saved.image_size, seed=saved.seed)
    images = _pick_split(task, split)
    if len(images) == 0:
        raise InputError(f"--data: the {split} split of '{task.name}' has no images")
    _check_task(saved, task)
    images = replace(images, images=to_channels(images.images, saved.in_channels))
    model = runtime.model(saved.build())
    logits, labels = predict(model, BatchLoader(images, EVAL_BATCH_SIZE), runtime)
    report: dict[str, Any] = {
        "model": {
            "checkpoint": str(saved.checkpoint),
            "run_dir": str(saved.run_dir) if saved.run_dir else None,
            "method": saved.method,
            "arch": saved.arch,
            "class_names": list(saved.class_names) if saved.class_names else None,
        },
        "data": dict(spec),
        "task": task.name,
        "split": split,
        "images": len(images),
        "preprocessing": saved.preprocessing(),
        "metrics": scored(logits, labels, task.multilabel),
    }
    if not task.multilabel:
        probs = probabilities(logits, task.multilabel)
        report["clinical"] = clinical_report(probs, labels, task.class_names, n_boot=n_boot)
    return json.loads(json.dumps(report, default=str))  # plain JSON: Paths become text


def _pick_split(task: TaskData, split: str) -> ArraySplit:
    if split != "all":
        return task.splits()[split]
    parts = list(task.splits().values())
    return ArraySplit(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )


def _check_task(saved: SavedModel, task: TaskData) -> None:
    """The data must have the model's classes (by count; names are compared when known)."""
    if task.num_classes != saved.num_classes:
        raise InputError(
            f"--data: '{task.name}' has {task.num_classes} classes "
            f"({', '.join(task.class_names)}), the model {saved.num_classes}"
        )
    if saved.multilabel is not None and saved.multilabel != task.multilabel:
        kinds = {True: "multi-label", False: "single-label"}
        raise InputError(
            f"--data: '{task.name}' is {kinds[task.multilabel]}, the model "
            f"{kinds[saved.multilabel]}"
        )


def class_name_warning(saved: SavedModel, report: Mapping[str, Any]) -> str | None:
    """A line to print when the data's class names differ from the model's (scored by index)."""
    data_names = (report.get("clinical") or {}).get("classes")
    if saved.class_names and data_names and list(saved.class_names) != list(data_names):
        return (
            f"warning: class names differ (model: {', '.join(saved.class_names)}; data: "
            f"{', '.join(data_names)}); scored by class index"
        )
    return None


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N,H,W] (gray) or [N,H,W,3] converted to `channels`, the way PIL converts
    ("L": ITU-R 601-2 luma in fixed point; "RGB": the gray value repeated)."""
    have = 1 if images.ndim == 3 else int(images.shape[-1])
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(np.asarray(images)[..., None], 3, axis=-1)
    if have == 3 and channels == 1:
        rgb = np.asarray(images).astype(np.uint32)
        luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
        return (luma >> 16).astype(np.uint8)
    raise InputError(f"--data: images have {have} channels, the model takes {channels}")


def evaluation_tables(report: Mapping[str, Any]) -> list[Table]:
    """The report as rich tables: the metrics with 95% CIs, then per-class rates."""
    model = report["model"]
    name = model["method"] or Path(model["checkpoint"]).name
    title = f"{name} ({model['arch']}) on {report['task']}, {report['split']} split, " + (
        f"{report['images']} images"
    )
    metrics = Table(title=Text(title))  # Text: names are shown as written, never as markup
    for column in ("metric", "value", "95% CI"):
        metrics.add_column(column, justify="left" if column == "metric" else "right")
    ci95 = (report.get("clinical") or {}).get("ci95") or {}
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("auroc", "AUROC")):
        interval = ci95.get(key)
        shown = f"{interval[0]:.3f} to {interval[1]:.3f}" if interval else "n/a"
        metrics.add_row(label, _number(report["metrics"].get(key)), shown)
    tables = [metrics]
    per_class = (report.get("clinical") or {}).get("per_class")
    if per_class:
        rates = Table(title="Per class (one vs rest)")
        for column in ("class", "support", "sensitivity", "specificity", "PPV", "NPV"):
            rates.add_column(column, justify="left" if column == "class" else "right")
        for cls, row in per_class.items():
            rates.add_row(
                Text(cls),
                str(row["support"]),
                *(_number(row[k]) for k in ("sensitivity", "specificity", "ppv", "npv")),
            )
        tables.append(rates)
    return tables


def _number(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


# -- export -------------------------------------------------------------------------------


def model_description(saved: SavedModel, model: nn.Module, onnx_file: str | None) -> dict[str, Any]:
    """model.json: what plain torch / torchvision code needs to rebuild and feed the model
    (`model` is `saved.build()`)."""
    stem_name = stem_conv_name(model)
    stem: nn.Conv2d = model.get_submodule(stem_name)
    cifar = saved.arch in CIFAR_ARCHS
    software = dict(saved.software) if saved.software else None
    return {
        "format": EXPORT_FORMAT,
        "arch": saved.arch,
        "builder": "medmerge_core.cifar_resnet.cifar_resnet(arch, num_classes, in_channels)"
        if cifar
        else "torchvision.models.get_model(arch, num_classes=num_classes)",
        "num_classes": saved.num_classes,
        "class_names": list(saved.class_names) if saved.class_names else None,
        "multilabel": saved.multilabel,
        "output": _output_text(saved.multilabel),
        "in_channels": saved.in_channels,
        "image_size": saved.image_size,
        "mean": list(saved.mean),
        "std": list(saved.std),
        "preprocessing": saved.preprocessing(),
        "state_dict": {
            "file": "model.safetensors",
            "convention": "keys and shapes of the builder's model (no 'module.' prefix); the "
            "head is a new Linear with num_classes outputs; with in_channels != 3 the stem conv "
            "takes in_channels (rebuild it from 'stem')",
            "head": head_name(model),
            "keys": len(saved.state_dict),
        },
        "stem": {
            "module": stem_name,
            "conv2d": {
                "in_channels": stem.in_channels,
                "out_channels": stem.out_channels,
                "kernel_size": list(stem.kernel_size),
                "stride": list(stem.stride),
                "padding": stem.padding if isinstance(stem.padding, str) else list(stem.padding),
                "dilation": list(stem.dilation),
                "groups": stem.groups,
                "bias": stem.bias is not None,
            },
        },
        "onnx": None
        if onnx_file is None
        else {
            "file": onnx_file,
            "input": "input",
            "output": "logits",
            "opset": ONNX_OPSET,
            "dynamic": "batch",
        },
        "source": {
            "checkpoint": str(saved.checkpoint),
            "run_dir": str(saved.run_dir) if saved.run_dir else None,
            "method": saved.method,
        },
        "software": software,
        "exported_by": {"medmerge-federation": _version("medmerge-federation")},
    }


def _output_text(multilabel: bool | None) -> str:
    if multilabel is None:
        return "logits; softmax (single-label) or sigmoid per label (multi-label)"
    return "logits; sigmoid per label" if multilabel else "logits; softmax over classes"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def onnx_available() -> bool:
    return find_spec("onnx") is not None


def onnx_bytes(model: nn.Module, in_channels: int, image_size: int) -> bytes:
    """The model as ONNX (batch axis dynamic), by torch's TorchScript-based exporter: the
    torch.export-based default needs onnxscript, which the `export` extra does not install."""
    example = torch.zeros(1, in_channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own deprecation
        # cifar_resnet's strided shortcut slice: exported as a Slice op, just not pre-folded
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a folder")


def export_saved(saved: SavedModel, out: Path) -> tuple[list[Path], str | None]:
    """Write model.safetensors, model.json and (with onnx) model.onnx into `out`, each
    atomically, after all three were produced in memory. Returns (written, a note or None)."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    check_out_dir(out)
    model = saved.build()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = safetensors_bytes(state, metadata={"format": "pt", "arch": saved.arch})
    onnx, note = None, None
    if not onnx_available():
        note = (
            "onnx is not installed: skipped model.onnx (pip install 'medmerge-federation[export]')"
        )
    else:
        try:
            onnx = onnx_bytes(model, saved.in_channels, saved.image_size)
        except Exception as exc:  # an operator the exporter lacks: the other files still help
            reason = " ".join(str(exc).split("[Caused by")[0].split())
            note = (
                f"skipped model.onnx: torch's ONNX exporter failed ({type(exc).__name__}: {reason})"
            )
    description = model_description(saved, model, "model.onnx" if onnx is not None else None)
    written = [out / "model.safetensors", out / "model.json"]
    atomic_write(written[0], lambda f: f.write(weights))
    atomic_write_json(written[1], description)
    if onnx is not None:
        written.append(out / "model.onnx")
        atomic_write(written[2], lambda f: f.write(onnx))
    else:
        (out / "model.onnx").unlink(missing_ok=True)  # never leave a stale model beside it
    return written, note
