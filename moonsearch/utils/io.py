"""Atomic file writes: write to a temporary file in the same folder, fsync, then ``os.replace``.

A crash at any point leaves either the old file or the new one, never a half-written file that loads.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and writers may recreate the file)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def parse_category(text: str) -> list[str]:
    """'a > b > c' (or 'a/b/c') -> ['a', 'b', 'c']: the one parser for category paths written as text."""
    sep = ">" if ">" in text else "/"
    return [p.strip() for p in text.split(sep) if p.strip()]
