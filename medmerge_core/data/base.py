"""In-memory (or memory-mapped) image splits shared by every dataset format.

Images are kept as uint8 and normalised per batch on the fly, so a 224x224 cache costs one
byte per pixel and no Python work per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmerge_core.errors import InputError

# ImageNet statistics; grayscale uses their mean so a 3->1 channel-summed stem sees the same scale.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)


@dataclass(frozen=True)
class ArraySplit:
    """One split: uint8 images [N,H,W] (grayscale) or [N,H,W,3], and their labels.

    labels: int64 [N] for multi-class; float32 [N,L] with NaN for "ignore" for multi-label.
    ids: one string per row (file name, image id) so the split can be written out and repeated.
    groups: one string per row (patient or lesion id) that must not straddle splits.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise InputError(
                f"images: expected uint8 [N,H,W] or [N,H,W,C], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise InputError(f"labels: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[-1])

    def subset(self, index: np.ndarray) -> ArraySplit:
        ids = None if self.ids is None else self.ids[index]
        groups = None if self.groups is None else self.groups[index]
        return ArraySplit(self.images[index], self.labels[index], ids, groups)


@dataclass(frozen=True)
class TaskData:
    """A labelled task with train / val / test splits."""

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    class_names: tuple[str, ...]
    multilabel: bool = False
    notes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    def splits(self) -> dict[str, ArraySplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def resized(self, size: int) -> TaskData:
        """Every split resized once to size x size (bilinear, antialiased), still uint8."""
        if size == self.image_size:
            return self
        return replace(
            self,
            train=replace(self.train, images=resize_images(self.train.images, size)),
            val=replace(self.val, images=resize_images(self.val.images, size)),
            test=replace(self.test, images=resize_images(self.test.images, size)),
        )


def resize_images(images: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """Resize uint8 [N,H,W(,C)] images to [N,size,size(,C)] in chunks to bound memory."""
    gray = images.ndim == 3
    out = np.empty((len(images), size, size) + (() if gray else (images.shape[-1],)), np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        x = x.unsqueeze(1) if gray else x.permute(0, 3, 1, 2)
        y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
        y = y.squeeze(1) if gray else y.permute(0, 2, 3, 1)
        out[start : start + chunk] = y.numpy()
    return out


def normalize_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W(,C)] -> float32 [B,C,H,W] with ImageNet-style normalisation.

    The layout change happens in uint8 (a quarter of the bytes) and the affine in place.
    """
    x = torch.as_tensor(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    mean, std = (GRAY_MEAN, GRAY_STD) if x.shape[1] == 1 else (RGB_MEAN, RGB_STD)
    shift = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255.0)
    return x.float().sub_(shift).mul_(scale)


class BatchLoader:
    """Yields normalised (x, y) batches straight from uint8 arrays, with seeded shuffling.

    Indexing whole batches (instead of per-item __getitem__) keeps data loading far below
    model time on CPU, and works on np.memmap caches too.
    """

    def __init__(
        self, split: ArraySplit, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size: must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """The shuffle of `epoch` next, so a resumed run repeats no epoch's batch order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(n)
        else:
            order = np.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield (
                normalize_batch(self.split.images[index]),
                torch.as_tensor(self.split.labels[index]),
            )


def normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that data.base.normalize_batch applies for this channel count."""
    return (GRAY_MEAN, GRAY_STD) if in_channels == 1 else (RGB_MEAN, RGB_STD)


def preprocessing_record(image_size: int, in_channels: int) -> dict[str, Any]:
    """How training fed the model its images, as plain JSON values (weights_only-loadable)."""
    mean, std = normalization(in_channels)
    return {
        "image_size": int(image_size),
        "in_channels": int(in_channels),
        "color": "gray" if in_channels == 1 else "rgb",
        "resize": "bilinear, antialiased, to image_size x image_size (uint8)",
        "mean": list(mean),
        "std": list(std),
        "input": "float32 [batch, channels, height, width] = (uint8 pixels / 255 - mean) / std",
    }
