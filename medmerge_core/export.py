"""`medmerge export`: a trained model for code that does not use this project.

Framework-neutral: `model.safetensors` (the state dict, keys exactly as `build_model` /
torchvision name them), `model.json` (everything needed to rebuild the model and feed it) and
`model.onnx` when the `onnx` package is importable.
"""

from __future__ import annotations

import io
import warnings
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmerge_core.cifar_resnet import CIFAR_ARCHS
from medmerge_core.efficientnet_lite import LITE_ARCHS
from medmerge_core.errors import InputError
from medmerge_core.io import atomic_write, atomic_write_json
from medmerge_core.models import head_name, stem_conv_name
from medmerge_core.saved_model import SavedModel

EXPORT_FORMAT = "medmerge-export/1"
ONNX_OPSET = 17


def _builder(arch: str) -> str:
    """The call that rebuilds `arch` (the project's own modules, else torchvision's)."""
    if arch in CIFAR_ARCHS:
        return "medmerge_core.cifar_resnet.cifar_resnet(arch, num_classes, in_channels)"
    if arch in LITE_ARCHS:
        return "medmerge_core.efficientnet_lite.efficientnet_lite(arch, num_classes, in_channels)"
    return "torchvision.models.get_model(arch, num_classes=num_classes)"


def model_description(saved: SavedModel, model: nn.Module, onnx_file: str | None) -> dict[str, Any]:
    """model.json: what plain torch / torchvision code needs to rebuild and feed the model
    (`model` is `saved.build()`)."""
    stem_name = stem_conv_name(model)
    stem: nn.Conv2d = model.get_submodule(stem_name)
    software = dict(saved.software) if saved.software else None
    return {
        "format": EXPORT_FORMAT,
        "arch": saved.arch,
        "builder": _builder(saved.arch),
        "num_classes": saved.num_classes,
        "class_names": list(saved.class_names) if saved.class_names else None,
        "multilabel": saved.multilabel,
        "output": _output_text(saved.multilabel),
        "in_channels": saved.in_channels,
        "image_size": saved.image_size,
        "mean": list(saved.mean),
        "std": list(saved.std),
        "preprocessing": saved.preprocessing(),
        "state_dict": {
            "file": "model.safetensors",
            "convention": "keys and shapes of the builder's model (no 'module.' prefix); the "
            "head is a new Linear with num_classes outputs; with in_channels != 3 the stem conv "
            "takes in_channels (rebuild it from 'stem')",
            "head": head_name(model),
            "keys": len(saved.state_dict),
        },
        "stem": {
            "module": stem_name,
            "conv2d": {
                "in_channels": stem.in_channels,
                "out_channels": stem.out_channels,
                "kernel_size": list(stem.kernel_size),
                "stride": list(stem.stride),
                "padding": stem.padding if isinstance(stem.padding, str) else list(stem.padding),
                "dilation": list(stem.dilation),
                "groups": stem.groups,
                "bias": stem.bias is not None,
            },
        },
        "onnx": None
        if onnx_file is None
        else {
            "file": onnx_file,
            "input": "input",
            "output": "logits",
            "opset": ONNX_OPSET,
            "dynamic": "batch",
        },
        "source": {
            "checkpoint": str(saved.checkpoint),
            "run_dir": str(saved.run_dir) if saved.run_dir else None,
            "method": saved.method,
        },
        "software": software,
        "exported_by": {"medmerge-federation": _version("medmerge-federation")},
    }


def _output_text(multilabel: bool | None) -> str:
    if multilabel is None:
        return "logits; softmax (single-label) or sigmoid per label (multi-label)"
    return "logits; sigmoid per label" if multilabel else "logits; softmax over classes"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def onnx_available() -> bool:
    return find_spec("onnx") is not None


def onnx_bytes(model: nn.Module, in_channels: int, image_size: int) -> bytes:
    """The model as ONNX (batch axis dynamic), by torch's TorchScript-based exporter: the
    torch.export-based default needs onnxscript, which the `export` extra does not install."""
    example = torch.zeros(1, in_channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own deprecation
        # cifar_resnet's strided shortcut slice: exported as a Slice op, just not pre-folded
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a folder")


def export_saved(saved: SavedModel, out: Path) -> tuple[list[Path], str | None]:
    """Write model.safetensors, model.json and (with onnx) model.onnx into `out`, each
    atomically, after all three were produced in memory. Returns (written, a note or None)."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    check_out_dir(out)
    model = saved.build()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = safetensors_bytes(state, metadata={"format": "pt", "arch": saved.arch})
    onnx, note = None, None
    if not onnx_available():
        note = (
            "onnx is not installed: skipped model.onnx (pip install 'medmerge-federation[export]')"
        )
    else:
        try:
            onnx = onnx_bytes(model, saved.in_channels, saved.image_size)
        except Exception as exc:  # an operator the exporter lacks: the other files still help
            reason = " ".join(str(exc).split("[Caused by")[0].split())
            note = (
                f"skipped model.onnx: torch's ONNX exporter failed ({type(exc).__name__}: {reason})"
            )
    description = model_description(saved, model, "model.onnx" if onnx is not None else None)
    written = [out / "model.safetensors", out / "model.json"]
    atomic_write(written[0], lambda f: f.write(weights))
    atomic_write_json(written[1], description)
    if onnx is not None:
        written.append(out / "model.onnx")
        atomic_write(written[2], lambda f: f.write(onnx))
    else:
        (out / "model.onnx").unlink(missing_ok=True)  # never leave a stale model beside it
    return written, note
