"""The run folder: phase outputs, per-round checkpoint, metrics, and their console view."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig
from medmerge_core.federation.transport import ModelInfo
from medmerge_core.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    load_torch_file,
)
from medmerge_core.models import StateDict
from medmerge_core.probe import write_merge_report
from medmerge_core.settings import differences


class FederationRun:
    """Files of one federated run; every write is atomic, so a crash never loses a round.

    config.json (fingerprint), sources.pt (phase 1), probe-checkpoint.pt (a federated probe's
    state after every round), merged.pt + the probe report (coefficients.npz,
    coefficient_summary.json, coefficients.png; phase 2), checkpoint.pt (global model, round,
    strategy state, history; after every fine-tuning round), metrics.jsonl (one line per phase /
    round), final.pt (the final model).
    """

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "config.json"
        fingerprint = cfg.fingerprint()
        if saved.exists():
            old = json.loads(saved.read_text(encoding="utf-8"))
            diff = [key for key, _, _ in differences(old, fingerprint)]
            if diff:
                raise InputError(
                    f"{saved}: this run folder was made by a different run config "
                    f"(differs in {', '.join(diff)}); change run-name or delete the folder"
                )
        else:
            atomic_write_json(saved, fingerprint)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def load_sources(self) -> tuple[list[StateDict], list[str]] | None:
        path = self.dir / "sources.pt"
        if not path.exists():
            return None
        saved = load_torch_file(path, "unreadable collected sources", "delete it to collect again")
        return saved["sources"], saved["names"]

    def save_sources(self, sources: Sequence[StateDict], names: Sequence[str]) -> None:
        atomic_torch_save({"sources": list(sources), "names": list(names)}, self.dir / "sources.pt")

    def load_merged(self) -> tuple[StateDict, ModelInfo, int] | None:
        """(merged model, its description, DP releases spent learning it) or None."""
        path = self.dir / "merged.pt"
        if not path.exists():
            return None
        saved = load_torch_file(path, "unreadable merged model", "delete it to merge again")
        return saved["state_dict"], ModelInfo(**saved["info"]), int(saved.get("releases", 0))

    def save_merged(
        self,
        state: StateDict,
        info: ModelInfo,
        coefficients: Mapping[str, np.ndarray],
        source_names: Sequence[str],
        metrics: Mapping[str, float],
        releases: int = 0,
    ) -> None:
        """merged.pt and the probe's report (the experiment's own files); `releases`: the DP
        releases of a federated probe, which fine-tuning's accounting continues from."""
        write_merge_report(self.dir, coefficients, source_names)
        atomic_torch_save(
            {
                "state_dict": state,
                "info": dataclasses.asdict(info),
                "arch": info.arch,
                "metrics": dict(metrics),
                "releases": releases,
            },
            self.dir / "merged.pt",
        )

    def load_checkpoint(self, name: str = "checkpoint.pt") -> dict[str, Any] | None:
        """{'round', 'state_dict', 'strategy', 'history'} of a phase's last completed round."""
        path = self.dir / name
        if not path.exists():
            return None
        return load_torch_file(
            path, "unreadable round checkpoint", "delete it to start this phase again"
        )

    def save_round(
        self,
        name: str,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
    ) -> None:
        atomic_torch_save(
            {
                "round": server_round,
                "state_dict": dict(state),
                "strategy": dict(strategy_state),
                "history": [dict(h) for h in history],
            },
            self.dir / name,
        )

    def save_final(self, state: Mapping[str, torch.Tensor], info: ModelInfo) -> None:
        atomic_torch_save(info.checkpoint(state, self.cfg.image_size), self.dir / "final.pt")

    def log(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, dict(record))


def round_table(
    history: Sequence[Mapping[str, Any]], title: str = "Federated fine-tuning"
) -> Table:
    """Per-round metrics as a rich table (the console view of metrics.jsonl); test metrics are
    pooled over every site's test images, validation metrics are the sites' weighted mean."""
    table = Table(title=title)
    columns = [
        ("round", "round", "{}"),
        ("sites", "sites", "{}"),
        ("rejected", "rejected", "{}"),
        ("train loss", "train_loss", "{:.4f}"),
        ("val macro-F1", "val_macro_f1", "{:.4f}"),
        ("test acc", "eval_accuracy", "{:.4f}"),
        ("test macro-F1", "eval_macro_f1", "{:.4f}"),
        ("test AUROC", "eval_auroc", "{:.4f}"),
        ("InMerge kernels", "inmerge_kernels", "{}"),
        ("DP ε", "dp_epsilon", "{:.3g}"),
        ("MB sent", "mbytes", "{:.1f}"),
        ("seconds", "seconds", "{:.1f}"),
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in history:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        table.add_row(*cells)
    return table


def table_text(table: Table, width: int = 120) -> str:
    """A rich table as plain text, for log files and `flwr log`."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (resume and reproducibility checks)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
