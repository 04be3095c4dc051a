"""`medmerge evaluate` and `medmerge export` on a tiny run: the scores repeat the run's own,
the export round-trips bit for bit, ONNX and the docs' plain-torch snippet give the model's
outputs, old checkpoints stay readable and bad input is one line that writes nothing."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medmerge_core.cli import main
from medmerge_core.data.base import GRAY_MEAN, GRAY_STD, normalize_batch, preprocessing_record
from medmerge_core.data.synthetic import make_task
from medmerge_core.errors import InputError
from medmerge_core.experiment.config import config_from_dict
from medmerge_core.experiment.runner import run_experiment
from medmerge_core.io import atomic_torch_save, load_torch_file
from medmerge_core.models import build_model, save_checkpoint
from medmerge_core.saved_model import load_saved_model, to_channels

TRAINED_MODELS = Path(__file__).resolve().parents[1] / "docs" / "trained-models.md"
SIZE = 16
N_TEST = 24
DATA = ["format=synthetic", "task=target", "n_train=8", "n_val=4", f"n_test={N_TEST}"]
DATA_ARGS = [arg for pair in DATA for arg in ("--data", pair)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run with two models (ft:a, ft:b): resnet18, 1 channel, 16x16, 3 classes."""
    out = tmp_path_factory.mktemp("runs")
    config = config_from_dict(
        {
            "name": "tiny",
            "output_dir": str(out),
            "data": {
                "format": "synthetic",
                "task": "target",
                "n_train": 24,
                "n_val": 12,
                "n_test": N_TEST,
            },
            "sources": {"a": "random:1", "b": "random:2"},
            "model": {"arch": "resnet18", "image_size": SIZE},
            "pipelines": ["ft"],
            "ft": {"epochs": 1, "lr": 1e-3},
            "batch_size": 12,
            "device": "cpu",
        }
    )
    run_experiment(config, show_progress=False)
    return out / "tiny"


def target_inputs(n: int = 5, seed: int = 0) -> torch.Tensor:
    """Images of the target task at the run's size, normalised as in training."""
    return normalize_batch(make_task("target", image_size=SIZE, seed=seed, n_test=n).test.images)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# 1. The checkpoint records how to feed the model ----------------------------------------


def test_run_checkpoints_record_their_preprocessing_and_classes(run_dir) -> None:
    saved = load_torch_file(run_dir / "checkpoints" / "ft_a.pt", "x")
    assert saved["preprocessing"] == preprocessing_record(SIZE, 1)
    assert saved["preprocessing"]["mean"] == list(GRAY_MEAN)
    assert saved["preprocessing"]["std"] == list(GRAY_STD)
    assert saved["class_names"] == list(make_task("target", n_test=1).class_names)
    assert saved["multilabel"] is False
    assert set(saved["software"]) >= {"medmerge-federation", "git_commit"}


# 2. evaluate ----------------------------------------------------------------------------


def test_evaluate_repeats_the_runs_own_test_scores(run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(run_dir), "--method", "ft:a", *DATA_ARGS, "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "AUROC" in printed and "sensitivity" in printed and "95% CI" in printed
    report = json.loads(out.read_text())
    run = json.loads((run_dir / "results.json").read_text())["ft:a"]
    for key in ("accuracy", "macro_f1", "auroc"):  # same images, same preprocessing
        assert report["metrics"][key] == pytest.approx(run["test"][key], abs=1e-12), key
    assert report["clinical"]["ci95"] == run["clinical"]["ci95"]
    assert report["clinical"]["per_class"] == run["clinical"]["per_class"]
    assert report["images"] == N_TEST and report["split"] == "test"
    assert report["model"]["method"] == "ft:a" and mode(out) == 0o644

    # a checkpoint file scores the same, and --method also takes the file name
    assert main(["evaluate", str(run_dir / "checkpoints" / "ft_a.pt"), *argv[4:]]) == 0
    assert main(["evaluate", str(run_dir), "--method", "ft_a", *argv[4:]]) == 0
    capsys.readouterr()


def test_evaluate_on_all_splits_and_without_out_writes_nothing(run_dir, tmp_path, capsys):
    before = sorted(p.name for p in run_dir.rglob("*"))
    argv = ["evaluate", str(run_dir), "--method", "ft:b", *DATA_ARGS, "--split", "all"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert f"{8 + 4 + N_TEST} images" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_gray_and_rgb_conversions_match_pil() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    np.testing.assert_array_equal(to_channels(rgb, 1), pil)
    gray = pil
    pil_rgb = np.stack([np.asarray(Image.fromarray(image).convert("RGB")) for image in gray])
    np.testing.assert_array_equal(to_channels(gray, 3), pil_rgb)
    assert to_channels(gray, 1) is gray


# 3. Choosing a run folder's model -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (None, "--method: {run} has 2 models; pick one of ft:a, ft:b"),
        ("ft", "--method: 'ft' is ambiguous in {run}; pick one of ft:a, ft:b"),
        ("medmerge", "--method: no model 'medmerge' in {run}; available: ft:a, ft:b"),
    ],
)
def test_a_missing_or_ambiguous_method_lists_the_models(run_dir, capsys, method, message):
    argv = ["export", str(run_dir), "--out", str(run_dir.parent / "never")]
    assert main(argv + (["--method", method] if method else [])) == 2
    assert one_line_error(capsys) == f"error: {message.format(run=run_dir)}"
    assert not (run_dir.parent / "never").exists()


# 4. Bad input: one line naming the file or field, exit 2, nothing written ---------------


@pytest.fixture
def truncated(run_dir, tmp_path) -> Path:
    path = tmp_path / "cut.pt"
    path.write_bytes((run_dir / "checkpoints" / "ft_a.pt").read_bytes()[:1000])
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "{tmp}/nope: no such run folder or checkpoint file"),
        ("truncated", "{tmp}/cut.pt: cannot load checkpoint ("),
        ("format", "--data.format: unknown value 'nope'"),
        ("key", "--data.n_tset: unknown option for format 'synthetic'"),
        ("classes", "--data: 'generic' has 10 classes"),
        ("split", "argparse"),
        ("out_is_folder", "--out: {tmp} is a folder; give a .json file"),
        ("method_on_file", "--method: {run}/checkpoints/ft_a.pt is a checkpoint file"),
    ],
)
def test_bad_evaluate_input_is_one_line_and_writes_nothing(
    run_dir, tmp_path, truncated, capsys, case, expected
) -> None:
    model, data, extra = str(run_dir), list(DATA), ["--method", "ft:a"]
    out = tmp_path / "eval.json"
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "truncated":
        model, extra = str(truncated), []
    elif case == "format":
        data = ["format=nope"]
    elif case == "key":
        data = [*DATA, "n_tset=3"]
    elif case == "classes":
        data = ["format=synthetic", "task=generic", "n_test=8"]
    elif case == "out_is_folder":
        out = tmp_path
    elif case == "method_on_file":
        model = str(run_dir / "checkpoints" / "ft_a.pt")
    argv = ["evaluate", model, *extra, *(a for d in data for a in ("--data", d))]
    argv += ["--device", "cpu", "--out", str(out)]
    if case == "split":
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--split", "holdout"])
        assert exit_info.value.code == 2 and "--split" in capsys.readouterr().err
    else:
        assert main(argv) == 2
        assert one_line_error(capsys).startswith(
            "error: " + expected.format(tmp=tmp_path, run=run_dir)
        )
    assert not (tmp_path / "eval.json").exists()


def test_bad_export_input_is_one_line_and_writes_nothing(run_dir, truncated, tmp_path, capsys):
    occupied = tmp_path / "a_file"
    occupied.write_text("x")
    assert main(["export", str(run_dir), "--method", "ft:a", "--out", str(occupied)]) == 2
    assert one_line_error(capsys) == f"error: --out: {occupied} exists and is not a folder"
    assert occupied.read_text() == "x"
    assert main(["export", str(truncated), "--out", str(tmp_path / "e")]) == 2
    assert one_line_error(capsys).startswith(f"error: {truncated}: cannot load checkpoint")
    assert not (tmp_path / "e").exists()


# 5. export ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "export"
    assert main(["export", str(run_dir), "--method", "ft:a", "--out", str(out)]) == 0
    return out


def test_export_round_trips_the_state_dict_bit_for_bit(run_dir, exported) -> None:
    from safetensors.torch import load_file

    original = load_torch_file(run_dir / "checkpoints" / "ft_a.pt", "x")["state_dict"]
    loaded = load_file(exported / "model.safetensors")
    assert list(loaded) == list(original) or set(loaded) == set(original)
    for key, tensor in original.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key
        assert loaded[key].numpy().tobytes() == tensor.numpy().tobytes(), key
    for name in ("model.safetensors", "model.json", "model.onnx"):
        if (exported / name).exists():
            assert mode(exported / name) == 0o644, name


def test_model_json_says_how_to_rebuild_and_feed_the_model(run_dir, exported) -> None:
    meta = json.loads((exported / "model.json").read_text())
    run = json.loads((run_dir / "results.json").read_text())["ft:a"]
    assert (meta["arch"], meta["num_classes"], meta["in_channels"]) == ("resnet18", 3, 1)
    assert meta["class_names"] == run["clinical"]["classes"]
    assert meta["image_size"] == SIZE and meta["multilabel"] is False
    assert meta["mean"] == list(GRAY_MEAN) and meta["std"] == list(GRAY_STD)
    assert meta["stem"] == {
        "module": "conv1",
        "conv2d": {"in_channels": 1, "out_channels": 64, "kernel_size": [7, 7],
                   "stride": [2, 2], "padding": [3, 3], "dilation": [1, 1], "groups": 1,
                   "bias": False},
    }  # fmt: skip
    assert meta["state_dict"]["head"] == "fc"
    environment = [json.loads(line) for line in (run_dir / "environment.jsonl").open()]
    assert meta["software"]["git_commit"] == environment[-1]["git_commit"]
    assert (
        meta["software"]["medmerge-federation"]
        == environment[-1]["packages"]["medmerge-federation"]
    )
    assert meta["source"]["method"] == "ft:a"


def test_onnx_gives_the_pytorch_outputs(run_dir, exported) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    meta = json.loads((exported / "model.json").read_text())
    assert meta["onnx"]["file"] == "model.onnx"
    x = target_inputs(7)
    with torch.no_grad():
        expected = load_saved_model(run_dir, "ft:a").build()(x).numpy()
    session = ort.InferenceSession(str(exported / "model.onnx"))
    (got,) = session.run(None, {"input": x.numpy()})
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_without_onnx_the_export_says_so_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
    import medmerge_core.export as export

    monkeypatch.setattr(export, "onnx_available", lambda: False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"stale")
    assert main(["export", str(run_dir), "--method", "ft:b", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "model.onnx" in line]
    assert lines == [
        "onnx is not installed: skipped model.onnx (pip install 'medmerge-federation[export]')"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert json.loads((out / "model.json").read_text())["onnx"] is None


def test_an_onnx_exporter_failure_skips_only_model_onnx(run_dir, tmp_path, monkeypatch, capsys):
    import medmerge_core.export as export

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator x [Caused by a long graph]")

    monkeypatch.setattr(export, "onnx_available", lambda: True)
    monkeypatch.setattr(export, "onnx_bytes", unsupported)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--method", "ft:b", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "skipped model.onnx: torch's ONNX exporter failed (RuntimeError: Unsupported: ONNX "
        "export of operator x)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]


# 6. The docs' snippet, executed as written ---------------------------------------------


def docs_snippets() -> tuple[str, str]:
    """(the five-line loading snippet, the cifar_resnet replacement) of docs/trained-models.md."""
    section = TRAINED_MODELS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "expected the loading snippet and its cifar_resnet lines"
    assert len([line for line in blocks[0].splitlines() if line.strip()]) == 5  # code lines
    return blocks[0], blocks[1]


def run_snippet(code: str, folder: Path, monkeypatch) -> torch.nn.Module:
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(code, str(TRAINED_MODELS), "exec"), namespace)
    return namespace["model"]


def test_the_docs_snippet_loads_a_grayscale_export(run_dir, exported, monkeypatch) -> None:
    snippet, _ = docs_snippets()
    model = run_snippet(snippet, exported.parent, monkeypatch)
    meta = json.loads((exported / "model.json").read_text())
    pixels = make_task("target", image_size=SIZE, seed=3, n_test=6).test.images
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    x = (torch.from_numpy(pixels).float().unsqueeze(1) / 255 - mean) / std  # as the docs say
    with torch.no_grad():
        expected = load_saved_model(run_dir, "ft:a").build()(normalize_batch(pixels))
        got = model(x)
    assert not model.training
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_docs_cifar_lines_load_a_cifar_resnet_export(tmp_path, monkeypatch) -> None:
    snippet, cifar = docs_snippets()
    lines = snippet.strip().splitlines()
    code = "\n".join([*lines[:2], *cifar.strip().splitlines(), *lines[4:]]) + "\n"
    torch.manual_seed(0)
    original = build_model("cifar_resnet20", 2, 1).eval()
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for module in original.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    checkpoint = tmp_path / "c20.pt"  # a standalone checkpoint, outside any run folder
    save_checkpoint(
        checkpoint, original, "cifar_resnet20", preprocessing=preprocessing_record(20, 1)
    )
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    model = run_snippet(code, tmp_path, monkeypatch)
    x = torch.randn(4, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-6, rtol=1e-6)


# 7. Old checkpoints stay readable -------------------------------------------------------


def test_checkpoints_without_the_record_fall_back_to_what_was_recorded(run_dir, tmp_path):
    saved = load_torch_file(run_dir / "checkpoints" / "ft_b.pt", "x")
    old = {k: v for k, v in saved.items() if k not in ("preprocessing", "class_names",
                                                       "multilabel", "software")}  # fmt: skip
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    atomic_torch_save(old, copy / "checkpoints" / "ft_b.pt")
    model = load_saved_model(copy, "ft:b")  # config.yaml and results.json fill in
    assert (model.image_size, model.in_channels, model.mean) == (SIZE, 1, GRAY_MEAN)
    assert model.class_names == tuple(saved["class_names"])
    assert model.software is not None and "git_commit" in model.software

    alone = tmp_path / "alone.pt"  # outside its run folder nothing says the size: refused
    atomic_torch_save(old, alone)
    with pytest.raises(InputError, match=re.escape(f"{alone}: records no image size")):
        load_saved_model(alone)

    pretrained = tmp_path / "pretrained.pt"  # `medmerge pretrain` records its task
    settings = {"task": {"image_size": 24, "in_channels": 1, "classes": ["x", "y", "z"]}}
    atomic_torch_save({**old, "settings": settings}, pretrained)
    model = load_saved_model(pretrained)
    assert (model.image_size, model.class_names) == (24, ("x", "y", "z"))
