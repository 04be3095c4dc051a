"""A node's private data: data specs, deterministic label-stratified shards."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medmerge_core.data.base import TaskData
from medmerge_core.errors import InputError
from medmerge_core.federation.config import FederationConfig


def parse_data_spec(text: str, cfg: FederationConfig) -> dict[str, Any]:
    """'synthetic:TASK', a MedMNIST '.npz' path, or a .yaml/.json file holding a data mapping;
    the image size goes with it, so the spec alone says how to load the data."""
    spec = _data_mapping(text, cfg)
    return {**spec, "image_size": cfg.image_size}


def _data_mapping(text: str, cfg: FederationConfig) -> dict[str, Any]:
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


def load_node_data(
    name: str, spec: Mapping[str, Any], shard: tuple[int, int] | None, seed: int
) -> TaskData:
    """A node's data from its parsed spec (`parse_data_spec`), sharded when it holds a shard."""
    from medmerge_core.data.registry import load_task

    data = {k: v for k, v in spec.items() if k != "image_size"}
    task = load_task(data, image_size=spec["image_size"], seed=seed)
    if shard is not None:
        task = shard_task(task, *shard, seed=seed)
    if min(len(task.train), len(task.val), len(task.test)) == 0:
        raise InputError(f"node '{name}': a split of its data is empty after sharding")
    return task
