"""Real artwork for a held-out check: named drawings from icon sets that npm carries, split BY SOURCE.

Each source is one vendor's icon set (``@iconify-json/<set>``, pinned versions, fetched once with
``npm pack`` into the cache folder and read straight from the tarball). A concept ("camera",
"umbrella") drawn by two vendors gives a cross-artist pair: one vendor's drawing is the product's clean
picture, the other's is the query, as a shopper's photo of the same object would be.

Two splits whose sources, query vendors and background photographs are disjoint:

- ``fit``: sources that training, fitting and tuning may use;
- ``eval``: sources that nothing is fitted or tuned on; only ``moonsearch bench real`` reads them.

Emoji artwork of any vendor is never used here (it is reserved for outside evaluation).

A product gets its clean picture and a listing photo: the picture pasted into a real photograph with
two other drawings of the same vendor beside it (distractors). Queries: the name (text), the other
vendor's drawing (image), and drawing + head noun (text+image).
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from moonsearch.data.render import PHOTOS, photo
from moonsearch.errors import UnknownItem, UserError
from moonsearch.utils.io import atomic_path

# set -> pinned version; "colour" sets are drawn in colour, the rest are glyphs drawn in one ink
SOURCES = {
    "flat-color-icons": "1.2.3", "fluent-color": "1.2.21", "mdi": "1.2.3", "lucide": "1.2.137",
    "streamline-ultimate-color": "1.2.2", "streamline-freehand-color": "1.2.2", "tabler": "1.2.41",
    "ph": "1.2.2",
}
# The WIDE pool: more vendors for fitting only (never judged on), for learned maps that should see many
# styles. Glyph sets drawn in one ink, and IconPark's multi-colour set (its icons with 3+ fill colours).
WIDE_GLYPHS = {
    "akar-icons": "1.2.7", "ant-design": "1.2.9", "basil": "1.2.4", "bi": "1.2.7", "bx": "1.2.3", "carbon": "1.2.29",
    "cil": "1.2.3", "clarity": "1.2.4", "fa6-solid": "1.2.4", "fa6-regular": "1.2.4", "game-icons": "1.2.4",
    "gravity-ui": "1.2.15", "healthicons": "1.2.13", "heroicons": "1.2.3", "hugeicons": "1.2.35",
    "icon-park-outline": "1.2.4", "iconamoon": "1.2.2", "iconoir": "1.2.11", "ion": "1.2.7", "la": "1.2.1",
    "majesticons": "1.2.5", "mingcute": "1.2.8", "mynaui": "1.2.19", "proicons": "1.2.20", "ri": "1.2.10",
    "solar": "1.2.13", "streamline": "1.2.5", "streamline-flex": "1.2.3", "streamline-plump": "1.2.0",
    "streamline-ultimate": "1.2.2", "system-uicons": "1.2.4", "tdesign": "1.2.19", "uil": "1.2.3",
    "pepicons-pop": "1.2.4",
}
WIDE_COLOUR = {"icon-park": "1.2.4"}
SOURCES.update(WIDE_GLYPHS | WIDE_COLOUR)
# sets that redraw an eval vendor's icons (Google's Material icons are in mdi, lucide forks feather,
# fluent-color colours Fluent UI's glyphs, flat-color-icons is Icons8's): never in any fitting pool
EVAL_RELATIVES = ("ic", "material-symbols", "material-symbols-light", "mdi-light", "feather", "lucide-lab",
                  "fluent", "fluent-mdl2", "icons8", "line-md")

# photographs for listing photos: scikit-image's and matplotlib's; the fit split's are the ones the
# synthetic world uses as backgrounds (moonsearch.data.render.PHOTOS), the eval split's are disjoint
EVAL_PHOTOS = ("camera", "clock", "coins", "moon", "page", "text", "grace_hopper")


@dataclass(frozen=True)
class Split:
    name: str
    products: tuple[str, ...]  # vendors whose drawings are the products' pictures
    queries: tuple[str, ...]  # vendors whose drawings are the image queries
    photos: tuple[str, ...]  # background photographs of listing photos
    prefixed: bool = False  # product names lead with a topic word ("accounting-calculator"): match the rest too

    def all_sources(self) -> list[str]:
        return [*self.products, *self.queries, *(f"photo:{p}" for p in self.photos)]


def splits() -> dict[str, Split]:
    return {
        "fit": Split("fit", ("streamline-ultimate-color", "streamline-freehand-color"),
                     ("tabler", "ph"), tuple(PHOTOS), prefixed=True),
        "eval": Split("eval", ("flat-color-icons", "fluent-color"), ("mdi", "lucide"), EVAL_PHOTOS),
    }


def check_disjoint(a: Split, b: Split) -> None:
    """Raise if two splits share a vendor or a photograph."""
    shared = (set(a.products + a.queries) & set(b.products + b.queries)) | (set(a.photos) & set(b.photos))
    if shared:
        raise ValueError(f"splits {a.name} and {b.name} share sources: {sorted(shared)}")


def is_emoji(source: str) -> bool:
    """Whether an artwork set is (or bundles) emoji: reserved for outside evaluation, never used here."""
    return any(w in source for w in ("emoji", "noto", "twemoji", "openmoji"))


def check_wide_pool() -> None:
    """Raise if the wide pool holds an eval vendor or one of its relatives, or emoji artwork."""
    ev = splits()["eval"]
    bad = set(WIDE_GLYPHS | WIDE_COLOUR) & (set(ev.products + ev.queries) | set(EVAL_RELATIVES))
    bad |= {s for s in WIDE_GLYPHS | WIDE_COLOUR if is_emoji(s)}
    if bad:
        raise ValueError(f"the wide pool holds held-out or related sources: {sorted(bad)}")


# ---- fetching and drawing -------------------------------------------------------------------------
def fetch(source: str, cache: Path | None = None) -> dict:
    """The iconify JSON of ``source`` (``{"icons": {name: {"body": svg}}, "width": .., ...}``)."""
    if source not in SOURCES:
        raise UnknownItem(f"unknown artwork source {source!r}; known: {', '.join(SOURCES)}")
    if is_emoji(source):
        raise UserError(f"{source}: emoji artwork is reserved for outside evaluation")
    return _load(source, str(cache or _cache()))


def _cache() -> Path:
    from moonsearch.paths import cache_dir

    return cache_dir() / "real-artwork"


@lru_cache(maxsize=None)
def _load(source: str, cache: str) -> dict:
    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    tgz = folder / f"iconify-json-{source}-{SOURCES[source]}.tgz"
    if not tgz.exists():
        spec = f"@iconify-json/{source}@{SOURCES[source]}"
        try:
            subprocess.run(["npm", "pack", "-q", spec, "--pack-destination", str(folder)], check=True,
                           capture_output=True, timeout=300)
        except FileNotFoundError as e:
            raise RuntimeError(f"npm is needed once to fetch {spec} (apt-get install npm)") from e
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"npm pack {spec} failed: {e.stderr.decode(errors='replace').strip()}") from e
    with tarfile.open(tgz) as tar:
        return json.load(tar.extractfile("package/icons.json"))


_STYLE = re.compile(r"(-(\d+|bold|fill|filled|duotone|light|thin|outline|outlined|solid|remix|regular|"
                    r"sharp|rounded|alt|off|variant))+$")


def concept(name: str) -> str:
    """The object an icon name draws: size and style suffixes dropped (``camera-24`` -> ``camera``)."""
    return _STYLE.sub("", name)


def concepts(source: str) -> dict[str, str]:
    """concept -> one icon name drawing it (the first in name order), for object-like names only."""
    icons = fetch(source)["icons"]
    out: dict[str, str] = {}
    for name in sorted(icons):
        c = concept(name)
        if c and not re.search(r"\d", c) and len(c) > 2 and c.count("-") <= 2:
            out.setdefault(c, name)
    return out


def draw(source: str, name: str, size: int = 224, ink: str = "#202020") -> Image.Image:
    """The icon rendered on white, RGB ``size`` x ``size``; glyph ink (``currentColor``) in ``ink``."""
    import cairosvg

    data = fetch(source)
    icon = data["icons"][name]
    w, h = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
    left, top = icon.get("left", data.get("left", 0)), icon.get("top", data.get("top", 0))
    body = icon["body"].replace("currentColor", ink)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
           f'viewBox="{left} {top} {w} {h}" color="{ink}">{body}</svg>')
    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=size, output_height=size)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out.alpha_composite(rgba)
    return out.convert("RGB")


def listing_photo(main: Image.Image, distractors: list[Image.Image], background: np.ndarray,
                  rng: np.random.Generator, size: int = 320) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``main`` pasted into a crop of a real photograph, distractor drawings beside it; and the box
    (x0, y0, x1, y1) that ``main`` was pasted into (the core product's ground truth)."""
    h, w = background.shape[:2]
    s = min(h, w)
    y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    canvas = Image.fromarray(background[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)
    for k, img in enumerate([*distractors, main]):  # the product last, so it is never covered
        side = int(size * (rng.uniform(0.42, 0.6) if k == len(distractors) else rng.uniform(0.18, 0.3)))
        tile = img.resize((side, side), Image.BILINEAR)
        mask = Image.fromarray((np.asarray(tile.convert("L")) < 245).astype(np.uint8) * 255)  # drop white
        x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        canvas.paste(tile, (x, y), mask)
    return canvas, (x, y, x + side, y + side)


# ---- the check's data -----------------------------------------------------------------------------
@dataclass
class RealSet:
    """Products (clean picture + listing photo) and the three query kinds over them."""

    split: str
    item_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    clean: list[Image.Image] = field(default_factory=list)
    listing: list[Image.Image] = field(default_factory=list)
    listing_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # where the product was pasted
    queries: list[dict] = field(default_factory=list)  # {"modality", "text", "image", "item_id", "source"}


def words(c: str) -> str:
    return c.replace("-", " ")


def _products(split: str, names: list[str], chosen: dict[str, tuple[str, str]], photos: Sequence[str],
              rng: np.random.Generator, size: int) -> RealSet:
    """A set holding one product per concept in ``names`` (``chosen``: concept -> (vendor, icon)): its
    clean picture, and a listing photo with two drawings of the same vendor over one of ``photos``."""
    out = RealSet(split)
    for i, c in enumerate(names):
        src, name = chosen[c]
        out.item_ids.append(f"{split}-{i:04d}")
        out.titles.append(words(c))
        out.sources.append(src)
        out.clean.append(draw(src, name, size))
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(out.sources):
        by_source.setdefault(s, []).append(i)
    for i, src in enumerate(out.sources):
        others = [j for j in by_source[src] if j != i]
        pick = rng.choice(others, size=min(2, len(others)), replace=False) if others else []
        bg = photo(photos[int(rng.integers(len(photos)))])
        image, box = listing_photo(out.clean[i], [out.clean[j] for j in pick], bg, rng)
        out.listing.append(image)
        out.listing_boxes.append(box)
    return out


def build(split: str = "eval", seed: int = 0, max_products: int | None = None, size: int = 224) -> RealSet:
    """The products of ``split``'s product vendors (one per concept) and, for each concept that a query
    vendor draws too, a text, an image and a text+image query. Seeded; same arguments, same set."""
    sp = splits()[split]
    rng = np.random.default_rng(seed)
    query_concepts = [concepts(q) for q in sp.queries]
    chosen: dict[str, tuple[str, str]] = {}  # concept -> (vendor, icon name)
    for src in sp.products:
        for c, name in concepts(src).items():
            chosen.setdefault(c, (src, name))
    names = sorted(chosen)

    def match(c: str, qc: dict) -> str | None:
        for key in (c, c.split("-", 1)[-1]) if sp.prefixed else (c,):
            if key in qc:
                return qc[key]
        return None

    paired = [c for c in names if any(match(c, qc) for qc in query_concepts)]
    if max_products is not None:  # keep every paired concept first, then distractor products
        keep = set(paired[:max_products]) | set([c for c in names if c not in paired][:max(0, max_products - len(paired))])
        names = [c for c in names if c in keep]
    out = _products(split, names, chosen, sp.photos, rng, size)
    for i, c in enumerate(names):
        out.queries.append({"modality": "text", "text": words(c), "image": None, "item_id": out.item_ids[i],
                            "source": ""})
        for qsrc, qc in zip(sp.queries, query_concepts):
            if match(c, qc):
                img = draw(qsrc, match(c, qc), size)
                out.queries.append({"modality": "image", "text": None, "image": img, "item_id": out.item_ids[i],
                                    "source": qsrc})
                out.queries.append({"modality": "text+image", "text": words(c).split()[-1], "image": img,
                                    "item_id": out.item_ids[i], "source": qsrc})
                break  # one drawing per concept: the first query vendor that has it
    return out


def product_concepts(source: str) -> dict[str, str]:
    """``concepts(source)`` as the wide pool uses them: streamline-ultimate-color's topic prefix dropped
    ("accounting-calculator" -> "calculator"), and of IconPark only its icons with 3+ fill colours."""
    cs = concepts(source)
    if source == "streamline-ultimate-color":
        out: dict[str, str] = {}
        for c, name in cs.items():
            out.setdefault(c.split("-", 1)[-1], name)
        return out
    if source == "icon-park":
        icons = fetch(source)["icons"]
        return {c: n for c, n in cs.items() if len(set(re.findall(r"#[0-9a-fA-F]{3,6}", icons[n]["body"]))) >= 3}
    return cs


def fit_product_names() -> list[str]:
    """The fit split's product names, as words: what ``wide_names`` leaves out."""
    return sorted({words(c) for v in splits()["fit"].products for c in concepts(v)})


def wide_names() -> list[str]:
    """Every concept name the wide pool's glyph vendors draw, as words ("shopping cart"), less the fit
    split's product names (those stay unseen by a text side trained on these). Plentiful outside text
    for distillation; the same sources as ``build_wide`` (``check_wide_pool``: no eval vendor or
    relative, no emoji artwork)."""
    check_wide_pool()
    return sorted({words(c) for g in WIDE_GLYPHS for c in concepts(g)} - set(fit_product_names()))


def build_wide(seed: int = 1, size: int = 224, limit: int | None = None) -> RealSet:
    """The wide fitting pool as a set: products are the colour drawings of streamline-ultimate-color (the
    fit split's, name prefix dropped) and IconPark's multi-colour icons, each with a listing photo over the
    fit split's photographs; image queries are every wide glyph vendor's drawing of the same concept (one
    query per vendor that draws it). Never judged on: a check of a map fitted here holds vendors out.
    ``limit``: the first products only (in concept order)."""
    check_wide_pool()
    rng = np.random.default_rng(seed)
    chosen: dict[str, tuple[str, str]] = {}
    for src in ("streamline-ultimate-color", "icon-park"):
        for c, name in product_concepts(src).items():
            chosen.setdefault(c, (src, name))
    names = sorted(chosen)[:limit]
    out = _products("wide", names, chosen, splits()["fit"].photos, rng, size)
    glyphs = {g: concepts(g) for g in WIDE_GLYPHS}
    for i, c in enumerate(names):
        for g, gc in glyphs.items():
            if c in gc:
                out.queries.append({"modality": "image", "text": None, "image": draw(g, gc[c], size),
                                    "item_id": out.item_ids[i], "source": g})
    return out


def write_training_world(out: str | Path, demo: str | Path, seed: int = 1, image_queries: int = 1,
                         text_image_every: int = 3, limit: int | None = None, progress=None) -> dict:
    """A training world for the MOON trainer: the demo world beside the wide pool's real artwork.

    ``out/catalog.parquet`` holds the demo catalog and the wide pool's 1,565 products (``limit``: the
    first ones only; title = the concept's words, pictures = clean drawing + listing photo, no category
    or attributes: the pool has none); ``out/behavior.parquet`` holds the demo log unchanged (its test
    split stays the demo world's test split) and, for each real product, a TRAIN query by its name,
    ``image_queries`` drawings of it by other (glyph) vendors and, for every ``text_image_every``-th
    product (where it has a drawing), drawing + head noun. Real queries get times inside the demo's
    training period, so validation sees both worlds. The demo's pictures are linked, not copied. Only
    the wide pool's sources are read: no eval vendor, no relative of one, no emoji artwork
    (``check_wide_pool``). Pictures already written are kept, so a rerun only rewrites the tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moonsearch.utils.io import atomic_write_parquet

    out, demo = Path(out), Path(demo).resolve()
    if out.resolve() == demo:
        raise UserError(f"{out}: the training world goes beside the demo world, not into it")
    for f in ("catalog.parquet", "behavior.parquet"):
        if not (demo / f).exists():
            raise UserError(f"{demo / f} not found: build the demo world first (moonsearch demo-data --out {demo})")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "queries"):
        link = out / sub
        if not link.exists():
            link.symlink_to(demo / sub, target_is_directory=True)
    wide = build_wide(seed, limit=limit)
    rng = np.random.default_rng([seed, 7])
    (out / "real").mkdir(exist_ok=True)
    tick = progress(len(wide.item_ids)) if progress else None
    by_item: dict[str, list[dict]] = {}
    for q in wide.queries:
        by_item.setdefault(q["item_id"], []).append(q)
    cat = pq.read_table(demo / "catalog.parquet")
    beh = pq.read_table(demo / "behavior.parquet")
    train_ts = [t for t, s in zip(beh["timestamp"].to_pylist(), beh["split"].to_pylist()) if s == "train"]
    t0, t1 = min(train_ts), max(train_ts)
    def saved(img: Image.Image, ref: str) -> str:
        if not (out / ref).exists():
            with atomic_path(out / ref) as p:
                img.save(p, format="PNG")
        return ref

    rows, queries = [], []
    for i, item in enumerate(wide.item_ids):
        refs = [saved(img, f"real/{item}_{k}.png") for k, img in enumerate((wide.clean[i], wide.listing[i]))]
        x0, y0, x1, y1 = wide.listing_boxes[i]
        side = wide.listing[i].width
        rows.append({"item_id": item, "title": wide.titles[i], "category": [], "attributes": [], "images": refs,
                     "image_boxes": [[0.0, 0.0, 1.0, 1.0], [x0 / side, y0 / side, x1 / side, y1 / side]],
                     "group_id": item, "price": None})
        queries.append((wide.titles[i], None, "text", item))
        drawn = by_item.get(item, [])
        picked = rng.choice(len(drawn), size=min(image_queries, len(drawn)), replace=False) if drawn else []
        for n, j in enumerate(picked):
            q = drawn[int(j)]
            ref = saved(q["image"], f"real/{item}_q{q['source']}.png")
            queries.append((None, ref, "image", item))
            if n == 0 and i % text_image_every == 0:
                queries.append((wide.titles[i].split()[-1], ref, "text+image", item))
        if tick:
            tick()
    real_cat = pa.Table.from_pylist(rows, schema=cat.schema)
    atomic_write_parquet(pa.concat_tables([cat, real_cat]), out / "catalog.parquet")
    times = sorted(t0 + (t1 - t0) * float(u) for u in rng.random(len(queries)))
    order = rng.permutation(len(queries))
    real_beh = pa.Table.from_pylist([
        {"query_id": f"R{k:07d}", "query_text": queries[j][0], "query_image": queries[j][1],
         "modality": queries[j][2], "item_id": queries[j][3], "timestamp": times[k], "user_id": "real",
         "split": "train"} for k, j in enumerate(order)], schema=beh.schema)
    atomic_write_parquet(pa.concat_tables([beh, real_beh]), out / "behavior.parquet")
    mods = real_beh["modality"].to_pylist()
    return {"demo products": cat.num_rows, "real products": len(rows), "real queries": len(queries),
            **{f"real {m} queries": mods.count(m) for m in ("text", "image", "text+image")}}
