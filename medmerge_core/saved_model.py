"""A trained model outside its run: find it, read it with its preprocessing, score it.

A model is named by a run folder (`medmerge run` / `medmerge demo`, with a method id) or by a
checkpoint file. Its preprocessing (image size, channels, normalisation) is read from the
checkpoint, where a run folder (`ExperimentRun.save_method`, the one place final models are
saved) records it (`ExperimentRun.usage_record`); older checkpoints fall back to their run
folder's config.yaml, to a pretrained source's recorded settings, and to the project's only
normalisation (ImageNet statistics; their mean for grayscale), so nothing is guessed. A run
folder is read through `ExperimentRun`.

`medmerge evaluate` scores it here (`evaluate_saved`); `medmerge export` writes it out
(export.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from rich.text import Text
from torch import nn

from medmerge_core.data.base import (
    ArraySplit,
    BatchLoader,
    TaskData,
    normalization,
    preprocessing_record,
)
from medmerge_core.errors import InputError
from medmerge_core.experiment.run_folder import ExperimentRun, file_stem
from medmerge_core.io import load_torch_file
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

SPLIT_CHOICES = ("test", "val", "train", "all")


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
    target = Path(target)
    if target.is_file():
        if method is not None:
            raise InputError(f"--method: {target} is a checkpoint file, not a run folder")
        run = ExperimentRun.holding(target)
        return target, run.dir if run is not None else None, None
    if not target.is_dir():
        raise InputError(f"{target}: no such run folder or checkpoint file")
    run = ExperimentRun(target)
    ids = run.models()
    if not ids:
        raise InputError(f"{target}: not a run folder with models (no checkpoints/*.pt)")
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
    return run.checkpoint_path(chosen), target, chosen


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
    run = ExperimentRun(run_dir) if run_dir is not None else None
    config = run.config() if run is not None else {}
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
    if not class_names and run is not None and method_id is not None:
        class_names = run.classes(method_id)
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # a record of another task: the head is the truth
    multilabel = meta.get("multilabel", task.get("multilabel"))
    software = meta.get("software") or (run.software() if run is not None else None)
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
