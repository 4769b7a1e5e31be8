"""Atomic file writes: write to a temporary file in the same folder, fsync, then ``os.replace``.

A crash at any point leaves either the old file or the new one, never a half-written file that loads.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is moved over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _chmod_default(tmp, 0o666)  # mkstemp makes 0600 (and writers may recreate the file)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _chmod_default(path: Path, bits: int) -> None:
    """The mode a plain create would have given ``path``: ``bits`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, bits & ~umask)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", path)


def write_report(result, markdown: str, out: str | Path, name: str) -> tuple[Path, Path]:
    """A benchmark's raw JSON and its markdown table, written atomically side by side; prints both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}.json", out / f"{name}.md"
    atomic_write_json(result, paths[0])
    atomic_write_text(markdown, paths[1])
    print(markdown)
    print(f"wrote {paths[0]}, {paths[1]}")
    return paths


def atomic_write_parquet(table, path: str | Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def atomic_save_npy(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """np.load that never unpickles (object arrays are refused)."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def as_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (a fresh array for float16). numpy widens float16 element by element: 0.07 ms for a
    160 x 256 re-rank shortlist, as long as the exact dot products themselves. torch's vectorised cast
    takes 0.005 ms and faiss's fp16 decoder 0.025 ms, both exact. torch is used when the process has
    already loaded it (a server with an encoder); importing it only for this would add ~260 MiB to an
    index-only process (a search shard), so those use faiss."""
    if a.dtype != np.float16:
        return np.asarray(a, np.float32)
    return widen_torch(a) if "torch" in sys.modules else widen_faiss(a)


def widen_torch(a: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def widen_faiss(a: np.ndarray) -> np.ndarray:
    if a.size == 0 or a.ndim == 0:
        return a.astype(np.float32)
    flat = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    return _fp16_decoder(a.shape[-1]).decode(flat.view(np.uint8)).reshape(a.shape)


@lru_cache(maxsize=16)
def _fp16_decoder(d: int):
    import faiss

    return faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)


class RowReader:
    """Rows of a memory-mapped 2-D ``.npy`` read with ``pread`` instead of through the map.

    Reading a few hundred scattered rows through a memory map faults in whole neighbourhoods of pages
    and leaves them mapped in the process: at 10M vectors the exact re-rank grew the serving process's
    file-backed RSS to 5.6 GB after 1,000 queries. ``pread`` copies just the rows' bytes; the kernel's
    page cache still caches them, but it is shared and reclaimable and never counts as this process's
    memory. Arrays that are not memory maps are indexed directly."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self._fd: int | None = None
        self._base = array.view(np.ndarray) if isinstance(array, np.memmap) else array  # no memmap indexing cost
        if isinstance(array, np.memmap) and array.ndim == 2 and array.flags.c_contiguous and array.filename:
            self._fd = os.open(array.filename, os.O_RDONLY)
            self._offset, self._row = int(array.offset), array.shape[1] * array.itemsize

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` as float32, rows: an int array of any shape -> rows.shape + (d,)."""
        rows = np.asarray(rows, np.int64)
        if self._fd is None:
            return as_float32(self._base[rows])
        flat = rows.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self.array)):
            raise IndexError(f"row out of range [0, {len(self.array)}) in {self.array.filename}")
        out = np.empty((flat.size, self.array.shape[1]), self.array.dtype)
        buf, n = memoryview(out).cast("B"), self._row
        for i, r in enumerate(flat.tolist()):
            if os.preadv(self._fd, [buf[i * n:(i + 1) * n]], self._offset + r * n) != n:
                raise OSError(f"{self.array.filename}: short read at row {r}")
        return as_float32(out).reshape(*rows.shape, -1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def append_jsonl(rows: list[dict], path: str | Path) -> None:
    """Append JSON lines and fsync; used for logs where a torn last line is tolerated on read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def swap_in_dir(tmp: str | Path, final: str | Path) -> None:
    """Replace folder ``final`` by the finished folder ``tmp``: the old one is renamed away, the new one
    renamed in, the old one deleted. A reader sees the old folder or the new one, never a mix; a crash
    leaves at worst a stray ``.old-*`` folder beside it."""
    import shutil
    import time

    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_folder_once(final: str | Path, marker: str, build) -> Path:
    """A cache folder that several processes may ask for at once (the ranks of a spawned run, parallel
    jobs): ``build(tmp)`` fills a private temporary sibling, which is renamed in whole, so no process
    ever sees a half-written folder. ``final / marker`` marks a finished one; a process that loses the
    race keeps the winner's folder and drops its own."""
    import shutil

    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        _chmod_default(tmp, 0o777)  # mkdtemp makes 0700
        if not (final / marker).exists():
            if final.exists():  # left unfinished by an older, non-atomic build
                swap_in_dir(tmp, final)
            else:
                try:
                    os.rename(tmp, final)
                except OSError:  # another process renamed its folder in first
                    if not (final / marker).exists():
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_category(text: str) -> list[str]:
    """'a > b > c' (or 'a/b/c') -> ['a', 'b', 'c']: the one parser for category paths written as text."""
    sep = ">" if ">" in text else "/"
    return [p.strip() for p in text.split(sep) if p.strip()]
