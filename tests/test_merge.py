"""MedMerge arithmetic, coefficient counts and which tensors learn during the probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmerge_core.data.base import BatchLoader
from medmerge_core.errors import InputError
from medmerge_core.merge import COEFFICIENT_PREFIX, MergedModel, merge_state_dicts
from medmerge_core.models import build_model, load_source, mergeable_keys
from medmerge_core.probe import write_merge_report
from medmerge_core.settings import StageSettings
from medmerge_core.train import FitOptions, Runtime, evaluate, fit


def sources(arch: str = "resnet18", seeds: tuple[int, ...] = (1, 2), in_channels: int = 1):
    return [load_source(f"random:{s}", arch, in_channels) for s in seeds]


def model_with(arch: str, backbone: dict, num_classes: int = 3, in_channels: int = 1):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, in_channels)
    state = model.state_dict()
    state.update(backbone)
    model.load_state_dict(state)
    return model


def merged(arch: str = "resnet18", seeds=(1, 2), **kwargs) -> MergedModel:
    torch.manual_seed(0)
    return MergedModel(build_model(arch, 3, 1), sources(arch, seeds), **kwargs)


def set_coefficients(model: MergedModel, value: float) -> None:
    with torch.no_grad():
        for coef in model.coefficients:
            coef.fill_(value)


def conv_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict().items()
        if v.ndim == 4 or (k.endswith(".bias") and "bn" not in k and "norm" not in k)
    }


@pytest.mark.parametrize(("w", "pick"), [(1.0, 0), (0.0, 1)])
def test_endpoint_coefficients_reproduce_one_source_exactly(w: float, pick: int) -> None:
    """w = 1 gives source b's convs bit for bit, w = 0 source c's; with BN and head equal too,
    the outputs are exactly those of that source's model."""
    srcs = sources()
    model = merged()
    set_coefficients(model, w)
    baked = model.bake()
    for key, value in conv_tensors(baked).items():
        if key in srcs[pick]:
            assert torch.equal(value, srcs[pick][key]), key
    # Same BN and head as the merged model, the picked source's convs: identical outputs.
    reference = model_with("resnet18", srcs[pick])
    state = reference.state_dict()
    state.update({k: v for k, v in baked.state_dict().items() if k not in conv_tensors(baked)})
    reference.load_state_dict(state)
    x = torch.randn(2, 1, 32, 32)
    baked.eval()
    reference.eval()
    assert torch.equal(baked(x), reference(x))


def test_half_coefficients_give_the_mean_weight_model() -> None:
    srcs = sources()
    model = merged()
    assert all(torch.all(c == 0.5) for c in model.coefficients)  # the paper's initialisation
    baked = model.bake().state_dict()
    for key in srcs[0]:
        mean = (srcs[0][key] + srcs[1][key]) / 2 if srcs[0][key].is_floating_point() else None
        if mean is not None:
            assert torch.allclose(baked[key], mean, atol=0, rtol=0), key


def test_baked_model_matches_functional_forward() -> None:
    model = merged()
    with torch.no_grad():
        for coef in model.coefficients:
            coef.uniform_(-0.5, 1.5)
    model.eval()
    baked = model.bake().eval()
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(baked(x), model(x), atol=1e-5, rtol=0)


def test_three_sources_use_the_documented_affine_combination() -> None:
    srcs = sources(seeds=(1, 2, 3))
    model = merged(seeds=(1, 2, 3))
    assert model.coefficients[0].shape[0] == 2  # d - 1 free coefficients per kernel
    with torch.no_grad():
        for coef in model.coefficients:
            coef[0].fill_(0.2)
            coef[1].fill_(0.5)
    baked = model.bake().state_dict()
    key = "layer4.1.conv2.weight"
    expected = 0.2 * srcs[0][key] + 0.5 * srcs[1][key] + 0.3 * srcs[2][key]
    torch.testing.assert_close(baked[key], expected, atol=1e-6, rtol=0)
    # The pure state-dict function agrees with the module.
    coefs = {k: c.detach() for k, c in model.coefficient_map().items()}
    pure = merge_state_dicts(srcs, coefs, model.bias_of)
    torch.testing.assert_close(pure[key], baked[key], atol=0, rtol=0)


def test_per_kernel_coefficients_act_on_their_own_kernel() -> None:
    srcs = sources()
    model = merged()
    index = model.weight_keys.index("layer1.0.conv1.weight")
    with torch.no_grad():
        model.coefficients[index][0, 3] = 1.0  # kernel 3 fully from source b
        model.coefficients[index][0, 5] = 0.0  # kernel 5 fully from source c
    weight = model.bake().state_dict()["layer1.0.conv1.weight"]
    assert torch.equal(weight[3], srcs[0]["layer1.0.conv1.weight"][3])
    assert torch.equal(weight[5], srcs[1]["layer1.0.conv1.weight"][5])


@pytest.mark.parametrize(
    ("arch", "kernels", "layers"),
    [("densenet121", 10240, 120), ("resnet50", 26560, 53), ("resnet18", 4800, 20)],
)
def test_kernel_coefficient_counts(arch: str, kernels: int, layers: int) -> None:
    with torch.device("meta"):
        model = merged(arch)
    assert model.num_coefficients() == kernels
    assert len(model.weight_keys) == layers


def test_layer_and_parameter_granularity_counts() -> None:
    assert merged(granularity="layer").num_coefficients() == 20
    params = sum(v.numel() for v in sources()[0].values() if v.ndim == 4)
    assert merged(granularity="parameter").num_coefficients() == params


def test_probe_step_trains_only_coefficients_bn_and_head(tiny_task) -> None:
    srcs = sources()
    before = [{k: v.clone() for k, v in s.items()} for s in srcs]
    model = merged()
    coefs = [c.detach().clone() for c in model.coefficients]
    bn = model.model.bn1.weight.detach().clone()
    head = model.model.fc.weight.detach().clone()
    stage = StageSettings(epochs=1, lr=1e-2)
    one_batch = [next(iter(BatchLoader(tiny_task.train, 16, shuffle=True)))]
    fit(
        model,
        one_batch,
        one_batch,
        stage,
        Runtime.detect("cpu"),
        options=FitOptions(show_progress=False),
    )
    for index in range(len(model.weight_keys)):  # frozen source stacks, bit for bit
        stack = getattr(model, f"source_w{index}")  # [d, C_out, K]
        key = model.weight_keys[index]
        for d in (0, 1):
            assert torch.equal(stack[d].reshape(before[d][key].shape), before[d][key])
    assert all(not torch.equal(a, b) for a, b in zip(coefs, model.coefficients, strict=True))
    assert not torch.equal(bn, model.model.bn1.weight)
    assert not torch.equal(head, model.model.fc.weight)
    assert not any(p.requires_grad for n, p in model.model.named_parameters() if "conv" in n)


def test_frozen_bn_stays_at_the_source_mean(tiny_task) -> None:
    srcs = sources()
    model = merged(freeze_bn=True)
    one_batch = [next(iter(BatchLoader(tiny_task.train, 16, shuffle=True)))]
    fit(
        model,
        one_batch,
        one_batch,
        StageSettings(1, 1e-2),
        Runtime.detect("cpu"),
        options=FitOptions(show_progress=False),
    )
    mean = (srcs[0]["bn1.weight"] + srcs[1]["bn1.weight"]) / 2
    assert torch.equal(model.model.bn1.weight, mean)
    mean_rm = (srcs[0]["bn1.running_mean"] + srcs[1]["bn1.running_mean"]) / 2
    assert torch.equal(model.model.bn1.running_mean, mean_rm)


def test_probe_lowers_validation_loss(tiny_task) -> None:
    model = merged()
    runtime = Runtime.detect("cpu")
    train = BatchLoader(tiny_task.train, 16, shuffle=True)
    val = BatchLoader(tiny_task.val, 32)
    start = evaluate(model, val, runtime)["loss"]
    fit(model, train, val, StageSettings(4, 3e-3), runtime, options=FitOptions(show_progress=False))
    assert evaluate(model, val, runtime)["loss"] < start


def test_mismatched_architectures_name_both_sources() -> None:
    torch.manual_seed(0)
    with pytest.raises(InputError, match=r"'imagenet' and 'ham'.*different architectures"):
        MergedModel(
            build_model("resnet18", 2, 1),
            [load_source("random:1", "resnet18", 1), load_source("random:1", "resnet34", 1)],
            ["imagenet", "ham"],
        )


def test_single_source_is_rejected() -> None:
    with pytest.raises(InputError, match=r"at least 2 sources"):
        MergedModel(build_model("resnet18", 2, 1), sources()[:1])


def test_unknown_granularity_is_rejected() -> None:
    with pytest.raises(InputError, match=r"merge.granularity"):
        merged(granularity="channel")


def test_export_has_every_kernel_coefficient_and_a_layer_summary(tmp_path) -> None:
    model = merged()
    write_merge_report(tmp_path, model.coefficient_arrays(), model.source_names)
    arrays = dict(np.load(tmp_path / "coefficients.npz"))
    coef = arrays["coef/layer4.1.conv2.weight"]
    assert coef.shape[:2] == (2, 512)
    np.testing.assert_allclose(coef.sum(0), 1.0, atol=1e-6)
    assert arrays["layer_mean"].shape == (20, 2)
    assert list(arrays["sources"]) == ["source0", "source1"]


def test_probe_state_holds_what_the_probe_learns_and_rebuilds_the_same_model() -> None:
    probe = merged("resnet18", granularity="kernel")
    with torch.no_grad():
        for i, coef in enumerate(probe.coefficients):
            coef.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(i))
        probe.model.fc.weight.add_(1.0)
        probe.model.bn1.running_mean.add_(0.3)
    state = probe.probe_state()
    merged_keys = {w for w, _ in mergeable_keys(probe.model)}
    assert not merged_keys & set(state)  # never a merged conv: the sources make those
    coefficients = [k for k in state if k.startswith(COEFFICIENT_PREFIX)]
    assert {k.removeprefix(COEFFICIENT_PREFIX) for k in coefficients} == merged_keys
    assert {"fc.weight", "bn1.running_mean", "bn1.num_batches_tracked"} <= set(state)
    assert set(probe.probe_parameter_keys()) == set(coefficients) | {
        k for k, p in probe.model.named_parameters() if p.requires_grad
    }
    fresh = merged("resnet18", granularity="kernel")  # the same sources, another head
    fresh.load_probe_state(state)
    baked, rebuilt = probe.bake().state_dict(), fresh.bake().state_dict()
    assert all(torch.equal(baked[k], rebuilt[k]) for k in baked)
    with pytest.raises(InputError, match=r"probe state: key 'fc\.bias'"):
        fresh.load_probe_state({k: v for k, v in state.items() if k != "fc.bias"})
