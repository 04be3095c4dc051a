"""Decode every image of a split once, at the training size, into a uint8 memory-mapped file.

Layout: <cache_dir>/<dataset>/<split>-<size>px-<color>-<hash of the file list>.u8 (raw rows,
no header) beside a .json manifest. The manifest holds a fingerprint of every source file's
path, size and mtime (plus size, colour and cache version), the array shape and the images
that could not be decoded. A changed, added or removed file changes the fingerprint and the
split is rebuilt. Builds write to a temp file, then os.replace it and then the manifest, so a
crash or a concurrent reader never sees a half-written cache. Without a cache_dir the same
code fills an in-memory array. Normalisation is not cached: base.normalize_batch does it per
batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import deque
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medmerge_core.data.formats.common import display
from medmerge_core.data.images import BadImageError, load_image
from medmerge_core.errors import InputError

CACHE_VERSION = 1
MODE_NAMES = {"gray": "grayscale", "rgb": "RGB"}


class Source(Protocol):
    """What the cache needs of a record: the file, and where it is named (for errors)."""

    path: Path
    where: str
    look_in: str


@dataclass(frozen=True)
class Skipped:
    split: str
    file: str
    reason: str
    message: str


@dataclass(frozen=True)
class Materialized:
    """Per split: images (np.memmap when cached), indices of the sources they hold, status."""

    images: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]
    skipped: tuple[Skipped, ...]
    mode: str
    status: dict[str, str]


def materialize(
    splits: Mapping[str, Sequence[Source]],
    *,
    size: int,
    color: str | None,
    root: Path,
    dataset: str,
    cache_dir: Path | None = None,
    skip_bad: bool = False,
    workers: int = 2,
) -> Materialized:
    """Decode (or load from cache) every split; bad images raise, or are skipped and listed."""
    check = _ModeCheck(color)
    images: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    status: dict[str, str] = {}
    skipped: list[Skipped] = []
    job = _Job(size, color, root, skip_bad, workers, check)
    for split, sources in splits.items():
        if not sources:
            continue
        if cache_dir is None:
            array, index, bad = job.fill(split, sources, None)
            images[split], status[split] = array, "memory"
        else:
            entry = _Entry(cache_dir, dataset, split, size, color, sources)
            loaded = entry.load(job)
            if loaded is None:
                loaded = entry.build(job)
                status[split] = "built"
            else:
                status[split] = "hit"
            images[split], index, bad = loaded
        kept[split] = np.asarray(index, dtype=np.int64)
        skipped += bad
    if check.mode is None:
        raise InputError(f"{display(root, None)}: the dataset has no images")
    for split, sources in splits.items():
        if not sources:
            images[split] = np.zeros((0, *_pixel_shape(size, check.mode)), np.uint8)
            kept[split], status[split] = np.zeros(0, np.int64), "empty"
    return Materialized(images, kept, tuple(skipped), check.mode, status)


def _pixel_shape(size: int, mode: str) -> tuple[int, ...]:
    return (size, size) if mode == "gray" else (size, size, 3)


class _ModeCheck:
    """Refuses a dataset that mixes grayscale and RGB files unless a colour was chosen."""

    def __init__(self, color: str | None) -> None:
        self.color = color
        self.mode = color
        self.first = ""

    def see(self, native: str, where: str) -> None:
        if self.color is not None:
            return
        if self.mode is None:
            self.mode, self.first = native, where
        elif native != self.mode:
            raise InputError(
                f"{where}: {MODE_NAMES[native]} image, but {self.first} is "
                f"{MODE_NAMES[self.mode]}; the data mixes both: set data.color to gray or rgb "
                "to convert"
            )


@dataclass(frozen=True)
class _Job:
    size: int
    color: str | None
    root: Path
    skip_bad: bool
    workers: int
    check: _ModeCheck

    def locate(self, source: Source) -> str:
        shown = display(source.path, self.root)
        return source.where if source.where and source.where != shown else shown

    def message(self, source: Source, reason: str) -> str:
        shown = display(source.path, self.root)
        loc = self.locate(source)
        name = source.path.name if loc != shown else shown
        if reason == "file not found":
            place = source.look_in or display(source.path.parent, self.root) + "/"
            return f"{loc}: image {name} not found in {place}"
        return f"{loc}: image {name} is corrupt or truncated ({reason})"

    def fill(
        self, split: str, sources: Sequence[Source], tmp: Path | None
    ) -> tuple[np.ndarray, list[int], list[Skipped]]:
        """Decode sources in order into a new array (a memmap at tmp when given)."""
        out: np.ndarray | None = None
        index: list[int] = []
        bad: list[Skipped] = []
        results = self._decoded(sources)
        try:
            for i, result in enumerate(results):
                source = sources[i]
                if isinstance(result, str):
                    message = self.message(source, result)
                    if not self.skip_bad:
                        raise InputError(message)
                    shown = display(source.path, self.root)
                    bad.append(Skipped(split, shown, result, message))
                    continue
                array, native = result
                self.check.see(native, self.locate(source))
                if out is None:
                    shape = (len(sources), *_pixel_shape(self.size, self.check.mode or native))
                    out = (
                        np.empty(shape, np.uint8)
                        if tmp is None
                        else np.memmap(tmp, np.uint8, "w+", shape=shape)
                    )
                out[len(index)] = array
                index.append(i)
        finally:
            results.close()  # on an error, stop the decoding threads now
        if out is None:
            raise InputError(
                f"{split} split: all {len(sources)} images are bad (first: {bad[0].message})"
            )
        return (out[: len(index)] if tmp is None else out), index, bad

    def _decoded(
        self, sources: Sequence[Source]
    ) -> Generator[tuple[np.ndarray, str] | str, None, None]:
        if self.workers <= 1:
            yield from map(self._one, sources)
            return
        # PIL releases the GIL while decoding. A bounded window of futures keeps memory flat
        # and lets an error stop the work after at most a few more images.
        with ThreadPoolExecutor(self.workers) as pool:
            window: deque[Future] = deque()
            try:
                for source in sources:
                    window.append(pool.submit(self._one, source))
                    if len(window) >= 4 * self.workers:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for future in window:
                    future.cancel()

    def _one(self, source: Source) -> tuple[np.ndarray, str] | str:
        try:
            return load_image(source.path, self.size, self.color)
        except BadImageError as err:
            return err.reason


class _Entry:
    """One cached split: where its files are and whether they match the sources."""

    def __init__(
        self,
        cache_dir: Path,
        dataset: str,
        split: str,
        size: int,
        color: str | None,
        sources: Sequence[Source],
    ) -> None:
        self.sources = sources
        names = hashlib.sha256("\n".join(str(s.path) for s in sources).encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)
        stem = f"{split}-{size}px-{color or 'auto'}-{names[:12]}"
        self.data = cache_dir / slug / f"{stem}.u8"
        self.manifest = cache_dir / slug / f"{stem}.json"
        self.split, self.size, self.color = split, size, color
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(f"{CACHE_VERSION}|{self.size}|{self.color}".encode())
        for source in self.sources:
            try:
                stat = os.stat(source.path)
                digest.update(f"\n{source.path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"\n{source.path}|missing".encode())
        return digest.hexdigest()

    def load(self, job: _Job) -> tuple[np.ndarray, list[int], list[Skipped]] | None:
        """The cached split, or None when it is absent, stale or incomplete."""
        try:
            meta: dict[str, Any] = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        shape = tuple(meta.get("shape", ()))
        if (
            meta.get("version") != CACHE_VERSION
            or meta.get("fingerprint") != self.fingerprint
            or not self.data.is_file()
            or self.data.stat().st_size != int(np.prod(shape))
        ):
            return None
        bad = [Skipped(self.split, s["file"], s["reason"], s["message"]) for s in meta["skipped"]]
        if bad and not job.skip_bad:
            raise InputError(bad[0].message)
        job.check.see(meta["mode"], meta["first"])
        dropped = {s["index"] for s in meta["skipped"]}
        index = [i for i in range(len(self.sources)) if i not in dropped]
        return np.memmap(self.data, np.uint8, "r", shape=shape), index, bad

    def build(self, job: _Job) -> tuple[np.ndarray, list[int], list[Skipped]]:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        self.manifest.unlink(missing_ok=True)  # an interrupted rebuild must not look valid
        tag = f"{os.getpid()}-{threading.get_ident()}"
        tmp = self.data.with_name(f".{self.data.name}.tmp{tag}")
        try:
            array, index, bad = job.fill(self.split, self.sources, tmp)
            shape = (len(index), *array.shape[1:])
            first = job.locate(self.sources[index[0]])
            array.flush()
            del array
            os.truncate(tmp, int(np.prod(shape)))  # drop the rows of skipped images
            os.replace(tmp, self.data)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {
            "version": CACHE_VERSION,
            "split": self.split,
            "size": self.size,
            "color": self.color,
            "mode": job.check.mode,
            "first": first,
            "shape": list(shape),
            "fingerprint": self.fingerprint,
            "skipped": [
                {"index": i, "file": s.file, "reason": s.reason, "message": s.message}
                for i, s in zip(_bad_positions(index, len(self.sources)), bad, strict=True)
            ],
        }
        tmp_meta = self.manifest.with_name(f".{self.manifest.name}.tmp{tag}")
        tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp_meta, self.manifest)
        return np.memmap(self.data, np.uint8, "r", shape=shape), index, bad


def _bad_positions(kept: Sequence[int], total: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(total) if i not in keep]
