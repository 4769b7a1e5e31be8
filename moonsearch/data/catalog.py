"""The catalog format: a parquet file with one product per row.

Columns (only ``item_id`` is required; a row needs a title or at least one image):

=============== ======================================= ==============================================
column          type                                    meaning
=============== ======================================= ==============================================
item_id         string (unique; integers are accepted)  the product id returned by search
title           string                                  the listing title
category        list<string> root first, or "a > b > c" the category path, e.g. [apparel, shoes, sneakers]
attributes      map<string,string>, list of pairs,       key -> value (colour, material, brand, ...)
                struct, or a JSON object string
images          list<string> (or one string)            paths relative to the catalog file, absolute
                                                        paths, file:// or http(s) URLs
image_bytes     list<binary>                            embedded encoded images (used when present)
group_id        string                                  variants of one product (same SPU)
(other)         any                                     kept as metadata and returned with hits
=============== ======================================= ==============================================

Bad rows never stop a job: ``iter_catalog`` yields the good rows and reports each bad one as a
``Problem`` (row number, item id, field, reason, action); ``write_rejects`` lists them in a file.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from moonsearch.data.images import ImageRef
from moonsearch.utils.io import atomic_write_text, parse_category
from moonsearch.errors import UserError

KNOWN = ("item_id", "title", "category", "attributes", "images", "image_bytes", "group_id", "image_boxes")


class CatalogError(UserError):
    """The catalog cannot be used at all (unreadable file, no item_id column, no rows)."""


@dataclass
class Problem:
    row: int | None
    item_id: str | None
    field: str
    reason: str
    action: str = "row skipped"  # or "image skipped"

    def line(self) -> str:
        where = f"row {self.row}" if self.row is not None else "catalog"
        who = f" (item {self.item_id})" if self.item_id else ""
        return f"{where}{who}: {self.field}: {self.reason} [{self.action}]"


@dataclass
class CatalogRecord:
    row: int
    item_id: str
    title: str
    category: list[str]
    attributes: dict[str, str]
    images: list[ImageRef]
    group_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class _Bad(Exception):
    def __init__(self, fld: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = fld, reason


def _text(value, fld: str, required: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(fld, f"not valid UTF-8 text (byte {e.start})") from None
    if not isinstance(value, str):
        raise _Bad(fld, f"expected text, got {type(value).__name__} {value!r:.40}")
    return value.strip()


def _category(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return parse_category(_text(value, "category") or "")
    if isinstance(value, (list, tuple)):
        return [_text(v, "category") or "" for v in value if v is not None and str(v).strip()]
    raise _Bad("category", f"expected a list of strings or 'a > b > c', got {type(value).__name__}")


def _attributes(value) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, (str, bytes)):
        text = _text(value, "attributes") or ""
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise _Bad("attributes", "string is not a JSON object") from None
    if isinstance(value, list):  # arrow map -> list of (key, value)
        try:
            value = {k: v for k, v in value}
        except (TypeError, ValueError):
            raise _Bad("attributes", "expected key/value pairs") from None
    if not isinstance(value, dict):
        raise _Bad("attributes", f"expected key -> value, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if v is None:
            continue
        out[_text(k, "attributes") or ""] = v if isinstance(v, str) else (
            _text(v, "attributes") if isinstance(v, bytes) else str(v))
    return out


def _images(value, fld: str) -> list[ImageRef]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) and fld == "images":
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _Bad(fld, f"expected a list, got {type(value).__name__}")
    out: list[ImageRef] = []
    for v in value:
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if fld == "image_bytes":
            if not isinstance(v, (bytes, bytearray)):
                raise _Bad(fld, f"expected bytes, got {type(v).__name__}")
            out.append(bytes(v))
        else:
            out.append(_text(v, fld) or "")
    return out


def parse_row(row: int, raw: dict[str, Any]) -> CatalogRecord:
    """One raw parquet row -> record; raises _Bad for a row that cannot be used."""
    iid = raw.get("item_id")
    if isinstance(iid, int) and not isinstance(iid, bool):
        iid = str(iid)
    iid = _text(iid, "item_id")
    if not iid:
        raise _Bad("item_id", "missing item id")
    title = _text(raw.get("title"), "title") or ""
    images = _images(raw.get("image_bytes"), "image_bytes") or _images(raw.get("images"), "images")
    if not title and not images:
        raise _Bad("title", "row has neither a title nor an image")
    group = raw.get("group_id")
    group = _text(str(group) if isinstance(group, int) else group, "group_id") or None
    meta = {k: v for k, v in raw.items() if k not in KNOWN}
    return CatalogRecord(row, iid, title, _category(raw.get("category")), _attributes(raw.get("attributes")),
                         images, group, meta)


def open_catalog(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "item_id" not in names:
        raise CatalogError(f"{path}: no 'item_id' column (columns: {', '.join(names) or 'none'}); "
                           "every catalog needs a unique item_id per row")
    if pf.metadata.num_rows == 0:
        raise CatalogError(f"{path}: the catalog is empty (0 rows)")
    return pf


def iter_catalog(path: str | Path, report: Callable[[Problem], None], batch_size: int = 1024,
                 seen: set[str] | None = None) -> Iterator[CatalogRecord]:
    """Good rows in file order; each bad row (and each duplicate id) goes to ``report``.

    ``seen`` holds ids already taken (e.g. by an existing index when appending); it is updated.
    """
    pf = open_catalog(path)
    seen = set() if seen is None else seen
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for raw in batch.to_pylist():
            try:
                rec = parse_row(row, raw)
            except _Bad as bad:
                iid = raw.get("item_id")
                report(Problem(row, iid if isinstance(iid, str) else None, bad.field, bad.reason))
            else:
                if rec.item_id in seen:
                    report(Problem(row, rec.item_id, "item_id", "duplicate item id (first occurrence kept)"))
                else:
                    seen.add(rec.item_id)
                    yield rec
            row += 1


def write_rejects(problems: list[Problem], path: str | Path) -> Path:
    """The rejects file: one JSON object per line (row, item_id, field, reason, action)."""
    path = Path(path)
    atomic_write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems), path)
    return path


def read_rejects(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.exists():
        return []
    return [Problem(**json.loads(line)) for line in path.read_text("utf-8").splitlines() if line.strip()]


@dataclass
class CatalogSummary:
    rows: int = 0
    valid: int = 0
    categories: Counter = field(default_factory=Counter)
    images_per_item: Counter = field(default_factory=Counter)
    attribute_keys: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)


def validate_catalog(path: str | Path, check_images: bool = True, timeout: float = 10.0,
                     workers: int = 8, on_progress: Callable[[int], None] | None = None) -> CatalogSummary:
    """Read every row and (optionally) decode every image; nothing is written."""
    from concurrent.futures import ThreadPoolExecutor

    from moonsearch.data.images import load_images

    path = Path(path)
    summary = CatalogSummary(rows=open_catalog(path).metadata.num_rows)
    records = list(iter_catalog(path, summary.problems.append))
    base = path.parent

    def check(rec: CatalogRecord) -> tuple[CatalogRecord, list[Problem]]:
        _, failed = load_images(rec.images, base, timeout)
        bad = [Problem(rec.row, rec.item_id, f"images[{i}]", why, "image skipped") for i, why in failed]
        if bad and len(bad) == len(rec.images) and not rec.title:
            bad.append(Problem(rec.row, rec.item_id, "images", "no usable image and no title"))
        return rec, bad

    results = ThreadPoolExecutor(workers).map(check, records) if check_images else ((r, []) for r in records)
    for rec, bad in results:
        summary.problems.extend(bad)
        if on_progress:
            on_progress(1)
        if any(p.action == "row skipped" for p in bad):
            continue
        summary.valid += 1
        summary.categories[" > ".join(rec.category) or "(none)"] += 1
        summary.images_per_item[len(rec.images) - sum(p.action == "image skipped" for p in bad)] += 1
        summary.attribute_keys.update(rec.attributes.keys())
    summary.problems.sort(key=lambda p: (p.row if p.row is not None else -1, p.field))
    return summary
