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
    return {**spec, "image_size": cfg.image_size, "label_skew": cfg.label_skew}


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


MIN_SHARD = 4  # training examples every label-skewed shard gets at least


def dirichlet_shards(labels: np.ndarray, count: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed shards (Hsu et al. 2019): each class is split over the `count` shards in
    proportions drawn from Dirichlet(alpha); redrawn until every shard holds `MIN_SHARD`."""
    rng = np.random.default_rng((seed, count, len(labels), 17))
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(count)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * count))[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= MIN_SHARD:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise InputError(
        f"label-skew {alpha}: no split of {len(labels)} examples into {count} shards gives each "
        f"{MIN_SHARD}; raise label-skew or use fewer shards"
    )


def shard_task(
    task: TaskData, index: int, count: int, seed: int, label_skew: float = 0.0
) -> TaskData:
    """Shard `index` of `count` of every split: disjoint, deterministic, label-stratified; with
    `label_skew` > 0 the training split is label-skewed instead (`dirichlet_shards`)."""
    splits = {}
    for name, split in task.splits().items():
        single_label = split.labels.ndim == 1
        if name == "train" and label_skew > 0 and single_label:
            splits[name] = split.subset(
                dirichlet_shards(split.labels, count, label_skew, seed)[index]
            )
            continue
        order = np.random.default_rng((seed, count, len(split))).permutation(len(split))
        if single_label:
            order = order[np.argsort(split.labels[order], kind="stable")]
        splits[name] = split.subset(np.sort(order[index::count]))
    return dataclasses.replace(task, **splits)


def load_node_data(
    name: str, spec: Mapping[str, Any], shard: tuple[int, int] | None, seed: int
) -> TaskData:
    """A node's data from its parsed spec (`parse_data_spec`), sharded when it holds a shard."""
    from medmerge_core.data.registry import load_task

    data = {k: v for k, v in spec.items() if k not in ("image_size", "label_skew")}
    task = load_task(data, image_size=spec["image_size"], seed=seed)
    if shard is not None:
        task = shard_task(task, *shard, seed=seed, label_skew=spec.get("label_skew", 0.0))
    if min(len(task.train), len(task.val), len(task.test)) == 0:
        raise InputError(f"node '{name}': a split of its data is empty after sharding")
    return task
