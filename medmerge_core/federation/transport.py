"""What travels: the model description, the keys that travel (FedBN, integer buffers), fp16
and dtype restoration.

`ModelInfo` is sent as config so every node can rebuild the merged model; `model_reference`
gives the keys, shapes and dtypes everything is checked and restored against.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medmerge_core.data.base import preprocessing_record
from medmerge_core.federation.protocol import ModelDescription
from medmerge_core.models import StateDict, build_model, conv_weight_keys, norm_keys


@dataclass(frozen=True)
class ModelInfo(ModelDescription):
    """What the server and the sites need to rebuild the merged model: its description as it
    travels (`protocol.ModelDescription`: `as_config` / `from_config`), and the model."""

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.in_channels)

    def checkpoint(self, state: Mapping[str, torch.Tensor], image_size: int) -> dict[str, Any]:
        """A final model as saved to disk: its weights, what rebuilds it and how to feed it
        (what `medmerge evaluate` / `export` read)."""
        return {
            "arch": self.arch,
            "state_dict": dict(state),
            **self.as_config(),
            "preprocessing": preprocessing_record(image_size, self.in_channels),
        }


def model_reference(info: ModelInfo) -> tuple[StateDict, list[str], list[str]]:
    """(meta state dict: keys, shapes, dtypes; conv keys in InMerge order; norm-layer keys).

    Fresh containers each call (callers may edit them); the model is built once per `info`.
    """
    meta, conv, norm, _ = _reference(info)
    return dict(meta), list(conv), list(norm)


def parameter_keys(info: ModelInfo) -> list[str]:
    """The model's parameters (weights and biases; not BN running statistics or counters)."""
    return list(_reference(info)[3])


@functools.lru_cache(maxsize=16)
def _reference(info: ModelInfo) -> tuple[StateDict, list[str], list[str], list[str]]:
    with torch.device("meta"):
        model = info.build()
    parameters = [name for name, _ in model.named_parameters()]
    return dict(model.state_dict()), conv_weight_keys(model), norm_keys(model), parameters


def transport_keys(meta: Mapping[str, torch.Tensor], norm: Sequence[str], fedbn: bool) -> list[str]:
    """Keys that travel each round: floating tensors only, and no norm layers under FedBN.

    Integer buffers (BN's num_batches_tracked) stay put: averaging a step count is meaningless,
    FedAvg would turn it into float64, and there is nothing to learn in it.
    """
    local = set(norm) if fedbn else set()
    return [k for k, v in meta.items() if v.dtype.is_floating_point and k not in local]


def compress(state: Mapping[str, torch.Tensor], fp16: bool) -> StateDict:
    """fp32/fp64 tensors to fp16 when asked (half the bytes); integers untouched."""
    if not fp16:
        return dict(state)
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def restore_dtypes(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> StateDict:
    """Cast to the model's own dtypes: fp16 back to fp32, FedAvg's float64 counts to int64."""
    out = {}
    for key, value in state.items():
        dtype = reference[key].dtype
        if not dtype.is_floating_point and value.is_floating_point():
            value = value.round()
        out[key] = value.to(dtype)
    return out


def pack_counts(counts: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """`metrics.pooling_counts` as flat integer lists, the values a MetricRecord can hold."""
    return {key: [int(v) for v in np.asarray(value).ravel()] for key, value in counts.items()}


def unpack_counts(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `pack_counts`: the confusion matrix is square, the histograms one row a class."""
    confusion = np.asarray(record["confusion"], dtype=np.int64)
    k = round(len(confusion) ** 0.5)
    return {
        "confusion": confusion.reshape(k, k),
        "positive": np.asarray(record["positive"], dtype=np.int64).reshape(k, -1),
        "negative": np.asarray(record["negative"], dtype=np.int64).reshape(k, -1),
    }
