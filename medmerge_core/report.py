"""Result tables (rich) shaped like the paper's Table 1, and the Fig. 2-style heatmap."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from medmerge_core.coefficients import preferred_source
from medmerge_core.experiment.pipelines import REGISTRY
from medmerge_core.io import atomic_write


def method_label(method: str) -> str:
    """A method id as tables and figures name it: 'lp_ft:a' -> 'LP-FT a' (the registry's
    label; an unregistered pipeline by its id)."""
    pipeline, _, source = method.partition(":")
    label = REGISTRY[pipeline].label if pipeline in REGISTRY else pipeline
    return f"{label} {source}" if source else label


def _cell(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f}±{np.std(values):.3f}"


def table1(target: str, runs: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    """One row per target, one column per method: 'accuracy / macro-F1' (mean±std over runs)."""
    methods = list(runs[0])
    table = Table(title=title or "Test accuracy / macro-F1 (paper Table 1 layout)")
    table.add_column("target")
    for method in methods:
        table.add_column(method_label(method), justify="center")
    cells = []
    for method in methods:
        acc = [r[method]["test"]["accuracy"] for r in runs if method in r]
        f1 = [r[method]["test"]["macro_f1"] for r in runs if method in r]
        cells.append(f"{_cell(acc)} / {_cell(f1)}")
    table.add_row(target, *cells)
    return table


def detail_table(runs: Sequence[Mapping[str, Any]], title: str = "Per method") -> Table:
    """Accuracy, macro-F1, AUROC, wall time and LP/probe stage time per method."""
    table = Table(title=title)
    for column in ("method", "accuracy", "macro-F1", "AUROC", "wall s", "LP/probe s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in runs[0]:
        rows = [r[method] for r in runs if method in r]
        first_stage = [
            row["stages"].get("probe", row["stages"].get("lp", {})).get("seconds", float("nan"))
            for row in rows
        ]
        table.add_row(
            method_label(method),
            _cell([row["test"]["accuracy"] for row in rows]),
            _cell([row["test"]["macro_f1"] for row in rows]),
            _cell([row["test"]["auroc"] for row in rows]),
            _cell([row["seconds"] for row in rows]),
            _cell(first_stage),
        )
    return table


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'medmerge-federation[plots]'"
        ) from exc
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write atomically and close a figure: through io.atomic_write (a unique
    temporary file, fsync, os.replace), so it gets the mode every other run file gets."""
    fig.tight_layout()
    path = Path(path)
    try:
        kind = path.suffix.lstrip(".") or "png"
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format=kind))
    finally:
        pyplot().close(fig)
    return path


def _layer_ticks(ax: Any, names: Sequence[str]) -> None:
    """Every layer's name on the x axis, thinned to at most 60 labels."""
    step = max(1, math.ceil(len(names) / 60))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)


def plot_coefficient_heatmap(
    layer_means: Mapping[str, np.ndarray],
    source_name: str,
    path: Path,
    title: str = "",
    layer_names: Sequence[str] | None = None,
    uniform: float = 0.5,
) -> Path:
    """Mean learnt coefficient of `source_name` per conv layer (rows: targets/runs), as Fig. 2.

    The colour scale is symmetric around the uniform value 1/d and never narrower than
    +-0.01, so a tiny move does not look saturated. Needs matplotlib (the `plots` extra).
    """
    plt = pyplot()
    labels = list(layer_means)
    data = np.stack([np.asarray(layer_means[k], dtype=float) for k in labels])
    fig, ax = plt.subplots(figsize=(max(8.0, data.shape[1] * 0.14), 2.2 + 0.5 * len(labels)))
    spread = max(float(np.abs(data - uniform).max()), 0.01)
    image = ax.imshow(
        data, aspect="auto", cmap="coolwarm", vmin=uniform - spread, vmax=uniform + spread
    )
    ax.set_yticks(range(len(labels)), labels)
    if layer_names is not None:
        _layer_ticks(ax, layer_names)
    ax.set_xlabel("conv layer (input → output)")
    ax.set_title(title or f"mean learnt coefficient of '{source_name}' per layer")
    fig.colorbar(image, ax=ax, label=f"mean w ({source_name}); uniform = {uniform:.3g}")
    return save_figure(fig, path)


def plot_merge_coefficients(
    coefficients: Mapping[str, np.ndarray], source_names: Sequence[str], path: Path
) -> Path:
    """What one probe learned, kernel by kernel: for each merged layer, every kernel's
    coefficient of the first source minus 1/d (dots) with the layer mean (line), on a symmetric
    scale; below, the share of kernels that prefer each source."""
    plt = pyplot()
    layers = [k for k in coefficients if k.endswith(".weight")]
    names = [k.removesuffix(".weight") for k in layers]
    d = len(source_names)
    flat = [np.asarray(coefficients[k]).reshape(d, -1) for k in layers]
    rng = np.random.default_rng(0)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(max(9.0, len(layers) * 0.16), 7.5),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    deviations = [f[0] - 1.0 / d for f in flat]
    for i, dev in enumerate(deviations):
        shown = dev if dev.size <= 2000 else rng.choice(dev, 2000, replace=False)
        x = i + rng.uniform(-0.3, 0.3, shown.size)
        top.scatter(x, shown, s=2, alpha=0.35, color="tab:blue", linewidths=0)
    top.plot(range(len(layers)), [dev.mean() for dev in deviations], "k.-", lw=1, label="mean")
    spread = max(max(float(np.abs(dev).max()) for dev in deviations), 1e-3) * 1.05
    top.set_ylim(-spread, spread)
    top.axhline(0, color="gray", lw=0.6)
    top.set_ylabel(f"w({source_names[0]}) - 1/{d}")
    top.set_title(f"MedMerge coefficients per kernel; above 0 favours '{source_names[0]}'")
    top.legend(loc="upper right", fontsize=8)
    preferred = [preferred_source(f) for f in flat]
    stacked = np.zeros(len(layers))
    for index, source in enumerate([*source_names, "tie"]):
        share = np.array(
            [
                np.mean(ties) if source == "tie" else np.mean((winner == index) & ~ties)
                for winner, ties in preferred
            ]
        )
        color = "lightgray" if source == "tie" else None
        bottom.bar(range(len(layers)), share, bottom=stacked, label=source, width=0.8, color=color)
        stacked += share
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("kernels preferring")
    bottom.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    _layer_ticks(bottom, names)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """A test set's confusion matrix (rows: true class, columns: predicted) twice: as counts,
    and row-normalised, whose diagonal is each class's sensitivity; class names (and each true
    class's support) on the axes, values in the cells up to 20 classes."""
    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    support = counts.sum(1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    names = [str(c) for c in class_names]
    side = max(3.5, 0.45 * k + 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side))
    panels = (
        (axes[0], counts, "counts", "images", lambda v: f"{int(v)}"),
        (axes[1], shares, "row-normalised (diagonal: sensitivity)", "share of the true class",
         lambda v: f"{v:.2f}"),
    )  # fmt: skip
    for ax, values, panel_title, label, text in panels:
        top = max(float(values.max()), 1e-9) if values is counts else 1.0
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        rows = names if values is counts else [f"{n} (n={int(s)})" for n, s in zip(
            names, support[:, 0], strict=True)]  # fmt: skip
        ax.set_yticks(range(k), rows, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(panel_title, fontsize=10)
        if k <= 20:
            for (row, col), value in np.ndenumerate(values):
                shown = text(value) if values is counts or support[row, 0] else "-"
                ax.text(col, row, shown, ha="center", va="center", fontsize=7,
                        color="white" if value > top / 2 else "black")  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def layer_means_from_npz(path: Path, source_index: int = 0) -> np.ndarray:
    """Per-layer mean coefficient of one source from a run's coefficients.npz."""
    with np.load(path) as data:
        return data["layer_mean"][:, source_index]
