"""Search hits as a picture: the query photo (if any), then each hit's first photo with rank, score
and title, in one PNG."""
from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from moonsearch.data.images import ImageError, load_image
from moonsearch.utils.io import atomic_path

TILE = 180


def _tile(img: Image.Image | None, lines: list[str], border=(220, 220, 220)) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + 52), "white")
    if img is not None:
        im = img.copy()
        im.thumbnail((TILE - 8, TILE - 8))
        tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    else:
        ImageDraw.Draw(tile).text((10, TILE // 2), "(no photo)", fill=(120, 120, 120))
    d = ImageDraw.Draw(tile)
    d.rectangle([0, 0, TILE - 1, TILE + 51], outline=border, width=2)
    font = ImageFont.load_default(size=11)
    for i, line in enumerate(lines[:4]):
        d.text((4, TILE + 1 + i * 12), line, fill=(20, 20, 20), font=font)
    return tile


def hits_picture(hits, label: str, path: str | Path, query_image: Image.Image | None = None, cols: int = 5) -> Path:
    tiles = []
    if query_image is not None:
        tiles.append(_tile(query_image, ["QUERY"] + textwrap.wrap(label, 28)[:3], border=(40, 90, 200)))
    for rank, h in enumerate(hits, 1):
        img = None
        for ref in h.images[:1]:
            try:
                img = load_image(ref)
            except ImageError:
                img = None
        tiles.append(_tile(img, [f"#{rank}  {h.score:.3f}  {h.item_id}"] + textwrap.wrap(h.title, 28)[:3]))
    rows = max(1, (len(tiles) + cols - 1) // cols)
    head = 24
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + 52) + head), "white")
    ImageDraw.Draw(sheet).text((6, 4), label[:120], fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * TILE, head + (i // cols) * (TILE + 52)))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
