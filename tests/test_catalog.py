import io
import socket
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serve_util import static_http
from typer.testing import CliRunner

from moonsearch.cli import app
from moonsearch.data.catalog import CatalogError, iter_catalog, read_rejects, validate_catalog


def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels: decoding it would need gigabytes (a decompression bomb)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def http_server():
    """A real HTTP server on loopback: /ok.jpg serves an image, everything else is 404."""
    body = _jpeg()
    with static_http(lambda path: (200, body) if path == "/ok.jpg" else (404, b"")) as (url, _):
        yield url


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def bad_catalog(tmp_path, http_server):
    (tmp_path / "img").mkdir()
    good = _jpeg()
    (tmp_path / "img" / "good.jpg").write_bytes(good)
    (tmp_path / "img" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "img" / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    (tmp_path / "img" / "adir.jpg").mkdir()  # exists but cannot be read as a file
    rows = [
        # row, item_id, title, images
        ("A1", "good product", ["img/good.jpg", (tmp_path / "img" / "good.jpg").as_uri(), f"{http_server}/ok.jpg"]),
        (None, "no id", ["img/good.jpg"]),
        ("A1", "duplicate id", ["img/good.jpg"]),
        ("A3", "", []),
        ("A4", "truncated", ["img/truncated.jpg"]),
        ("A5", "corrupt", ["img/corrupt.jpg"]),
        ("A6", "bomb", ["img/bomb.png"]),
        ("A7", "missing file", ["img/nope.jpg"]),
        ("A8", "404", [f"{http_server}/missing.jpg"]),
        ("A9", "closed port", [f"http://127.0.0.1:{_closed_port()}/x.jpg"]),
        ("A10", "unreadable", ["img/adir.jpg"]),
        ("A11", "", ["img/corrupt.jpg"]),  # no title and no usable image: the row goes
    ]
    table = pa.table({
        "item_id": [r[0] for r in rows],
        "title": pa.array([r[1].encode() for r in rows], pa.binary()),
        "category": [["a", "b"]] * len(rows),
        "images": [r[2] for r in rows],
        "shop": ["s"] * len(rows),
    })
    # row 12: a title that is not UTF-8
    table = pa.concat_tables([table, pa.table({"item_id": ["A12"], "title": pa.array([b"\xff\xfe bad"], pa.binary()),
                                               "category": [["a"]], "images": [["img/good.jpg"]], "shop": ["s"]})])
    path = tmp_path / "catalog.parquet"
    pq.write_table(table, path)
    return path


def test_validate_reports_every_bad_case(bad_catalog):
    s = validate_catalog(bad_catalog, timeout=2)
    by_row = {}
    for p in s.problems:
        by_row.setdefault(p.row, []).append(p)
    reason = lambda row: " ".join(p.reason for p in by_row[row])  # noqa: E731
    assert 0 not in by_row  # path, file:// and http images all load
    assert "missing item id" in reason(1)
    assert "duplicate" in reason(2)
    assert "neither a title nor an image" in reason(3)
    assert "truncated" in reason(4)
    assert "corrupt" in reason(5)
    assert "decompression bomb" in reason(6)
    assert "missing image file" in reason(7)
    assert "unreachable URL" in reason(8) and "404" in reason(8)
    assert "unreachable URL" in reason(9)
    assert "unreadable image file" in reason(10)
    assert any(p.action == "row skipped" for p in by_row[11])
    assert "UTF-8" in reason(12)
    assert all(p.item_id == "A4" for p in by_row[4])
    # good rows go on: the good product, and titled rows whose images failed (text only)
    assert s.valid == 8
    assert s.rows == 13


def test_cli_validate_lists_problems_and_writes_rejects(bad_catalog):
    res = CliRunner().invoke(app, ["validate", str(bad_catalog), "--timeout", "2"])
    assert res.exit_code == 1, res.output
    assert "row 4 (item A4): images[0]: " in res.output
    rejects = read_rejects(bad_catalog.with_suffix(".rejects.jsonl"))
    assert {p.row for p in rejects} == set(range(1, 13))
    assert all(p.reason for p in rejects)


def test_wrong_column_types_are_reported_per_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"item_id": ["x", "y"], "title": [1, 2], "category": [3, 4]}), path)
    problems = []
    assert list(iter_catalog(path, problems.append)) == []
    assert [p.row for p in problems] == [0, 1]
    assert "expected text" in problems[0].reason and problems[0].field == "title"


def test_category_and_attribute_spellings(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["a", "b"], "category": ["x > y > z", "x/y"],
                             "attributes": ['{"colour": "red"}', None], "price": [1.0, 2.0]}), path)
    recs = list(iter_catalog(path, lambda p: pytest.fail(p.line())))
    assert recs[0].item_id == "1" and recs[0].category == ["x", "y", "z"] and recs[1].category == ["x", "y"]
    assert recs[0].attributes == {"colour": "red"} and recs[0].meta == {"price": 1.0}


def test_unusable_catalogs_are_one_clear_error(tmp_path):
    no_id = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"title": ["a"]}), no_id)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"item_id": pa.array([], pa.string())}), empty)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    for path, words in [(no_id, "no 'item_id' column"), (empty, "empty"), (junk, "not a readable parquet")]:
        with pytest.raises(CatalogError, match=words):
            list(iter_catalog(path, print))
        res = CliRunner().invoke(app, ["validate", str(path)])
        assert res.exit_code == 2
        assert words in res.output and "Traceback" not in res.output


def test_cache_folders_are_built_whole_or_not_at_all(tmp_path):
    """Cache folders (the SmolLM2 copy, tiny test backbones) appear in one rename: a half-written folder
    from an older build is replaced, a finished one is kept, a failed build leaves nothing behind."""
    from moonsearch.utils.io import build_folder_once

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "weights").write_text("w")

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # an interrupted non-atomic build: config, no weights
    assert (build_folder_once(half, "weights", build) / "weights").read_text() == "w"
    (half / "weights").write_text("kept")
    assert (build_folder_once(half, "weights", build) / "weights").read_text() == "kept"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_folder_once(tmp_path / "new", "weights", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]  # no folder, no temporary left


def test_every_picture_kind_a_shop_uploads_is_indexed_and_found_by_its_own_photo(tmp_path, clip_mini):
    """One catalog with the picture kinds shops upload: a camera JPEG, a 12-megapixel-class JPEG, a CMYK
    print JPEG, a 16-bit greyscale scan, a transparent cut-out, a palette PNG, an iPhone HEIC stored
    sideways, WebP, AVIF, an animated GIF and an SVG drawing. Every picture is embedded (nothing
    reported), and each product comes first when searched by its own file, read through the query path."""
    import numpy as np
    import pillow_heif
    from skimage import data as skd

    from moonsearch.data.images import load_image
    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.search.service import SearchService

    pillow_heif.register_heif_opener()  # to write the HEIC file; reading registers it by itself
    img = tmp_path / "img"
    img.mkdir()
    coffee, cat, astro = (Image.fromarray(f()) for f in (skd.coffee, skd.chelsea, skd.astronaut))
    cut = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    cut.paste(astro.resize((120, 120)), (40, 40))
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    kinds = {
        "camera.jpg": lambda p: coffee.save(p, quality=90),
        "big.jpg": lambda p: cat.resize((2400, 1800)).save(p, quality=90),
        "print-cmyk.jpg": lambda p: astro.convert("CMYK").save(p, quality=90),
        "scan16.png": lambda p: Image.fromarray(np.asarray(Image.fromarray(skd.camera()), np.uint16) * 257).save(p),
        "cutout.png": lambda p: cut.save(p),
        "palette.png": lambda p: coffee.resize((160, 100)).quantize(64).save(p),
        "phone.heic": lambda p: Image.fromarray(skd.rocket()).save(p, "HEIF", exif=exif.tobytes(), quality=90),
        "photo.webp": lambda p: Image.fromarray(skd.rocket()).resize((300, 200)).rotate(180).save(p, quality=90),
        "photo.avif": lambda p: cat.rotate(90, expand=True).save(p, quality=80),
        "anim.gif": lambda p: cat.resize((160, 120)).save(p, save_all=True, append_images=[coffee.resize((160, 120))]),
        "drawing.svg": lambda p: p.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 40 30">'
                                              '<circle cx="20" cy="15" r="12" fill="#1e64c8"/></svg>'),
    }
    for name, write in kinds.items():
        write(img / name)
    names = list(kinds)
    pq.write_table(pa.table({"item_id": [f"K{i}" for i in range(len(names))], "title": [f"item {i}" for i in range(len(names))],
                             "category": [["shop", "things"]] * len(names), "images": [[f"img/{n}"] for n in names]}),
                   tmp_path / "catalog.parquet")
    rep = run_index(IndexJob(tmp_path / "catalog.parquet", tmp_path / "idx", model="clip-mini"), encoder=clip_mini)
    assert rep.indexed == len(names) and not rep.problems, [p.reason for p in rep.problems]
    svc = SearchService(tmp_path / "idx")
    for i, name in enumerate(names):
        hits = svc.search_image(load_image(f"img/{name}", tmp_path), k=3)
        assert hits[0].item_id == f"K{i}", (name, [h.item_id for h in hits])


def test_pictures_that_failed_for_a_passing_reason_are_fetched_again(tmp_path, clip_tiny):
    """A CDN that answers 503 is tried 3 times; if it keeps failing, the item is indexed without that
    picture, the problem says it is temporary, and the next run embeds the item again (and then forgets
    the problem). A 404 is final: not tried again, still reported."""
    import json
    import shutil

    import numpy as np

    from moonsearch.data.images import TRANSIENT
    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.search.service import SearchService

    body, state = _jpeg((20, 160, 40)), {"fail": 0}

    def cdn(path):
        if path == "/gone.jpg":
            return 404, b""
        if state["fail"] > 0:
            state["fail"] -= 1
            return 503, b""
        return 200, body

    with static_http(cdn) as (url, asked):
        (tmp_path / "local.jpg").write_bytes(_jpeg())
        pq.write_table(pa.table({"item_id": ["A", "B", "C"], "title": ["green cup", "red cup", "blue cup"],
                                 "category": [["home", "cups"]] * 3,
                                 "images": [["local.jpg", f"{url}/cdn.jpg"], ["local.jpg"],
                                            ["local.jpg", f"{url}/gone.jpg"]]}),
                       tmp_path / "catalog.parquet")
        job = IndexJob(tmp_path / "catalog.parquet", tmp_path / "idx", model="clip-tiny", timeout=5)
        state["fail"] = 2  # two 503s, then the picture: the third try of the same run gets it
        rep = run_index(job, encoder=clip_tiny)
        assert [p.reason for p in rep.problems if p.item_id == "A"] == [] and len(asked) == 4
        assert [p.item_id for p in rep.problems] == ["C"] and TRANSIENT not in rep.problems[0].reason
        whole = SearchService(tmp_path / "idx").product_vector("A")
        shutil.rmtree(tmp_path / "idx")

        state["fail"] = 3  # down for the whole run
        rep = run_index(job, encoder=clip_tiny)
        flaky = [p for p in rep.problems if p.item_id == "A"]
        assert len(flaky) == 1 and "HTTP 503" in flaky[0].reason and flaky[0].reason.endswith(f"({TRANSIENT})")
        assert rep.indexed == 3 and rep.retried == 0
        rejects = [json.loads(x) for x in (tmp_path / "idx" / "rejects.jsonl").read_text().splitlines()]
        assert any(r["item_id"] == "A" and "temporary" in r["reason"] for r in rejects)
        without = SearchService(tmp_path / "idx").product_vector("A")
        assert not np.allclose(without, whole, atol=1e-3)

        rep = run_index(job, encoder=clip_tiny)  # the CDN is back: A is embedded again, with its picture
        assert rep.retried == 1 and rep.embedded == 1 and rep.cached == 2
        assert [p.item_id for p in rep.problems] == ["C"]  # the 404 stays, reported, not retried
        np.testing.assert_allclose(SearchService(tmp_path / "idx").product_vector("A"), whole, atol=1e-3)
        before = len(asked)
        rep = run_index(job, encoder=clip_tiny)  # and then it is an ordinary cached item
        assert rep.retried == 0 and rep.embedded == 0 and rep.cached == 3 and len(asked) == before
        assert [p.item_id for p in rep.problems] == ["C"]


def test_recheck_urls_embeds_a_picture_replaced_at_the_same_address(tmp_path, clip_tiny):
    """A URL names its picture for good unless `index --recheck-urls`: then each run asks the server
    (HEAD) and an item whose picture changed behind the same address is embedded again, the rest reused."""
    import numpy as np

    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.search.service import SearchService

    pictures = {"etag": '"v1"', "body": _jpeg((200, 30, 30))}
    with static_http(lambda path: (200, pictures["body"], {"ETag": pictures["etag"]})) as (url, asked):
        pq.write_table(pa.table({"item_id": ["A", "B"], "title": ["cup", "bowl"], "category": [["home"]] * 2,
                                 "images": [[f"{url}/a.jpg"], [f"{url}/b.jpg"]]}), tmp_path / "catalog.parquet")
        plain = IndexJob(tmp_path / "catalog.parquet", tmp_path / "idx", model="clip-tiny")
        check = IndexJob(tmp_path / "catalog.parquet", tmp_path / "idx", model="clip-tiny", recheck_urls=True)
        assert run_index(plain, encoder=clip_tiny).embedded == 2
        first = SearchService(tmp_path / "idx").product_vector("A")
        pictures.update(etag='"v2"', body=_jpeg((30, 30, 200)))  # replaced behind the same address
        asked.clear()
        rep = run_index(plain, encoder=clip_tiny)
        assert rep.embedded == 0 and asked == []  # without the option: reused, the server never asked
        rep = run_index(check, encoder=clip_tiny)  # first run with the option: keys now carry the version
        assert rep.embedded == 2 and sorted(a for a in asked if a.startswith("HEAD")) == ["HEAD /a.jpg", "HEAD /b.jpg"]
        assert not np.allclose(SearchService(tmp_path / "idx").product_vector("A"), first, atol=1e-3)
        asked.clear()
        rep = run_index(check, encoder=clip_tiny)  # unchanged: asked, reused, nothing fetched
        assert rep.embedded == 0 and rep.cached == 2 and all(a.startswith("HEAD") for a in asked)
        pictures["etag"] = '"v3"'
        rep = run_index(check, encoder=clip_tiny)
        assert rep.embedded == 2 and rep.cached == 0
