"""The commands users type, through typer's CliRunner, on a real tiny world and real indices."""
import json
import re

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
    listed = {m.group(1) for m in re.finditer(r"^\W*([a-z][a-z-]*)\s{2,}\S", out, re.M)}  # "│ demo   The ..."
    assert {"demo-data", "validate", "index", "query", "delete", "bench", "demo", "models", "train"} <= listed


def test_three_query_kinds_through_the_cli(tiny_index, world):
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    hits = json.loads(_ok(["query", "blue backpack", "--index", str(tiny_index), "-k", "7", "--json"]))["hits"]
    assert len(hits) == 7 and {"item_id", "score", "title", "category", "attributes"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # the command decodes the photo and asks the library: same hits as SearchService on the same photo
    from moonsearch.data.images import load_image
    from moonsearch.search.service import SearchService

    svc = SearchService(tiny_index)
    img = world / cat[3]["images"][0]
    photo = load_image(str(img))
    hits = json.loads(_ok(["query", "--image", str(img), "--index", str(tiny_index), "--json", "-k", "3"]))["hits"]
    assert [h["item_id"] for h in hits] == [h.item_id for h in svc.search_image(photo, k=3)]
    both = json.loads(_ok(["query", "red", "--image", str(img), "--index", str(tiny_index), "--json", "-k", "3",
                           "--mode", "vector", "--no-understand"]))["hits"]
    assert [h["item_id"] for h in both] == [h.item_id for h in svc.search_image(photo, text="red", k=3)]
    hybrid = json.loads(_ok(["query", "red", "--image", str(img), "--index", str(tiny_index), "--json", "-k", "3"]))
    assert [h["item_id"] for h in hybrid["hits"]] == [h.item_id for h in svc.search("red", photo, k=3).hits]
    assert [h["score"] for h in both] != [h["score"] for h in hits]  # the words change the query vector

    groups = {}
    for r in cat:
        groups.setdefault(r["group_id"], []).append(r["item_id"])
    item = next(ids[0] for ids in groups.values() if len(ids) > 1)
    siblings = set(next(ids for ids in groups.values() if item in ids))
    hits = json.loads(_ok(["query", "--product", item, "--index", str(tiny_index), "--json", "-k", "10"]))["hits"]
    assert len(hits) == 10 and siblings.isdisjoint(h["item_id"] for h in hits)
    # with k past the catalog's size every item comes back: the variants only with --include-group
    everything = json.loads(_ok(["query", "--product", item, "--index", str(tiny_index), "--json", "-k", "500",
                                 "--include-group"]))["hits"]
    ids = {h["item_id"] for h in everything}
    assert item not in ids and siblings - {item} <= ids and len(ids) == len(cat) - 1
    without = json.loads(_ok(["query", "--product", item, "--index", str(tiny_index), "--json", "-k", "500"]))["hits"]
    assert {h["item_id"] for h in without} == ids - siblings

    table = _ok(["query", "mug", "--index", str(tiny_index), "-k", "3"])
    assert "score" in table and "title" in table

    from PIL import Image

    pic = world / "hits.png"
    _ok(["query", "red", "--image", str(img), "--index", str(tiny_index), "-k", "4", "--picture", str(pic)])
    sheet = Image.open(pic)
    assert sheet.size[0] == 5 * 180 and sheet.size[1] > 180  # the query photo and four hits in one row


def test_category_filter_and_routing(tiny_index, world):
    hits = json.loads(_ok(["query", "shoes", "--index", str(tiny_index), "--json", "-k", "20",
                           "--category", "home > kitchen", "--category", "electronics"]))["hits"]
    assert hits and all(h["category"][0] == "electronics" or h["category"][:2] == ["home", "kitchen"] for h in hits)
    routed = json.loads(_ok(["query", "shoes", "--index", str(tiny_index), "--json", "-k", "5", "--route", "2"]))["hits"]
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


def _bad(args, *needles):
    """Bad input: exit 2 and one line naming the problem, no traceback."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (args, res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in res.output, (n, res.output)


def test_bad_command_lines_answer_one_line_and_exit_2(tiny_index, world, tmp_path):
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    img, idx = str(world / cat[0]["images"][0]), str(tiny_index)
    _bad(["query", "mug", "--index", idx, "-k", "0"], "-k 0")
    _bad(["query", "mug", "--index", idx, "-k", "-5"], "-k -5")
    _bad(["query", "mug", "--index", idx, "--route", "-1"], "--route -1")
    _bad(["query", "--product", cat[0]["item_id"], "--image", img, "--index", idx], "--product")
    _bad(["query", "mug", "--product", cat[0]["item_id"], "--index", idx], "--product")
    _bad(["query", "--product", cat[0]["item_id"], "--image", img, "--picture", str(tmp_path / "p.png"),
          "--index", idx], "--product")
    _bad(["query", "mug", "--include-group", "--index", idx], "--include-group")
    _bad(["query", "mug", "--index", idx, "--model", "no-such-model"], "no-such-model")
    _bad(["bench", "index", "--size", "5", "--out", str(tmp_path)], "--size 5")
    _bad(["demo-data", "--n", "0", "--out", str(tmp_path / "w")], "--n 0")
    _bad(["train", "--preset", "no-such-preset"], "no-such-preset")
    _bad(["train", "--preset", "moon-tiny-test", "--set", "steps"], "key=value")
    _bad(["bench", "real", "--split", "train"], "--split")
    # a product search with a picture works (no photo of the query)
    _ok(["query", "--product", cat[0]["item_id"], "--picture", str(tmp_path / "p.png"), "--index", idx, "-k", "3"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bug_keeps_its_traceback():
    """Only bad input becomes a one-liner: an error inside the library is not dressed up as one."""
    import pytest

    from moonsearch.cli import friendly
    from moonsearch.errors import UserError

    @friendly
    def buggy():
        raise ValueError("shapes (3,) and (4,) not aligned")

    with pytest.raises(ValueError, match="not aligned"):
        buggy()

    @friendly
    def user():
        raise UserError("bad")

    import typer

    with pytest.raises(typer.Exit):
        user()

    one = typer.Typer()

    @one.command()
    @friendly
    def bracketed():  # a message with brackets is shown as written, not read as rich markup
        raise UserError("row 4: images[0] [/bold] unreadable")

    res = runner.invoke(one, [])
    assert res.exit_code == 2 and "images[0] [/bold] unreadable" in res.output, res.output


def test_demo_main_job_and_recall_bench(tmp_path):
    """The quick start's main command, on a small world and the tiny model, then the recall benchmark."""
    out = _ok(["demo", "--out", str(tmp_path / "d"), "--n", "60", "--model", "clip-tiny"])
    assert "'red sneakers' (hybrid; understood" in out and "products like" in out and "photo" in out
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
    hits = json.loads(_ok(["query", "anything", "--index", str(out), "--json", "-k", "200"]))["hits"]
    assert {"P0000001", "P0000002"}.isdisjoint(h["item_id"] for h in hits) and len(hits) == 118


def test_append_keeps_the_index_level_and_params(world, tmp_path):
    cat = pq.read_table(world / "catalog.parquet")
    first, extra = tmp_path / "first.parquet", tmp_path / "extra.parquet"
    pq.write_table(cat.slice(0, 80), first)
    pq.write_table(cat.slice(80), extra)
    out = tmp_path / "idx"
    _ok(["index", str(first), "--out", str(out), "--model", "clip-tiny", "--level", "1", "--nprobe", "8"])
    before = json.loads((out / "manifest.json").read_text())
    _bad(["index", str(extra), "--out", str(out), "--model", "clip-tiny", "--append", "--level", "2"], "level 1")
    _bad(["index", str(extra), "--out", str(out), "--model", "clip-tiny", "--append", "--nprobe", "16"], "nprobe 8")
    text = _ok(["index", str(extra), "--out", str(out), "--model", "clip-tiny", "--append"])
    assert "indexed 40 items" in text
    after = json.loads((out / "manifest.json").read_text())
    assert after["level"] == 1 and after["params"]["nprobe"] == 8
    assert all(len(c["path"]) == 1 for c in after["categories"].values())  # no leaf categories beside them
    assert set(after["categories"]) >= set(before["categories"]) and after["count"] == 120


def test_the_default_index_is_the_last_built_from_this_folder(world, tmp_path, monkeypatch):
    """`query` without --index uses the index last built from the same working directory (not one
    built by another checkout), and $MOONSEARCH_INDEX overrides it."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    _ok(["index", str(world / "catalog.parquet"), "--out", str(a / "shop-index"), "--model", "clip-tiny"])
    assert json.loads(_ok(["query", "mug", "--json", "-k", "2"]))["hits"]
    monkeypatch.chdir(b)  # another checkout: its own record (none yet), not a's
    _bad(["query", "mug", "-k", "2"], "not a moonsearch index")
    monkeypatch.setenv("MOONSEARCH_INDEX", str(a / "shop-index"))
    assert len(json.loads(_ok(["query", "mug", "--json", "-k", "2"]))["hits"]) == 2


def test_query_photo_by_url_or_relative_path(tiny_index, world, tmp_path, monkeypatch):
    """--image takes what a catalog takes: an http(s) URL (a shop's CDN) or a path relative to where the
    command runs, with the same hits as the file; a missing one is one clear line naming it."""
    from serve_util import static_http

    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    img = world / cat[5]["images"][0]
    args = ["--index", str(tiny_index), "--json", "-k", "4", "--mode", "vector"]
    by_file = json.loads(_ok(["query", "--image", str(img), *args]))["hits"]
    with static_http(lambda path: (200, img.read_bytes()) if path == "/p/photo.jpg" else (404, b"gone")) as (url, asked):
        by_url = json.loads(_ok(["query", "--image", f"{url}/p/photo.jpg", *args]))["hits"]
        assert asked == ["GET /p/photo.jpg"]
        _bad(["query", "--image", f"{url}/p/missing.jpg", *args], "missing.jpg")
    assert [h["item_id"] for h in by_url] == [h["item_id"] for h in by_file]
    monkeypatch.chdir(img.parent)
    by_relative = json.loads(_ok(["query", "--image", img.name, *args]))["hits"]
    assert [h["item_id"] for h in by_relative] == [h["item_id"] for h in by_file]
    _bad(["query", "--image", "no-such-photo.jpg", *args], "no-such-photo.jpg")
