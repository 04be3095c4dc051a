"""InMerge: exact semantics on hand-built layers, the state-dict version, the settings and the
quantile rule. Coverage on real torchvision CNNs is in test_inmerge_models.py.

The public InMerge code merges nothing in ResNets/DenseNets and merges during validation; these
tests pin the fixed behaviour (every Conv2d in module order, eval untouched, pre-merge reads).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from medmerge_core.coerce import build
from medmerge_core.errors import InputError
from medmerge_core.inmerge import (
    InMergeStats,
    inmerge_,
    inmerge_state_dict,
    merge_kernels,
)
from medmerge_core.models import conv_weight_keys
from medmerge_core.settings import InMergeSettings

ALL = {
    "p": 1.0,
    "rule": "absolute",
    "tau": -1.0,
    "skip_layers": 0,
}  # Every kernel draws a partner and merges.


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tests are many small tensor ops: with several intra-op threads on a busy 2-core
    machine each op can stall on an OpenMP barrier (measured: 60 s vs 26 s for this file).
    Results do not depend on it; the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draws(seed: int, c_out: int) -> tuple[Tensor, Tensor]:
    """Reproduce one layer's draws from the documented contract: (u, partner)."""
    g = _gen(seed)
    u = torch.rand(c_out, generator=g)
    r = torch.randint(0, c_out - 1, (c_out,), generator=g)
    partner = torch.tensor([int(r[i]) + (1 if int(r[i]) >= i else 0) for i in range(c_out)])
    return u, partner


def _conv_with(kernels: list[list[float]]) -> nn.Conv2d:
    """A Conv2d(1, C, (1, 2)) whose kernel i is the 2-vector ``kernels[i]``."""
    conv = nn.Conv2d(1, len(kernels), kernel_size=(1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(kernels).reshape(len(kernels), 1, 1, 2))
    return conv


def _conv_stack(seed: int, widths: tuple[int, ...] = (3, 8, 16, 16, 32)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _conv_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d)]


def _changed_layers(before: list[Tensor], model: nn.Module) -> list[bool]:
    return [not torch.equal(b, a) for b, a in zip(before, _conv_weights(model), strict=True)]


# --- exact semantics on hand-built layers ---------------------------------------------------


def test_hand_built_layer_exact_result() -> None:
    # K0 . K3 = -1, K1 ~ K0 and K1 ~ K2 at cos 0.707, K0 _|_ K2. alpha=0.75 keeps values exact.
    conv = _conv_with([[1, 0], [1, 1], [0, 1], [-1, 0]])
    before = conv.weight.detach().clone().reshape(4, 2)
    config = InMergeSettings(rule="absolute", p=0.5, tau=0.3, alpha=0.75, skip_layers=0)
    seed = 31
    u, partner = _draws(seed, 4)
    drawn = (u < 0.5).tolist()
    # Seed 31 gives: 0 draws 3 (cos -1: kept), 1 draws 0 (merged), 2 draws 1 (merged), 3 draws
    # nothing. 2 reads the *pre-merge* K1 although K1 itself is merged (simultaneous update):
    # reading the new K1 = [1, 0.75] would give K2 = [0.25, 0.9375] instead of [0.25, 1].
    assert drawn == [True, True, True, False]
    assert partner.tolist()[:3] == [3, 0, 1]

    stats = inmerge_(conv, config, _gen(seed))

    expected = torch.tensor([[1.0, 0.0], [1.0, 0.75], [0.25, 1.0], [-1.0, 0.0]])
    by_formula = before.clone()
    for i in (1, 2):  # The merged ones: alpha * K_i + (1 - alpha) * K_j from pre-merge weights.
        by_formula[i] = 0.75 * before[i] + 0.25 * before[int(partner[i])]
    assert torch.equal(by_formula, expected)
    assert torch.equal(conv.weight.detach().reshape(4, 2), expected)
    assert stats == InMergeStats(layers=1, kernels_drawn=3, kernels_merged=2)


def test_simultaneous_update_when_two_kernels_pick_each_other() -> None:
    conv = _conv_with([[1, 0], [1, 1]])  # With C_out=2 each kernel must pick the other.
    stats = inmerge_(conv, InMergeSettings(alpha=0.75, **ALL), _gen(0))
    # Sequential updates would give K1 = 0.75*[1,1] + 0.25*[1,0.25] = [1, 0.8125].
    assert torch.equal(conv.weight.detach().reshape(2, 2), torch.tensor([[1, 0.25], [1, 0.75]]))
    assert stats.kernels_merged == 2


def test_p1_tau_minus1_merges_every_kernel_with_its_drawn_partner() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 9, 3)
    before = conv.weight.detach().clone()
    stats = inmerge_(conv, InMergeSettings(alpha=0.8, **ALL), _gen(5))
    after = conv.weight.detach()
    _, partner = _draws(5, 9)
    assert (partner != torch.arange(9)).all()
    assert stats == InMergeStats(layers=1, kernels_drawn=9, kernels_merged=9)
    for i in range(9):
        assert not torch.equal(after[i], before[i])
        expected = torch.lerp(before[i], before[int(partner[i])], 1 - 0.8)
        assert torch.equal(after[i], expected)


def test_p0_merges_nothing() -> None:
    model = _conv_stack(0)
    before = _conv_weights(model)
    stats = inmerge_(
        model, InMergeSettings(rule="absolute", p=0.0, tau=-1.0, skip_layers=0), _gen(0)
    )
    assert stats == InMergeStats(layers=4, kernels_drawn=0, kernels_merged=0)
    assert not any(_changed_layers(before, model))


def test_dissimilar_kernels_are_untouched() -> None:
    conv = nn.Conv2d(6, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(6).reshape(6, 6, 1, 1))  # Mutually orthogonal: cos = 0.
    stats = inmerge_(conv, InMergeSettings(rule="absolute", p=1.0, tau=0.0, skip_layers=0), _gen(0))
    assert stats == InMergeStats(layers=1, kernels_drawn=6, kernels_merged=0)
    assert torch.equal(conv.weight.detach().reshape(6, 6), torch.eye(6))
    # Opposed kernels (cos = -0.89) are below tau = 0.3 too; tau = -1 merges them.
    anti = _conv_with([[1, 0], [-1, 0.5]])
    kept = inmerge_(anti, InMergeSettings(rule="absolute", p=1.0, tau=0.3, skip_layers=0), _gen(0))
    assert kept.kernels_merged == 0
    assert inmerge_(anti, InMergeSettings(**ALL), _gen(0)).kernels_merged == 2


def test_single_output_channel_and_bias_untouched() -> None:
    torch.manual_seed(0)
    single = nn.Conv2d(3, 1, 3)
    w = single.weight.detach().clone()
    g = _gen(0)
    state = g.get_state()
    assert inmerge_(single, InMergeSettings(**ALL), g) == InMergeStats(layers=1)
    assert torch.equal(single.weight, w)
    assert torch.equal(g.get_state(), state)  # Nothing to merge: no randomness consumed.

    conv = nn.Conv2d(3, 8, 3, bias=True)
    bias = conv.bias.detach().clone()
    inmerge_(conv, InMergeSettings(**ALL), _gen(0))
    assert torch.equal(conv.bias, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_fp32_computation(dtype: torch.dtype) -> None:
    low = _conv_stack(0).to(dtype)
    ref = copy.deepcopy(low).float()  # Same values, upcast: the fp32 path InMerge must follow.
    config = InMergeSettings(rule="absolute", p=0.5, tau=0.0, skip_layers=0)
    s_low = inmerge_(low, config, _gen(3))
    s_ref = inmerge_(ref, config, _gen(3))
    assert s_low == s_ref and s_low.kernels_merged > 0
    for a, b in zip(_conv_weights(low), _conv_weights(ref), strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))


def test_fp16_cosine_does_not_overflow() -> None:
    # Similar kernels (cos ~ 0.9) whose squared norm (~5e5) overflows fp16 (max 65504): a cosine
    # computed in fp16 would be inf/inf = nan and merge nothing.
    torch.manual_seed(0)
    weight = torch.randn(1, 64, 3, 3) * 30 + torch.randn(8, 64, 3, 3) * 10
    conv = nn.Conv2d(64, 8, 3, bias=False).half()
    with torch.no_grad():
        conv.weight.copy_(weight)
    stats = inmerge_(conv, InMergeSettings(rule="absolute", p=1.0, tau=0.5, skip_layers=0), _gen(0))
    assert stats.kernels_merged == 8
    assert torch.isfinite(conv.weight).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_update_path_matches_compacted_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    # CPU gathers only the merged kernels; GPU uses one torch.where over all drawn kernels (no
    # host sync). Force the GPU path on CPU: both must give the same bits and stats.
    import medmerge_core.inmerge as inmerge_module

    compact = _conv_stack(0).to(dtype)
    masked = copy.deepcopy(compact)
    config = InMergeSettings(rule="absolute", p=0.5, tau=0.0, skip_layers=1)
    s_compact = inmerge_(compact, config, _gen(4))
    monkeypatch.setattr(inmerge_module, "_compact_on_host", lambda device: False)
    s_masked = inmerge_(masked, config, _gen(4))
    assert s_compact == s_masked and 0 < s_masked.kernels_merged < s_masked.kernels_drawn
    for a, b in zip(_conv_weights(compact), _conv_weights(masked), strict=True):
        assert torch.equal(a, b)
    state = {f"{i}.weight": w for i, w in enumerate(_conv_weights(_conv_stack(0)))}
    out_masked = inmerge_state_dict(state, list(state), config, _gen(4))
    monkeypatch.undo()
    out_compact = inmerge_state_dict(state, list(state), config, _gen(4))
    assert all(torch.equal(out_masked[k], out_compact[k]) for k in state)


def test_channels_last_gives_same_result() -> None:
    plain = _conv_stack(0)
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    config = InMergeSettings(rule="absolute", p=0.5, tau=0.0, skip_layers=1)
    assert inmerge_(plain, config, _gen(1)) == inmerge_(cl, config, _gen(1))
    for a, b in zip(_conv_weights(plain), _conv_weights(cl), strict=True):
        assert torch.equal(a, b)


# --- layers, modes, seeds -----------------------------------------------------------------------


def test_shallow_layers_bit_for_bit_untouched() -> None:
    model = _conv_stack(0)
    before = _conv_weights(model)
    stats = inmerge_(
        model, InMergeSettings(rule="absolute", p=1.0, tau=-1.0, skip_layers=2), _gen(0)
    )
    assert _changed_layers(before, model) == [False, False, True, True]
    assert stats == InMergeStats(layers=2, kernels_drawn=48, kernels_merged=48)


def test_eval_mode_never_touches_weights() -> None:
    model = _conv_stack(0).eval()
    before = _conv_weights(model)
    g = _gen(0)
    state = g.get_state()
    assert inmerge_(model, InMergeSettings(**ALL), g) == InMergeStats()
    assert not any(_changed_layers(before, model))
    assert torch.equal(g.get_state(), state)
    model.train()  # Sanity: the same call in training mode does merge.
    assert inmerge_(model, InMergeSettings(**ALL), g).kernels_merged > 0


def test_same_seed_same_result_different_seed_differs() -> None:
    config = InMergeSettings(rule="absolute", p=0.5, tau=-1.0, skip_layers=0)
    a, b, c = _conv_stack(0), _conv_stack(0), _conv_stack(0)
    inmerge_(a, config, _gen(7))
    inmerge_(b, config, _gen(7))
    inmerge_(c, config, _gen(8))
    wa, wb, wc = _conv_weights(a), _conv_weights(b), _conv_weights(c)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(wa, wc, strict=True))


# --- state-dict version -------------------------------------------------------------------------


def test_state_dict_version_pure_and_equal_to_in_place() -> None:
    with torch.no_grad():
        model = torchvision.models.get_model("resnet18", weights=None)
    model.train()
    keys = conv_weight_keys(model)
    state = model.state_dict()  # Aliases the parameters: in-place edits would show here.
    snapshot = {k: v.clone() for k, v in state.items()}
    config = InMergeSettings(rule="absolute", p=0.3, tau=0.0, skip_layers=4)

    merged = inmerge_state_dict(state, keys, config, _gen(11))

    assert merged is not state and merged.keys() == state.keys()
    assert all(torch.equal(state[k], snapshot[k]) for k in state)  # Input untouched.
    for k, v in state.items():
        if k not in keys:
            assert merged[k] is v
    assert sum(not torch.equal(merged[k], state[k]) for k in keys) > 0

    stats = inmerge_(model, config, _gen(11))
    assert stats.layers == len(keys) - 4 and stats.kernels_merged > 0
    after = model.state_dict()
    assert all(torch.equal(after[k], merged[k]) for k in after)


def test_merge_kernels_leaves_input_alone() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w0 = w.clone()
    out, drawn, merged = merge_kernels(w, InMergeSettings(**ALL), _gen(0))
    assert torch.equal(w, w0) and not torch.equal(out, w)
    assert (drawn, merged) == (8, 8)


def test_state_dict_rejects_bad_keys() -> None:
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4)}
    config = InMergeSettings(skip_layers=0)
    with pytest.raises(InputError, match=r"missing\.weight"):
        inmerge_state_dict(state, ["missing.weight"], config, _gen(0))
    with pytest.raises(InputError, match=r"fc\.weight: expected a 4-D"):
        inmerge_state_dict(state, ["conv.weight", "fc.weight"], config, _gen(0))


# --- config validation --------------------------------------------------------------------------


def test_config_error_message_names_field() -> None:
    with pytest.raises(InputError) as info:
        build(InMergeSettings, {"p": 1.5}, "inmerge.")  # as the YAML config reads it
    assert str(info.value) == "inmerge.p: must be in [0, 1], got 1.5"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("p", -0.1),
        ("p", float("nan")),
        ("p", "0.3"),
        ("tau", 1.01),
        ("tau", -1.5),
        ("alpha", 1.2),
        ("alpha", -0.2),
        ("skip_layers", -1),
        ("skip_layers", 2.5),
        ("skip_layers", True),
        ("start_epoch", -3),
    ],
)
def test_invalid_config_fields(field: str, value: object) -> None:
    with pytest.raises(InputError, match=rf"^{field}: "):
        InMergeSettings(**{field: value})


def test_config_defaults() -> None:
    config = InMergeSettings(start_epoch=2)
    assert (config.p, config.tau, config.alpha) == (0.3, 0.3, 0.8)
    assert (config.deep_fraction, config.skip_layers) == (0.5, None)
    from_numpy = InMergeSettings(p=np.float32(0.5), skip_layers=np.int64(3))  # e.g. from a sweep
    assert (from_numpy.p, from_numpy.skip_layers) == (0.5, 3)
    assert type(from_numpy.p) is float and type(from_numpy.skip_layers) is int


# --- the quantile rule (the default) ---------------------------------------------------------


def test_quantile_rule_merges_the_drawn_pairs_above_the_layers_own_quantile() -> None:
    """Every kernel is paired with its drawn partner; the drawn kernels whose cosine is above
    the q-quantile of those C cosines merge, and only they."""
    weight = torch.randn(64, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    config = InMergeSettings(p=1.0, q=0.75, alpha=0.5, skip_layers=0)
    out, drawn, merged = merge_kernels(weight, config, _gen(3))
    g = _gen(3)  # the documented draws
    torch.rand(64, generator=g)
    r = torch.randint(0, 63, (64,), generator=g)
    partner = r + (r >= torch.arange(64)).to(r.dtype)
    flat = weight.reshape(64, -1)
    cos = torch.nn.functional.cosine_similarity(flat, flat[partner], dim=1)
    expected = cos > torch.quantile(cos, 0.75)
    changed = (out != weight).flatten(1).any(1)
    assert drawn == 64 and merged == int(expected.sum()) == int(changed.sum())
    assert torch.equal(changed, expected)
    mean = 0.5 * (weight[expected] + weight[partner[expected]])
    assert torch.allclose(out[expected], mean, atol=1e-6)
