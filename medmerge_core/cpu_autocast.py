"""CPU autocast around a oneDNN bf16 convolution bug, apart from the loop so `train` stays short.

`train.Runtime.autocast` uses `cpu_autocast` for bf16 on the CPU: every convolution inside goes
through `conv2d_without_input_below_stride`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode


def conv2d_without_input_below_stride(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> torch.Tensor:
    """`F.conv2d`, with an input smaller than the stride zero-padded explicitly first.

    The same result (the taps it adds read zeros, the output size is unchanged), computed by a
    convolution whose input is at least as large as its stride. On the CPU, oneDNN's bf16
    weight gradient (`jit_bf16:avx512_core_bf16` backward_weights, oneDNN 3.12 in torch 2.14)
    is wrong for a strided convolution whose input is narrower than the stride, e.g. ResNet-18's
    layer4.0.conv1 (3x3, stride 2, padding 1) on the 1x1 maps of 16x16 images: taps that see
    only padding get uninitialised memory (values up to 1e33, or NaN, that vary from call to
    call), which derailed the bf16 probe. Outputs and input gradients are right; fp32 is right.
    """
    height, width = input.shape[-2:]
    sh, sw = _pair(stride)
    if isinstance(padding, str) or (height >= sh and width >= sw):
        return torch.conv2d(input, weight, bias, stride, padding, dilation, groups)
    ph, pw = _pair(padding)
    extra_h, extra_w = max(0, sh - height - 2 * ph), max(0, sw - width - 2 * pw)
    padded = F.pad(input, (pw, pw + extra_w, ph, ph + extra_h))
    return torch.conv2d(padded, weight, bias, stride, 0, dilation, groups)


class _PadInputsBelowStride(TorchFunctionMode):
    """Every `conv2d` inside goes through `conv2d_without_input_below_stride`."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.conv2d:  # F.conv2d, as nn.Conv2d calls it
            return conv2d_without_input_below_stride(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def cpu_autocast(dtype: torch.dtype) -> Iterator[None]:
    """bf16 (or `dtype`) autocast on the CPU, its convolutions padded below their stride."""
    with torch.autocast("cpu", dtype=dtype), _PadInputsBelowStride():
        yield
