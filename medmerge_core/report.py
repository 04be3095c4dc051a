"""Result tables (rich) shaped like the paper's Table 1, and the Fig. 2-style heatmap."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

PIPELINE_LABELS = {"ft": "FT", "lp_ft": "LP-FT", "average_ft": "Avg+FT", "medmerge": "MedMerge"}


def method_label(method: str) -> str:
    pipeline, _, source = method.partition(":")
    label = PIPELINE_LABELS.get(pipeline, pipeline)
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


def plot_coefficient_heatmap(
    layer_means: Mapping[str, np.ndarray], source_name: str, path: Path, title: str = ""
) -> Path:
    """Mean learnt coefficient of `source_name` per conv layer (rows: targets/runs), as Fig. 2.

    layer_means maps a row label to a [num_layers] array. Needs matplotlib (the `plots` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'medmerge-federation[plots]'"
        ) from exc
    labels = list(layer_means)
    data = np.stack([np.asarray(layer_means[k], dtype=float) for k in labels])
    fig, ax = plt.subplots(figsize=(max(8.0, data.shape[1] * 0.12), 1.0 + 0.5 * len(labels)))
    # Centre the colour scale on the initial value so that small moves stay visible.
    centre = float(np.median(data))
    spread = max(float(np.abs(data - centre).max()), 1e-3)
    image = ax.imshow(
        data, aspect="auto", cmap="coolwarm", vmin=centre - spread, vmax=centre + spread
    )
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("conv layer (input → output)")
    ax.set_title(title or f"mean learnt coefficient of '{source_name}' per layer")
    fig.colorbar(image, ax=ax, label=f"w ({source_name})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def layer_means_from_npz(path: Path, source_index: int = 0) -> np.ndarray:
    """Per-layer mean coefficient of one source from a run's coefficients.npz."""
    with np.load(path) as data:
        return data["layer_mean"][:, source_index]
