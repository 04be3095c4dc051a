"""The uint8 memmap cache (hit, rebuild on change, atomic write) and skip_bad_images."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from medmerge_core.data import cache
from medmerge_core.data.registry import load_task
from medmerge_core.errors import InputError
from tests.test_data_fixtures import aptos_tree, folder_tree, write_image

SIZE = 16


def spec_for(root: Path, cache_dir: Path | None, **extra) -> dict:
    return {"format": "aptos", "root": root, "cache_dir": cache_dir, "workers": 2, **extra}


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.rglob("*") if p.is_file())


def test_cache_hit_is_a_memmap_equal_to_decoding(tmp_path: Path, monkeypatch) -> None:
    root = aptos_tree(tmp_path / "aptos")
    cache_dir = tmp_path / "cache"
    built = load_task(spec_for(root, cache_dir), image_size=SIZE)
    assert set(built.notes["cache"].values()) <= {"built", "empty"}
    memory = load_task(spec_for(root, None), image_size=SIZE)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a warm cache must not decode")

    monkeypatch.setattr(cache, "load_image", no_decoding)
    hit = load_task(spec_for(root, cache_dir), image_size=SIZE)
    assert hit.notes["cache"]["train"] == "hit"
    assert isinstance(hit.train.images, np.memmap) and hit.train.images.dtype == np.uint8
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(hit.splits()[name].images, memory.splits()[name].images)
        np.testing.assert_array_equal(hit.splits()[name].labels, memory.splits()[name].labels)
    manifests = list(cache_dir.rglob("train-16px-rgb-*.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["shape"][1:] == [16, 16, 3]


def test_cache_keyed_by_size(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path / "aptos")
    load_task(spec_for(root, tmp_path / "c"), image_size=8)
    task = load_task(spec_for(root, tmp_path / "c"), image_size=SIZE)
    assert task.notes["cache"]["train"] == "built" and task.image_size == SIZE
    assert any("-8px-" in n for n in cache_files(tmp_path / "c"))


def test_cache_rebuilds_when_a_source_file_changes(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path / "aptos")
    cache_dir = tmp_path / "cache"
    first = load_task(spec_for(root, cache_dir), image_size=SIZE)
    ident = str(first.train.ids[0])
    path = root / "train_images" / f"{ident}.png"
    write_image(path, seed=123)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_task(spec_for(root, cache_dir), image_size=SIZE)
    assert second.notes["cache"]["train"] == "built"
    assert not np.array_equal(first.train.images[0], second.train.images[0])
    fresh = load_task(spec_for(root, None), image_size=SIZE)
    np.testing.assert_array_equal(second.train.images, fresh.train.images)
    assert load_task(spec_for(root, cache_dir), image_size=SIZE).notes["cache"]["train"] == "hit"


def test_failed_build_leaves_no_partial_cache(tmp_path: Path, monkeypatch) -> None:
    root = aptos_tree(tmp_path / "aptos")
    cache_dir = tmp_path / "cache"
    load_task(spec_for(root, cache_dir), image_size=SIZE)
    before = cache_files(cache_dir)
    (root / "train_images" / "0024cdab0c1e.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=r"0024cdab0c1e\.png is corrupt"):
        load_task(spec_for(root, cache_dir), image_size=SIZE)
    after = cache_files(cache_dir)
    assert not [n for n in after if ".tmp" in n]  # the temp file was removed
    assert len([n for n in after if n.endswith(".json")]) < len(
        [n for n in before if n.endswith(".json")]
    )  # the stale split's manifest is gone, so it can never be read as valid


def test_build_publishes_only_complete_files(tmp_path: Path, monkeypatch) -> None:
    root = folder_tree(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    published: list[tuple[str, int]] = []
    real_replace = os.replace

    def spy(src, dst):
        published.append((Path(dst).name, Path(src).stat().st_size))
        if str(dst).endswith(".u8"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", spy)
    spec = {
        "format": "image_folder",
        "root": root,
        "cache_dir": cache_dir,
        "fractions": [1.0, 0.0, 0.0],
    }
    with pytest.raises(OSError, match="disk full"):
        load_task(spec, image_size=SIZE)
    assert published == [(published[0][0], 6 * SIZE * SIZE * 3)]  # complete before publishing
    assert cache_files(cache_dir) == []
    monkeypatch.setattr(cache.os, "replace", real_replace)
    assert load_task(spec, image_size=SIZE).notes["cache"]["train"] == "built"


def test_skip_bad_images_counts_lists_and_caches(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path / "aptos")
    (root / "train_images" / "001639a390f0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "train_images" / "005b95c28852.png").unlink()
    png = root / "train_images" / "002c21358ce6.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # truncated
    run = tmp_path / "run"
    spec = spec_for(root, tmp_path / "cache", skip_bad_images=True, fractions=[1.0, 0.0, 0.0])
    task = load_task(spec, image_size=SIZE, run_dir=run)
    assert sorted(task.train.ids) == ["000c1434d8d7", "0024cdab0c1e"]
    assert task.notes["skipped_images"] == 3
    with open(run / "skipped_images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["file"] for r in rows) == [
        "train_images/001639a390f0.png",
        "train_images/002c21358ce6.png",
        "train_images/005b95c28852.png",
    ]
    assert {r["file"]: r["reason"] for r in rows}["train_images/005b95c28852.png"] == (
        "file not found"
    )
    assert len((run / "split.csv").read_text().splitlines()) == 6  # the split lists every row
    labels = dict(zip(task.train.ids, task.train.labels, strict=True))
    assert labels == {"000c1434d8d7": 0, "0024cdab0c1e": 2}  # labels follow the kept images
    hit = load_task(spec, image_size=SIZE)
    assert hit.notes["cache"]["train"] == "hit" and hit.notes["skipped_images"] == 3
    with pytest.raises(InputError, match=r"train\.csv row 3: image 001639a390f0\.png is corrupt"):
        load_task({**spec, "skip_bad_images": False}, image_size=SIZE)


def test_skip_bad_images_writes_empty_list_when_nothing_is_bad(tmp_path: Path) -> None:
    root = aptos_tree(tmp_path / "aptos")
    task = load_task(
        spec_for(root, None, skip_bad_images=True), image_size=8, run_dir=tmp_path / "run"
    )
    assert task.notes["skipped_images"] == 0
    assert (tmp_path / "run" / "skipped_images.csv").read_text().strip() == "file,reason"


def test_an_error_stops_decoding_soon(tmp_path: Path, monkeypatch) -> None:
    root = folder_tree(tmp_path / "imgs", per_class=30)
    (root / "benign" / "benign_1.png").write_bytes(b"junk")
    calls = []
    real = cache.load_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "load_image", counting)
    spec = {"format": "image_folder", "root": root, "workers": 2, "fractions": [1.0, 0.0, 0.0]}
    with pytest.raises(InputError, match=r"benign/benign_1\.png"):
        load_task(spec, image_size=8)
    assert len(calls) <= 12  # a bounded window (4 per thread), not all 60 images
