"""bf16 autocast on the CPU: the probe no longer diverges, and non-finite steps are skipped.

The divergence came from oneDNN's bf16 convolution weight gradient, which is wrong (values up to
1e33, or NaN) for a strided convolution whose input is narrower than its stride: ResNet-18's
layer4.0.conv1 on the 1x1 maps of 16x16 images. `Runtime.autocast` pads such inputs explicitly
(cpu_autocast.conv2d_without_input_below_stride); `TrainStep` skips what is non-finite anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmerge_core.batches import TensorBatches
from medmerge_core.cli import main
from medmerge_core.errors import NonFiniteLossError
from medmerge_core.settings import StageSettings
from medmerge_core.train import MAX_NONFINITE_STEPS, FitOptions, Runtime, fit

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BF16 = Runtime.detect("cpu", amp=True, channels_last=True)

REPORTED = """\
name: bf16
output_dir: runs
seed: 0
data: {format: synthetic, task: target, n_train: 96, n_val: 32, n_test: 32}
sources: {a: "random:1", b: "random:2"}
model: {arch: resnet18, image_size: 16}
pipelines: [medmerge]
batch_size: 32
lp: {epochs: 2, lr: 1.0e-4}
ft: {epochs: 1, lr: 1.0e-5}
channels_last: true
amp: true
"""


# --- the cause ------------------------------------------------------------------------------


def test_strided_conv_on_an_input_below_its_stride_gets_the_fp32_weight_gradient() -> None:
    """layer4.0.conv1 of ResNet-18 at 16x16: 256 -> 512, 3x3, stride 2, padding 1, 1x1 input.
    Without the workaround about half of these backward passes return garbage for the taps
    that see only padding (their exact gradient is 0)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
    x = torch.randn(32, 256, 1, 1)
    conv(x).sum().backward()
    exact = conv.weight.grad.clone()
    model = BF16.model(conv)
    for _ in range(6):
        model.weight.grad = None
        with BF16.autocast():
            out = model(BF16.inputs(x))
        assert out.shape == (32, 512, 1, 1)
        out.float().sum().backward()
        grad = model.weight.grad
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[:, :, :, 2], torch.zeros_like(grad[:, :, :, 2]))  # padding only
        assert (grad - exact).abs().max() <= 0.02 * exact.abs().max()


def test_the_reported_config_finishes_under_bf16_autocast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config of the report, through the CLI's entry point, with a 9-step probe (it used to
    stop with 'loss is nan' within its first 9 steps); no step had to be skipped."""
    (tmp_path / "bf16.yaml").write_text(REPORTED)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "bf16.yaml", "--no-progress", "--set", "merge.steps=9"]) == 0
    run = tmp_path / "runs" / "bf16"
    result = json.loads((run / "results.json").read_text())["medmerge"]
    assert result["stages"]["probe"]["skipped_steps"] == 0
    assert result["stages"]["ft"]["skipped_steps"] == 0
    assert all(np.isfinite(v) for v in result["test"].values())
    with np.load(run / "coefficients.npz") as saved:
        coefficients = [saved[k] for k in saved.files if k.startswith("coef/")]
    assert coefficients and all(np.isfinite(c).all() for c in coefficients)
    moved = max(float(np.abs(c - 0.5).max()) for c in coefficients)
    assert moved > 0.01  # the probe trained


# --- skipping non-finite steps --------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip


def small_batches(steps: int) -> TensorBatches:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * steps, 1, 8, 8, generator=gen)
    return TensorBatches(x, torch.arange(4 * steps) % 2, batch_size=4, shuffle=False)


class Poison:
    """Makes chosen steps (counted over the whole stage) non-finite: 'loss' puts NaN into the
    inputs, so the forward (and BatchNorm's batch statistics) is NaN; 'grad' leaves the
    forward finite and makes the head's weight gradient NaN."""

    def __init__(self, model: nn.Module, plan: dict[int, str]) -> None:
        self.plan, self.step, self.kind = plan, -1, ""
        model.register_forward_pre_hook(
            lambda m, args: (args[0] * float("nan"),) if self.kind == "loss" else None
        )
        model[-1].weight.register_hook(lambda g: g * float("nan") if self.kind == "grad" else g)

    def before_step(self, model: nn.Module, epoch: int) -> None:
        self.step += 1
        self.kind = self.plan.get(self.step, "")


def train(model: nn.Module, poison: Poison, steps: int, epochs: int = 1, **kwargs):
    applied = []
    result = fit(
        model,
        small_batches(steps),
        small_batches(2),
        StageSettings(epochs, 1e-2),
        Runtime.detect("cpu"),
        before_step=poison.before_step,
        after_step=lambda: applied.append(poison.step),
        options=FitOptions(name="ft", show_progress=False),
        **kwargs,
    )
    return result, applied


def test_a_non_finite_step_is_skipped_counted_and_changes_nothing() -> None:
    model = small_model()
    poison = Poison(model, {1: "loss", 2: "grad"})
    result, applied = train(model, poison, steps=4)
    assert applied == [0, 3]  # the optimiser (and after_step) ran only for finite steps
    assert result.skipped_steps == 2
    assert result.history[0]["skipped_steps"] == 2
    assert result.summary()["skipped_steps"] == 2
    assert np.isfinite(result.history[0]["train_loss"])
    bn = model[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert int(bn.num_batches_tracked) == 2  # the skipped forwards left no statistics behind
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_skipped_count_is_kept_per_epoch() -> None:
    model = small_model()
    result, _ = train(model, Poison(model, {0: "loss", 4: "grad", 5: "loss"}), 3, epochs=2)
    assert [h["skipped_steps"] for h in result.history] == [1, 2]
    assert result.skipped_steps == 3


def test_a_finite_step_resets_the_run_of_non_finite_ones() -> None:
    steps = 2 * MAX_NONFINITE_STEPS
    plan = {i: "loss" for i in range(steps) if i not in (MAX_NONFINITE_STEPS - 1, steps - 1)}
    model = small_model()
    result, applied = train(model, Poison(model, plan), steps)
    assert applied == [MAX_NONFINITE_STEPS - 1, steps - 1]
    assert result.skipped_steps == steps - 2


def test_max_non_finite_steps_in_a_row_stop_the_stage_with_one_line() -> None:
    model = small_model()
    poison = Poison(model, {i: ("grad" if i == 0 else "loss") for i in range(100)})
    with pytest.raises(NonFiniteLossError) as err:
        train(model, poison, steps=3 * MAX_NONFINITE_STEPS)
    assert poison.step == MAX_NONFINITE_STEPS - 1  # it stopped at the limit, not later
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ft: loss is ") and "gradients are not finite" in message
    assert "at epoch 0, step 0;" in message
    assert f"{MAX_NONFINITE_STEPS} steps in a row" in message


def test_a_stage_shorter_than_the_limit_stops_when_every_step_was_skipped() -> None:
    model = small_model()
    with pytest.raises(NonFiniteLossError, match=r"^ft: loss is nan at epoch 0, step 0; 3 steps"):
        train(model, Poison(model, {0: "loss", 1: "loss", 2: "loss"}), steps=3)


# --- bf16 against fp32 on real weights and real images --------------------------------------


def test_bf16_probe_is_close_to_fp32_on_real_weights() -> None:
    """MedMerge of a real CIFAR-10 ResNet-20 and a random one on real BreastMNIST (28x28): one
    epoch (17 steps) of the probe in fp32 and under bf16 autocast + channels_last.

    Tolerances, and why. The runs cannot agree exactly: Adam moves every coefficient by about
    coef_lr (0.01) per step whatever its gradient's size, so a kernel whose gradient sign bf16's
    8-bit mantissa flips moves the other way, and the two runs then drift apart like any two
    chaotic trajectories (fp32 against fp32 in channels_last already differs by up to 0.035 per
    kernel and 0.027 in AUROC). Measured on three seeds, bf16 against fp32: per-kernel movement
    correlation 0.91-0.97, largest per-layer mean difference 0.015, val loss within 0.017, AUROC
    within 0.024, macro-F1 within 0.028, accuracy within 1/78. The bounds below are about twice
    those: correlation >= 0.85, layer means within 0.03, val loss within 0.04, AUROC and
    macro-F1 within 0.06, accuracy within 4/78 (val has 78 images). A divergence, a lost
    coefficient update (bf16 merge arithmetic rounds a 1e-3 move away) or corrupted BN
    statistics are far outside them. The head and BN train at lr 1e-2 so that within one epoch
    the model leaves the majority-class answer and the validation metrics say something. The
    figures were measured on one CPU thread, and the test runs on one (on two, accuracy once
    differed by 5/78 with every other bound met: another thread count is another trajectory).
    """
    medmnist = SHARED / "data" / "medmnist" / "breastmnist.npz"
    weights = SHARED / "weights" / "cifar10_resnet"
    if not medmnist.is_file() or not list(weights.glob("resnet20-*.th")):
        pytest.skip(f"needs {medmnist} and {weights}/resnet20-*.th (the workplace's shared data)")
    from medmerge_core.data.base import BatchLoader
    from medmerge_core.data.medmnist import load_medmnist
    from medmerge_core.models import build_model, load_source
    from medmerge_core.probe import learn_merge
    from medmerge_core.settings import ProbeSettings
    from medmerge_core.train import seed_everything

    task = load_medmnist(medmnist)
    arch = "cifar_resnet20"
    sources = [load_source("cifar10:resnet20", arch, 1), load_source("random:1", arch, 1)]

    def probe(runtime: Runtime):
        seed_everything(0)
        return learn_merge(
            build_model(arch, task.num_classes, 1),
            sources,
            ["cifar10", "random"],
            BatchLoader(task.train, 32, shuffle=True),
            BatchLoader(task.val, 128),
            ProbeSettings(steps=17),
            1e-2,
            0.01,
            runtime,
            options=FitOptions(name="medmerge probe", show_progress=False),
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = probe(Runtime.detect("cpu", amp=False, channels_last=False))
        bf16 = probe(BF16)
    finally:
        torch.set_num_threads(threads)
    assert fp32.fit.skipped_steps == 0 and bf16.fit.skipped_steps == 0
    assert all(b.dtype == torch.float32 for b in bf16.model.buffers() if b.is_floating_point())
    move32 = np.concatenate([c[0].ravel() - 0.5 for c in fp32.coefficients.values()])
    move16 = np.concatenate([c[0].ravel() - 0.5 for c in bf16.coefficients.values()])
    assert np.isfinite(move16).all() and np.abs(move32).max() > 0.05
    assert np.corrcoef(move32, move16)[0, 1] >= 0.85
    for key, c32 in fp32.coefficients.items():
        assert abs(float(c32[0].mean() - bf16.coefficients[key][0].mean())) <= 0.03, key
    last32, last16 = fp32.fit.history[-1], bf16.fit.history[-1]
    assert abs(last32["val_loss"] - last16["val_loss"]) <= 0.04
    assert abs(last32["val_auroc"] - last16["val_auroc"]) <= 0.06
    assert abs(last32["val_macro_f1"] - last16["val_macro_f1"]) <= 0.06
    assert abs(last32["val_accuracy"] - last16["val_accuracy"]) <= 4 / 78 + 1e-9
