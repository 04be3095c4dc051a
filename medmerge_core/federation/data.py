"""A node's private data: data specs, deterministic label-stratified shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from medmerge_core.data.base import TaskData
from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig, NodeSettings


def parse_data_spec(text: str, cfg: FederationConfig) -> dict[str, Any]:
    """'synthetic:TASK', a MedMNIST '.npz' path, or a .yaml/.json file holding a data mapping."""
    if text.startswith("synthetic:"):
        return {
            "format": "synthetic",
            "task": text.removeprefix("synthetic:"),
            "n_train": cfg.synthetic_n_train,
            "n_val": cfg.synthetic_n_val,
            "n_test": cfg.synthetic_n_test,
        }
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        return {"format": "medmnist", "path": str(path)}
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise InputError(f"node config data: file not found: {path}")
        import yaml

        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise InputError(f"{path}: expected a mapping with a 'format' key")
        return spec
    raise InputError(
        f"node config data: expected 'synthetic:TASK', a .npz or a .yaml, got '{text}'"
    )


def shard_task(task: TaskData, index: int, count: int, seed: int) -> TaskData:
    """Shard `index` of `count` of every split: disjoint, label-stratified, deterministic."""
    splits = {}
    for name, split in task.splits().items():
        order = np.random.default_rng((seed, count, len(split))).permutation(len(split))
        if split.labels.ndim == 1:
            order = order[np.argsort(split.labels[order], kind="stable")]
        splits[name] = split.subset(np.sort(order[index::count]))
    return dataclasses.replace(task, **splits)


def load_node_data(settings: NodeSettings, cfg: FederationConfig) -> TaskData:
    if settings.data is None:
        raise InputError(f"node '{settings.name}': node config has no 'data'")
    from medmerge_core.data.registry import load_task

    task = load_task(parse_data_spec(settings.data, cfg), image_size=cfg.image_size, seed=cfg.seed)
    if settings.shard is not None:
        task = shard_task(task, *settings.shard, seed=cfg.seed)
    if min(len(task.train), len(task.val), len(task.test)) == 0:
        raise InputError(f"node '{settings.name}': a split of its data is empty after sharding")
    return task
