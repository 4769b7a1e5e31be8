"""The search page in a real browser: Playwright driving Debian's Chromium against a real server.

Chromium comes from `apt-get install chromium` (.ci/run installs it). Without it these tests skip, except
where MOONSEARCH_REQUIRE_BROWSER=1 (CI), where a missing browser fails them. Screenshots go to
$MOONSEARCH_SCREENSHOTS when set."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serve_util import running, start

CHROMIUM = os.environ.get("MOONSEARCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("MOONSEARCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium")
        pytest.skip("no Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(tiny_index, clip_tiny):
    with running(start(tiny_index, clip_tiny, reload_interval=0)) as u:
        yield u


@pytest.fixture(scope="module")
def catalog(tiny_index, clip_tiny):
    from moonsearch.search.service import SearchService

    svc = SearchService(tiny_index, encoder=clip_tiny)
    return [m for c in svc.index.categories.values() for m in c.meta.to_pylist()]


def shot(page, name: str) -> None:
    folder = os.environ.get("MOONSEARCH_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def cards(page) -> list[dict]:
    return page.eval_on_selector_all(".card", """els => els.map(e => ({
        id: e.dataset.itemId, cat: e.querySelector('.cat').textContent,
        img: e.querySelector('img') ? e.querySelector('img').naturalWidth : -1}))""")


def wait_results(page) -> None:
    page.wait_for_function("() => !document.getElementById('status').textContent.startsWith('Searching')")


def test_query_in_the_url_shows_hits_with_loaded_photos(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/?q=red+sneakers")
    page.wait_for_selector(".card")
    page.wait_for_function("() => [...document.querySelectorAll('.card img')].slice(0, 10).every("
                           "i => i.complete && i.naturalWidth > 0)")
    found = cards(page)
    assert len(found) == 24 and all(c["img"] > 0 for c in found[:10])  # the rest load lazily
    assert page.input_value("#q") == "red sneakers"
    assert "results for" in page.text_content("#status")
    shot(page, "page-text-query")
    page.close()


def test_typing_a_query_updates_the_url(browser, url, catalog):
    page = browser.new_page()
    page.goto(url + "/")
    title = catalog[7]["title"]
    page.fill("#q", title)
    page.press("#q", "Enter")
    page.wait_for_selector(".card")
    wait_results(page)
    assert "q=" in page.url and page.evaluate("new URLSearchParams(location.search).get('q')") == title
    assert cards(page)[0]["id"]  # the library ranks; the page shows what the API returned
    page.close()


def drop_heic(page, photo: str, name: str) -> None:
    """Drop ``photo`` re-encoded as HEIC, named ``name``, with the blank type browsers give such files."""
    import base64
    import io

    import pillow_heif
    from PIL import Image

    heic = io.BytesIO()
    pillow_heif.from_pillow(Image.open(photo).convert("RGB")).save(heic, quality=90)
    page.evaluate("""([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, { type: "" }));
        document.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true })); }""",
                  [base64.b64encode(heic.getvalue()).decode(), name])


def test_photo_upload(browser, url, catalog):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/")
    photo = next(m for m in catalog if m["images"])["images"][0]
    page.set_input_files("#photo", photo)
    page.wait_for_selector(".card")
    wait_results(page)
    assert "your photo" in page.text_content("#status"), page.text_content("#status")
    assert page.is_visible("#photo-thumb")
    page.wait_for_function("() => [...document.querySelectorAll('.card img')].slice(0, 5).every(i => i.complete && i.naturalWidth > 0)",
                           timeout=10000)
    shot(page, "page-photo-query")
    # an iPhone's HEIC photo, whose type the browser leaves blank: the page sends it, the server reads it
    page.evaluate("() => { document.querySelector('#grid').innerHTML = ''; }")
    with page.expect_response(lambda r: r.url.endswith("/search/image")) as resp:  # dropped, as from a desktop
        drop_heic(page, photo, "phone.HEIC")
    assert resp.value.status == 200, resp.value.text()
    page.wait_for_selector(".card")
    wait_results(page)
    assert "your photo" in page.text_content("#status") and "not an image" not in page.text_content("#status")
    # Chromium cannot draw HEIC: the chip names the file instead of showing a broken picture
    page.wait_for_selector("#photo-name", state="visible")
    assert page.text_content("#photo-name") == "phone.HEIC" and not page.is_visible("#photo-thumb")
    shot(page, "page-photo-heic")
    page.close()


def test_more_like_this(browser, url):
    page = browser.new_page()
    page.goto(url + "/?q=bag")
    page.wait_for_selector(".card")
    first = cards(page)[0]["id"]
    page.click(f".card[data-item-id='{first}'] .like")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('like') === '{first}'")
    wait_results(page)
    page.wait_for_selector(".card")
    assert first not in [c["id"] for c in cards(page)]
    assert "products like" in page.text_content("#status")
    page.close()


def test_facet_narrows_and_chip_clears(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/?q=shoes")
    page.wait_for_selector(".facet")
    facet = page.eval_on_selector_all(".facet", "els => els.map(e => e.dataset.category)")[1]
    page.click(f".facet[data-category='{facet}']")
    page.wait_for_function("() => new URLSearchParams(location.search).getAll('category').length === 1")
    wait_results(page)
    got = cards(page)
    assert got and all(c["cat"].startswith(facet) for c in got)
    shot(page, "page-facet")
    page.click(".chip")
    page.wait_for_function("() => new URLSearchParams(location.search).getAll('category').length === 0")
    wait_results(page)
    assert not all(c["cat"].startswith(facet) for c in cards(page))
    page.close()


def test_errors_are_shown(browser, url):
    page = browser.new_page()
    page.goto(url + "/?q=shoes&category=no+such+category")
    page.wait_for_selector("#status.error")
    assert "no indexed category matches" in page.text_content("#status")
    page.close()


def test_phone_width_has_no_sideways_scroll(browser, url, catalog):
    """Nor with a photo in the search box: its chip (a picture, or a long file name) shares the row."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url + "/?q=red+sneakers")
    page.wait_for_selector(".card")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "page-phone")
    photo = next(m for m in catalog if m["images"])["images"][0]
    page.set_input_files("#photo", photo)
    page.wait_for_selector("#photo-thumb", state="visible")
    wait_results(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    drop_heic(page, photo, "IMG_20261127_093512_a_long_phone_name.HEIC")
    page.wait_for_selector("#photo-name", state="visible")
    wait_results(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.is_visible("#go") and page.is_visible("#photo-button")
    shot(page, "page-phone-photo")
    page.close()


def test_drag_and_drop_a_photo(browser, url, catalog):
    page = browser.new_page()
    page.goto(url + "/")
    photo = Path(next(m for m in catalog if m["images"])["images"][0])
    page.evaluate("""async ([bytes, name]) => {
        const file = new File([new Uint8Array(bytes)], name, {type: "image/png"});
        const dt = new DataTransfer();
        dt.items.add(file);
        for (const type of ["dragenter", "dragover", "drop"]) {
            document.getElementById("dropzone").dispatchEvent(
                new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
        }
    }""", [list(photo.read_bytes()), photo.name])
    page.wait_for_selector(".card")
    wait_results(page)
    assert "your photo" in page.text_content("#status") and page.is_visible("#photo-thumb")
    page.close()


def test_no_results_say_so(browser, url):
    page = browser.new_page()
    page.goto(url + "/?q=qqqzzxx&mode=lexical")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('No products')")
    assert page.eval_on_selector_all(".card", "els => els.length") == 0
    assert "mode=lexical" in page.url
    page.close()
