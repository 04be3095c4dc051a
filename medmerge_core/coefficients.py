"""What a learned merge says kernel by kernel: the per-layer summary written beside every
probe (coefficient_summary.json) and the preferred source the figure colours by. Apart from
merge.py, which holds the arithmetic, because only reports read it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def preferred_source(flat: np.ndarray, margin: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """For [d, n] coefficients: each kernel's largest source, and whether it is a tie (no
    source ahead of the others by more than `margin`)."""
    ordered = np.sort(flat, axis=0)
    ties = ordered[-1] - ordered[-2] <= margin
    return flat.argmax(0), ties


def coefficient_summary(arrays: Mapping[str, np.ndarray]) -> list[dict[str, object]]:
    """Per merged layer (weights only): count, mean / std / min / max per source, and what the
    single kernels did, which layer means hide (kernels move both ways):

    - `prefers`: per source, the share of kernels in which its coefficient is the largest by
      more than 1e-6; `ties`: the share where none is (e.g. kernels that never moved);
    - `movement`: quantiles (q50, q90, q99, max) of max_i |c_i - 1/d| over the kernels (at
      d = 2, |w - 0.5|).
    """
    rows = []
    for key, coef in arrays.items():
        if not key.endswith(".weight"):
            continue
        flat = coef.reshape(coef.shape[0], -1)
        d = flat.shape[0]
        winner, ties = preferred_source(flat)
        movement = np.abs(flat - 1.0 / d).max(0)
        rows.append(
            {
                "layer": key.removesuffix(".weight"),
                "coefficients": int(flat.shape[1]),
                "mean": [float(v) for v in flat.mean(1)],
                "std": [float(v) for v in flat.std(1)],
                "min": [float(v) for v in flat.min(1)],
                "max": [float(v) for v in flat.max(1)],
                "prefers": [float(np.mean((winner == i) & ~ties)) for i in range(d)],
                "ties": float(np.mean(ties)),
                "movement": {
                    name: float(np.quantile(movement, q))
                    for name, q in (("q50", 0.5), ("q90", 0.9), ("q99", 0.99), ("max", 1.0))
                },
            }
        )
    return rows
