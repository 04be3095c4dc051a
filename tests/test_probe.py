"""The learned merge: GPU code paths on CPU, its own optimiser settings, constraints, exact
resume, and the per-kernel report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medmerge_core.io as medmerge_io
import medmerge_core.train as train_module
from medmerge_core.cli import main
from medmerge_core.coefficients import coefficient_summary
from medmerge_core.coerce import build
from medmerge_core.data.base import BatchLoader
from medmerge_core.errors import InputError
from medmerge_core.merge import MergedModel, project_to_simplex
from medmerge_core.models import build_model, load_source, save_checkpoint
from medmerge_core.probe import learn_merge
from medmerge_core.settings import ProbeSettings, StageSettings
from medmerge_core.train import FitOptions, Runtime, fit


class Interrupt(Exception):
    pass


def sources(n: int = 2, arch: str = "resnet18") -> list[dict[str, torch.Tensor]]:
    return [load_source(f"random:{i + 1}", arch, 1) for i in range(n)]


def probe(constraint: str = "none", n: int = 2) -> MergedModel:
    torch.manual_seed(0)
    return MergedModel(
        build_model("resnet18", 2, 1),
        sources(n),
        [f"s{i}" for i in range(n)],
        constraint=constraint,  # type: ignore[arg-type]
    )


def run_probe(tiny_task, settings: ProbeSettings, lr: float = 1e-3, arch="resnet18", **kwargs):
    torch.manual_seed(0)
    return learn_merge(
        build_model(arch, 2, 1),
        sources(arch=arch),
        ["a", "b"],
        BatchLoader(tiny_task.train, 32, shuffle=True),
        BatchLoader(tiny_task.val, 32),
        settings,
        lr,
        0.01,
        kwargs.pop("runtime", Runtime.detect("cpu")),
        options=FitOptions(name="medmerge probe", show_progress=False),
        **kwargs,
    )


# --- every device path runs on CPU ----------------------------------------------------------


@pytest.mark.parametrize(("amp", "channels_last"), [(False, True), (True, False), (True, True)])
def test_probe_equals_bake_on_the_gpu_code_paths(tiny_task, amp, channels_last) -> None:
    runtime = Runtime.detect("cpu", amp=amp, channels_last=channels_last)
    merged = runtime.model(probe())  # 5-D coefficients: Module.to(channels_last) would fail
    fit(
        merged,
        BatchLoader(tiny_task.train, 32, shuffle=True),
        BatchLoader(tiny_task.val, 32),
        StageSettings(0, 1e-3, steps=2),
        runtime,
        param_groups=merged.parameter_groups(0.05, 1e-3, 0.01),
        options=FitOptions(show_progress=False),
    )
    baked = runtime.model(merged.bake()).eval()
    merged.eval()
    x = runtime.inputs(next(iter(BatchLoader(tiny_task.val, 8)))[0])
    with torch.no_grad(), runtime.autocast():
        difference = (merged(x).float() - baked(x).float()).abs().max().item()
    assert difference <= 1e-5
    assert max(float((c.detach() - 0.5).abs().max()) for c in merged.coefficients) > 0.01
    conv = merged.merged_tensors()["layer1.0.conv1.weight"]  # the kernels the baked model runs
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_merged_tensors_stay_fp32_under_autocast() -> None:
    """Under bf16, w = 0.5 + 1e-4 and 0.5 + 5e-4 would give the same merged weights."""
    merged = probe()
    outputs = []
    for delta in (1e-4, 5e-4):
        with torch.no_grad():
            for coef in merged.coefficients:
                coef.fill_(0.5 + delta)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tensors = merged.merged_tensors()
        outputs.append(tensors["layer4.1.conv2.weight"])
    assert outputs[0].dtype == torch.float32
    assert not torch.equal(outputs[0], outputs[1])


def test_every_pipeline_runs_with_channels_last_and_bf16_autocast(tiny_task, tmp_path) -> None:
    from medmerge_core.experiment import run_experiment
    from medmerge_core.experiment.config import config_from_dict

    for seed in (1, 2):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"src{seed}.pt", build_model("resnet18", 4, 1), "resnet18")
    config = config_from_dict(
        {
            "name": "gpu-paths",
            "output_dir": str(tmp_path / "runs"),
            "data": {"format": "synthetic", "task": "target"},
            "sources": {"a": str(tmp_path / "src1.pt"), "b": str(tmp_path / "src2.pt")},
            "model": {"arch": "resnet18", "image_size": 32},
            "lp": {"epochs": 1, "lr": 1e-3},
            "ft": {"epochs": 1, "lr": 1e-4},
            "merge": {"steps": 2},
            "device": "cpu",
            "amp": True,
            "channels_last": True,
        }
    )
    results = run_experiment(config, task=tiny_task, show_progress=False)
    assert list(results) == ["ft:a", "ft:b", "lp_ft:a", "lp_ft:b", "average_ft", "medmerge"]
    assert all(np.isfinite(r["test"]["accuracy"]) for r in results.values())


# --- the probe's own optimiser settings -----------------------------------------------------


def test_no_weight_decay_reaches_the_coefficients(tiny_task, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "task_loss", lambda logits, y, m: (logits * 0.0).sum())
    untrained = run_probe(tiny_task, ProbeSettings(steps=0))
    learned = run_probe(tiny_task, ProbeSettings(steps=3))
    for key, value in untrained.coefficients.items():
        assert np.array_equal(learned.coefficients[key], value), key
    # The control: weight decay did act on the head in the same steps.
    assert not torch.equal(untrained.model.fc.weight, learned.model.fc.weight)


def test_the_coefficient_learning_rate_is_independent(tiny_task) -> None:
    slow = run_probe(tiny_task, ProbeSettings(steps=1, coef_lr=1e-3))
    fast = run_probe(tiny_task, ProbeSettings(steps=1, coef_lr=2e-3))
    key = "layer3.0.conv1.weight"
    moved_slow = np.abs(slow.coefficients[key][0] - 0.5)
    moved_fast = np.abs(fast.coefficients[key][0] - 0.5)
    assert moved_slow.max() > 0
    np.testing.assert_allclose(moved_fast, 2 * moved_slow, rtol=1e-3, atol=1e-7)
    for name in ("fc.weight", "bn1.weight", "layer3.0.bn1.bias"):
        assert torch.equal(slow.model.state_dict()[name], fast.model.state_dict()[name]), name


def test_default_budget_moves_kernels_beyond_the_old_cap(tiny_task_16px) -> None:
    """Before, the probe took the LP settings (default 10 epochs at lr 1e-4: 20 steps on this
    64-image task) and AdamW moved no coefficient by more than ~lr x steps = 0.002."""
    old_cap = 1e-4 * 10 * 2
    learned = run_probe(tiny_task_16px, ProbeSettings(), arch="shufflenet_v2_x0_5")
    movement = np.concatenate([np.abs(v[0] - 0.5).ravel() for k, v in learned.coefficients.items()])
    assert np.median(movement) > old_cap
    assert movement.max() > 10 * old_cap


def test_step_budget_counts_optimiser_steps(tiny_task) -> None:
    merged, steps = probe(), []
    result = fit(
        merged,
        BatchLoader(tiny_task.train, 32, shuffle=True),  # 2 steps per epoch: 2 + 2 + 1
        BatchLoader(tiny_task.val, 32),
        StageSettings(0, 1e-3, steps=5),
        Runtime.detect("cpu"),
        param_groups=merged.parameter_groups(1e-2, 1e-3, 0.01),
        after_step=lambda: steps.append(1),
        options=FitOptions(show_progress=False),
    )
    assert len(steps) == 5 and len(result.history) == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 5, "epochs": 2}, "not both"),
        ({"coef_lr": 0.0}, "merge.coef_lr"),
        ({"constraint": "simplex"}, "merge.constraint"),
        ({"steps": -1}, "merge.steps"),
    ],
)
def test_bad_probe_settings_are_one_line_errors(settings, message) -> None:
    with pytest.raises(InputError, match=message):
        build(ProbeSettings, settings, "merge.")  # as the YAML config reads it


def test_federation_probe_keys_reach_the_probe_settings() -> None:
    from medmerge_core.federation.config import FederationConfig

    cfg = FederationConfig.from_run_config(
        {"probe-steps": 7, "probe-coef-lr": 0.05, "probe-constraint": "clamp"}
    )
    assert cfg.probe == ProbeSettings(steps=7, coef_lr=0.05, constraint="clamp")
    by_epochs = FederationConfig.from_run_config({"probe-steps": 300, "probe-epochs": 2})
    assert by_epochs.probe == ProbeSettings(epochs=2)  # the pyproject's steps, epochs > 0 win
    with pytest.raises(InputError, match=r"run config probe-steps: .*not both"):
        FederationConfig.from_run_config({"probe-steps": 7, "probe-epochs": 2})
    with pytest.raises(InputError, match=r"run config probe-constraint"):
        FederationConfig.from_run_config({"probe-constraint": "simplex"})


def test_the_old_merge_lr_key_points_to_its_replacement() -> None:
    from medmerge_core.experiment.config import config_from_dict

    with pytest.raises(InputError, match=r"merge.lr: .*merge.coef_lr.*lp.lr"):
        config_from_dict(
            {
                "name": "x",
                "data": {"format": "synthetic"},
                "sources": {"a": "zeros", "b": "zeros"},
                "merge": {"lr": 0.1},
            }
        )


def test_the_server_screens_the_coordinator_coefficients() -> None:
    from medmerge_core.federation.validation import check_coefficients

    reference = build_model("resnet18", 2, 1).state_dict()
    good = {"layer1.0.conv1.weight": np.full((2, 64, 1, 1, 1), 0.5, np.float32)}
    assert check_coefficients(good, reference, 2) is None
    assert "shape" in check_coefficients(good, reference, 3)
    bad = {"layer1.0.conv1.weight": np.full((2, 64, 3, 1, 1), 0.5, np.float32)}
    assert "shape" in check_coefficients(bad, reference, 2)
    good["layer1.0.conv1.weight"][1, 3] = np.nan
    assert "NaN" in check_coefficients(good, reference, 2)
    assert "unknown" in check_coefficients({"images": np.zeros((2, 1))}, reference, 2)


# --- constraints ----------------------------------------------------------------------------


def test_simplex_projection_matches_hand_computed_values() -> None:
    free = torch.tensor([[1.4, -0.2, 0.3], [0.5, 0.5, 0.3]])  # d = 3: columns are kernels
    # full vectors (columns): (1.4, .5, -.9), (-.2, .5, .7), (.3, .3, .4); the last is unchanged
    projected = torch.cat([p := project_to_simplex(free), 1 - p.sum(0, keepdim=True)])
    expected = torch.tensor([[0.95, 0.0, 0.3], [0.05, 0.4, 0.3], [0.0, 0.6, 0.4]])
    torch.testing.assert_close(projected, expected)
    w = torch.tensor([[-0.3, 0.2, 1.7]])  # d = 2: a clamp to [0, 1]
    torch.testing.assert_close(project_to_simplex(w), torch.tensor([[0.0, 0.2, 1.0]]))


@pytest.mark.parametrize("constraint", ["clamp", "softmax"])
def test_constrained_probes_stay_convex(tiny_task, constraint) -> None:
    learned = run_probe(tiny_task, ProbeSettings(steps=6, coef_lr=0.3, constraint=constraint))
    for key, coef in learned.coefficients.items():
        assert coef.min() >= -1e-6 and coef.max() <= 1 + 1e-6, key
        np.testing.assert_allclose(coef.sum(0), 1.0, atol=1e-5)
    moved = max(np.abs(c - 0.5).max() for c in learned.coefficients.values())
    assert moved > 0.05


def test_softmax_starts_uniform_and_is_a_sigmoid_at_two_sources() -> None:
    merged = probe("softmax", n=3)
    coef = next(iter(merged.coefficient_arrays().values()))
    np.testing.assert_allclose(coef, 1 / 3, atol=1e-6)
    two = probe("softmax")
    with torch.no_grad():
        two.coefficients[0][0].fill_(0.7)
        two.coefficients[0][1].fill_(-0.1)
    w = next(iter(two.coefficient_map().values()))
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor(0.8)).expand_as(w))


# --- exact resume ---------------------------------------------------------------------------


def test_an_interrupted_probe_resumes_bit_for_bit(tiny_task, tmp_path) -> None:
    draws: dict[str, list[float]] = {}

    def run(checkpoint, interrupt_at=None):
        torch.manual_seed(0)
        merged = probe("clamp")
        runtime = Runtime.detect("cpu")

        def hook(model, epoch):
            if epoch == interrupt_at:
                raise Interrupt
            if epoch == 2:  # the global RNG must be where an uninterrupted run has it
                draws.setdefault(checkpoint.name, []).append(float(torch.rand(1)))

        result = fit(
            merged,
            BatchLoader(tiny_task.train, 16, shuffle=True, seed=3),
            BatchLoader(tiny_task.val, 32),
            StageSettings(3, 1e-3),
            runtime,
            param_groups=merged.parameter_groups(0.05, 1e-3, 0.01),
            after_step=merged.project_,
            before_step=hook,
            options=FitOptions(
                checkpoint=checkpoint,
                checkpoint_minutes=0,  # after every epoch: the interruption resumes mid-stage
                show_progress=False,
            ),
        )
        return merged, result

    whole, whole_result = run(tmp_path / "whole.pt")
    with pytest.raises(Interrupt):
        run(tmp_path / "cut.pt", interrupt_at=2)
    resumed, resumed_result = run(tmp_path / "cut.pt")
    assert draws["cut.pt"] == draws["whole.pt"]
    assert [h["train_loss"] for h in resumed_result.history] == [
        h["train_loss"] for h in whole_result.history
    ]
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("minutes", [0, 10])
def test_an_interrupted_medmerge_run_resumes_bit_for_bit(tiny_task, tmp_path, monkeypatch, minutes):
    """Through `medmerge run`: killed while logging the FT stage's epoch 1 (of 0-2). With a
    checkpoint after every epoch it resumes at epoch 1; with one every 10 minutes it trains the
    stage again from epoch 0. Either way metrics.jsonl lists each epoch once."""
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"src{seed}.pt", build_model("resnet18", 4, 1), "resnet18")
    monkeypatch.setattr(
        "medmerge_core.data.registry.load_task", lambda *a, **k: tiny_task
    )  # the config's data block is validated, the tiny task is what it loads

    def config(out: str):
        path = tmp_path / f"{out}.yaml"
        path.write_text(
            f"name: resume\noutput_dir: {tmp_path / out}\n"
            "data: {format: synthetic, task: target}\n"
            f"sources: {{a: {tmp_path / 'src1.pt'}, b: {tmp_path / 'src2.pt'}}}\n"
            "model: {arch: resnet18, image_size: 32}\npipelines: [medmerge]\n"
            "lp: {epochs: 1, lr: 1.0e-3}\nft: {epochs: 3, lr: 1.0e-3}\nmerge: {steps: 5}\n"
            "inmerge: {p: 0.5, tau: -1.0, skip_layers: 15}\ndevice: cpu\n"
            f"checkpoint_minutes: {minutes}\n"
        )
        return str(path)

    assert main(["run", config("whole"), "--no-progress"]) == 0
    real_append = medmerge_io.append_jsonl

    def append_then_die(path, record):
        if record["stage"].endswith(" ft") and record["epoch"] == 1:
            raise Interrupt
        real_append(path, record)

    monkeypatch.setattr(train_module, "append_jsonl", append_then_die)
    with pytest.raises(Interrupt):
        main(["run", config("cut"), "--no-progress"])
    monkeypatch.setattr(train_module, "append_jsonl", real_append)
    assert main(["run", config("cut"), "--no-progress"]) == 0

    whole, cut = tmp_path / "whole" / "resume", tmp_path / "cut" / "resume"
    assert (whole / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()
    a = torch.load(whole / "checkpoints" / "medmerge.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "checkpoints" / "medmerge.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((d / "results.json").read_text())["medmerge"] for d in (whole, cut)]
    assert results[0]["test"] == results[1]["test"]


# --- the report -----------------------------------------------------------------------------


def test_coefficient_summary_counts_preferences_and_movement() -> None:
    w = np.array([0.9, 0.6, 0.5, 0.3, 0.1], dtype=np.float32)  # 5 kernels, source 0
    rows = coefficient_summary({"conv.weight": np.stack([w, 1 - w]).reshape(2, 5, 1, 1, 1)})
    (row,) = rows
    assert row["prefers"] == pytest.approx([0.4, 0.4]) and row["ties"] == pytest.approx(0.2)
    assert row["movement"]["q50"] == pytest.approx(0.2)
    assert row["movement"]["max"] == pytest.approx(0.4)
    assert row["mean"][0] == pytest.approx(0.48)


def test_every_probe_writes_its_report(tiny_task, tmp_path) -> None:
    run_probe(tiny_task, ProbeSettings(steps=2), report_dir=tmp_path)
    summary = json.loads((tmp_path / "coefficient_summary.json").read_text())
    assert summary["sources"] == ["a", "b"] and len(summary["layers"]) == 20
    assert set(summary["layers"][0]["movement"]) == {"q50", "q90", "q99", "max"}
    assert (tmp_path / "coefficients.png").stat().st_size > 5000
    with np.load(tmp_path / "coefficients.npz") as arrays:
        assert arrays["coef/layer4.1.conv2.weight"].shape[:2] == (2, 512)
