"""Where moonsearch keeps things outside the project: one place for every cache path.

- ``MOONSEARCH_CACHE`` (default ``~/.cache/moonsearch``): built tiny test models, converted GGUF
  weights, the real-artwork npm packages, clip-mini's training world, and the record of the last
  index built from each working directory.
- ``MOONSEARCH_INDEX``: the index ``query`` / ``delete`` use when ``--index`` is not given (overrides
  the last-built record).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MOONSEARCH_CACHE", Path.home() / ".cache" / "moonsearch"))


def last_index_file(cwd: Path | None = None) -> Path:
    """The record of the last index built from ``cwd``: one per working directory, so two checkouts
    (or two projects) never send each other's queries to the wrong index."""
    key = hashlib.sha1(str((cwd or Path.cwd()).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "last-index" / f"{key}.json"


def remember_index(folder: Path) -> None:
    from moonsearch.utils.io import atomic_write_json

    atomic_write_json({"index": str(Path(folder).resolve()), "cwd": str(Path.cwd().resolve())}, last_index_file())


def default_index() -> Path:
    """``$MOONSEARCH_INDEX``, else the last index built from this working directory, else ``./index``."""
    if os.environ.get("MOONSEARCH_INDEX"):
        return Path(os.environ["MOONSEARCH_INDEX"])
    f = last_index_file()
    if f.exists():
        try:
            p = Path(json.loads(f.read_text())["index"])
            if (p / "manifest.json").exists():
                return p
        except (ValueError, KeyError, TypeError):
            pass
    return Path("index")
