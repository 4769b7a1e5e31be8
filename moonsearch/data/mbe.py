"""Loader for the public MBE benchmark release (Hugging Face ``Daoze/MM-Bench-E-Commerce``) from a
local copy: parquet or JSON-lines files with ``doc_title``, ``doc_image``, ``doc_industry_name``,
``doc_cate1_name`` .. ``doc_cate4_name`` and ``doc_attributes``, converted to the moonsearch catalog.

    moonsearch convert-mbe path/to/mbe_test.parquet --out mbe/   # then: moonsearch bench zero-shot --data mbe

The category path is industry > cate1 > ... > cate4 (empty levels dropped). ``doc_attributes`` may be
a JSON object, a list of {"key","value"} / [key, value] pairs, or text "k1:v1;k2:v2" (also with
Chinese colons and commas). ``doc_image`` (a URL or path) becomes ``images``; item ids are
``doc_id`` when present, else ``mbe-<row>``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moonsearch.utils.io import atomic_write_parquet
from moonsearch.errors import UserError

LEVELS = ("doc_industry_name", "doc_cate1_name", "doc_cate2_name", "doc_cate3_name", "doc_cate4_name")


def parse_attributes(value) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in value:
            if isinstance(item, dict) and "key" in item:
                out[str(item["key"])] = str(item.get("value", ""))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out[str(item[0])] = str(item[1])
        return out
    text = str(value).strip()
    if text.startswith(("{", "[")):
        try:
            return parse_attributes(json.loads(text))
        except json.JSONDecodeError:
            pass
    out = {}
    for part in re.split(r"[;；,，|\n]+", text):
        if re.search(r"[:：]", part):
            k, v = re.split(r"[:：]", part, maxsplit=1)
            if k.strip():
                out[k.strip()] = v.strip()
    return out


def read_rows(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return pq.read_table(path).to_pylist()


def convert(src: str | Path, out: str | Path) -> Path:
    """Write ``out/catalog.parquet`` from an MBE file; returns its path."""
    src, out = Path(src), Path(out)
    rows = read_rows(src)
    if not rows or "doc_title" not in rows[0]:
        raise UserError(f"{src}: not in the MBE layout (expected doc_title, doc_image, doc_cate1_name, ...)")
    items, titles, cats, attrs, images = [], [], [], [], []
    for i, r in enumerate(rows):
        items.append(str(r.get("doc_id") or f"mbe-{i}"))
        titles.append(r.get("doc_title") or "")
        cats.append([str(r[k]).strip() for k in LEVELS if r.get(k) not in (None, "") and str(r[k]).strip()])
        attrs.append(list(parse_attributes(r.get("doc_attributes")).items()))
        img = r.get("doc_image")
        if isinstance(img, str) and img and not img.startswith(("http://", "https://", "/", "file://")):
            img = str((src.parent / img).resolve())
        images.append([img] if img else [])
    table = pa.table({"item_id": items, "title": titles, "category": pa.array(cats, pa.list_(pa.string())),
                      "attributes": pa.array(attrs, pa.map_(pa.string(), pa.string())),
                      "images": pa.array(images, pa.list_(pa.string()))})
    path = out / "catalog.parquet"
    atomic_write_parquet(table, path)
    return path
