"""The commands users type, through typer's CliRunner, on a real tiny world and real indices."""
import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from moonsearch.cli import app

runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_help_lists_commands():
    out = _ok(["--help"])
    for cmd in ("demo-data", "validate", "index", "query", "delete", "bench", "demo"):
        assert cmd in out


def test_three_query_kinds_through_the_cli(tiny_index, world):
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    hits = json.loads(_ok(["query", "blue backpack", "--index", str(tiny_index), "-k", "7", "--json"]))
    assert len(hits) == 7 and {"item_id", "score", "title", "category", "attributes"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    img = world / cat[3]["images"][0]
    hits = json.loads(_ok(["query", "--image", str(img), "--index", str(tiny_index), "--json", "-k", "3"]))
    assert hits[0]["item_id"] == cat[3]["item_id"] or len(hits) == 3
    both = json.loads(_ok(["query", "red", "--image", str(img), "--index", str(tiny_index), "--json", "-k", "3"]))
    assert [h["item_id"] for h in both] != [h["item_id"] for h in hits] or both[0]["score"] != hits[0]["score"]

    groups = {}
    for r in cat:
        groups.setdefault(r["group_id"], []).append(r["item_id"])
    item = next(ids[0] for ids in groups.values() if len(ids) > 1)
    siblings = set(next(ids for ids in groups.values() if item in ids))
    hits = json.loads(_ok(["query", "--product", item, "--index", str(tiny_index), "--json", "-k", "10"]))
    assert len(hits) == 10 and siblings.isdisjoint(h["item_id"] for h in hits)
    hits = json.loads(_ok(["query", "--product", item, "--index", str(tiny_index), "--json", "-k", "10",
                           "--include-group"]))
    assert item not in {h["item_id"] for h in hits}

    table = _ok(["query", "mug", "--index", str(tiny_index), "-k", "3"])
    assert "score" in table and "title" in table

    from PIL import Image

    pic = world / "hits.png"
    _ok(["query", "red", "--image", str(img), "--index", str(tiny_index), "-k", "4", "--picture", str(pic)])
    sheet = Image.open(pic)
    assert sheet.size[0] == 5 * 180 and sheet.size[1] > 180  # the query photo and four hits in one row


def test_category_filter_and_routing(tiny_index, world):
    hits = json.loads(_ok(["query", "shoes", "--index", str(tiny_index), "--json", "-k", "20",
                           "--category", "home > kitchen", "--category", "electronics"]))
    assert hits and all(h["category"][0] == "electronics" or h["category"][:2] == ["home", "kitchen"] for h in hits)
    routed = json.loads(_ok(["query", "shoes", "--index", str(tiny_index), "--json", "-k", "5", "--route", "2"]))
    assert len({tuple(h["category"]) for h in routed}) <= 2


def test_errors_are_one_line(tmp_path, tiny_index):
    res = runner.invoke(app, ["query", "x", "--index", str(tmp_path)])
    assert res.exit_code == 2 and "not a moonsearch index" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["query", "--product", "NOPE", "--index", str(tiny_index)])
    assert res.exit_code == 2 and "NOPE" in res.output
    res = runner.invoke(app, ["query", "x", "--index", str(tiny_index), "--category", "toys"])
    assert res.exit_code == 2 and "no indexed category matches" in res.output
    res = runner.invoke(app, ["query", "--image", str(tmp_path / "none.jpg"), "--index", str(tiny_index)])
    assert res.exit_code == 2 and "missing image file" in res.output


def test_demo_main_job_and_recall_bench(tmp_path):
    """The quick start's main command, on a small world and the tiny model, then the recall benchmark."""
    out = _ok(["demo", "--out", str(tmp_path / "d"), "--n", "60", "--model", "clip-tiny"])
    assert "'red sneakers'" in out and "products like" in out and "photo" in out
    _ok(["bench", "recall", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "b"), "--route", "0",
         "--route", "2"])
    res = json.loads((tmp_path / "b" / "recall.json").read_text())
    assert len(res) == 2 and res[0]["queries"] > 0
    assert set(res[0]["by_modality"]) <= {"text", "image", "text+image"}
    assert 0 <= res[0]["all"]["R@1"] <= res[0]["all"]["R@10"] <= res[0]["all"]["R@50"] <= 1
    assert (tmp_path / "b" / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert "| all |" in (tmp_path / "b" / "recall.md").read_text()


def test_index_command_and_delete(world, tmp_path):
    out = tmp_path / "idx"
    text = _ok(["index", str(world / "catalog.parquet"), "--out", str(out), "--model", "clip-tiny", "--level", "1"])
    assert "indexed 120 items into" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert {tuple(c["path"]) for c in manifest["categories"].values()} <= {("apparel",), ("accessories",),
                                                                           ("home",), ("electronics",)}
    text = _ok(["delete", "P0000001", "P0000002", "--index", str(out)])
    assert "removed 2 of 2" in text and "118 items left" in text
    hits = json.loads(_ok(["query", "anything", "--index", str(out), "--json", "-k", "200"]))
    assert {"P0000001", "P0000002"}.isdisjoint(h["item_id"] for h in hits) and len(hits) == 118
