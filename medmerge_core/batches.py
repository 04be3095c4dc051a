"""Batches already in memory (cached LP features), apart from the loop so `train` stays short.

The linear probe extracts the frozen backbone's features once (`extract_features`) and trains
the head on them in seeded shuffled batches (`TensorBatches`), as `train.fit` takes any batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from medmerge_core.train import Batches, Runtime


class TensorBatches:
    """Seeded shuffled batches over in-memory tensors (cached LP features)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0
    ) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Batches, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen backbone (eval mode), computed once for cached LP."""
    backbone.eval()
    feats, labels = [], []
    for x, y in batches:
        with runtime.autocast():
            feats.append(backbone(runtime.inputs(x)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(runtime.device)
