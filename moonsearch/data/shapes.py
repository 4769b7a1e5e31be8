"""Pillow drawings of the synthetic world's product types.

Each drawer paints one product into a square RGBA tile: ``draw(tile_size, fill, detail, style) -> Image``
where ``fill`` is an RGBA image (colour + pattern + material texture) the product body is cut from,
``detail`` an RGB colour for outlines and small parts, and ``style`` 0 or 1 (a visible shape variant).
Coordinates below are in a unit square, y pointing down; ``_P`` maps them to pixels.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image, ImageDraw

Drawer = Callable[[int, Image.Image, tuple, int], Image.Image]


def _P(pts, s):
    return [(x * s, y * s) for x, y in pts]


def _body(s: int, fill: Image.Image, shapes) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """Tile with the union of ``shapes`` (kind, coords) filled from ``fill``; returns (tile, draw)."""
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    for kind, c in shapes:
        if kind == "poly":
            d.polygon(_P(c, s), fill=255)
        elif kind == "ellipse":
            d.ellipse([c[0] * s, c[1] * s, c[2] * s, c[3] * s], fill=255)
        elif kind == "rect":
            d.rounded_rectangle([c[0] * s, c[1] * s, c[2] * s, c[3] * s], radius=int(c[4] * s), fill=255)
    tile = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    tile.paste(fill.resize((s, s)), (0, 0), mask)
    return tile, ImageDraw.Draw(tile)


def _outline(draw, kind, c, s, colour, w=2):
    if kind == "poly":
        draw.polygon(_P(c, s), outline=colour, width=w)
    elif kind == "ellipse":
        draw.ellipse([c[0] * s, c[1] * s, c[2] * s, c[3] * s], outline=colour, width=w)
    elif kind == "rect":
        draw.rounded_rectangle([c[0] * s, c[1] * s, c[2] * s, c[3] * s], radius=int(c[4] * s),
                               outline=colour, width=w)


def _shape(shapes, extra=None) -> Drawer:
    """A drawer from body shapes plus an optional ``extra(draw, s, detail, style)`` for details."""

    def draw(s, fill, detail, style):
        chosen = shapes(style) if callable(shapes) else shapes
        tile, d = _body(s, fill, chosen)
        for kind, c in chosen:
            _outline(d, kind, c, s, detail, max(1, s // 60))
        if extra:
            extra(d, s, detail, style)
        return tile

    return draw


def _line(d, pts, s, colour, w):
    d.line(_P(pts, s), fill=colour, width=max(1, int(w * s)))


# --- apparel -------------------------------------------------------------------------------------
def _sneaker(style):
    upper = [(0.08, 0.72), (0.12, 0.5), (0.3, 0.45), (0.5, 0.58), (0.85, 0.62), (0.92, 0.72)]
    if style:  # high-top
        upper = [(0.08, 0.72), (0.1, 0.25), (0.32, 0.22), (0.4, 0.5), (0.85, 0.6), (0.92, 0.72)]
    return [("poly", upper), ("rect", (0.05, 0.7, 0.95, 0.8, 0.03))]


def _sneaker_extra(d, s, c, style):
    for i in range(4):
        x = 0.3 + i * 0.07
        _line(d, [(x, 0.5 + i * 0.02), (x + 0.05, 0.55 + i * 0.02)], s, c, 0.012)
    d.rectangle(_flat((0.05, 0.77, 0.95, 0.8), s), fill=(245, 245, 245, 255))


def _flat(box, s):
    return [box[0] * s, box[1] * s, box[2] * s, box[3] * s]


def _boot(style):
    top = 0.08 if style else 0.3
    return [("poly", [(0.25, top), (0.52, top), (0.55, 0.6), (0.85, 0.66), (0.88, 0.82), (0.22, 0.82)]),
            ("rect", (0.2, 0.8, 0.9, 0.88, 0.02))]


def _sandal(style):
    sole = [("rect", (0.08, 0.62, 0.92, 0.72, 0.05))]
    straps = [("poly", [(0.3, 0.62), (0.4, 0.42), (0.48, 0.42), (0.4, 0.62)]),
              ("poly", [(0.55, 0.62), (0.62, 0.45), (0.7, 0.45), (0.65, 0.62)])]
    if style:
        straps.append(("poly", [(0.15, 0.62), (0.2, 0.5), (0.26, 0.5), (0.24, 0.62)]))
    return sole + straps


def _tshirt(style):
    return [("poly", [(0.3, 0.12), (0.42, 0.16), (0.58, 0.16), (0.7, 0.12), (0.95, 0.3), (0.85, 0.45),
                      (0.75, 0.38), (0.75, 0.9), (0.25, 0.9), (0.25, 0.38), (0.15, 0.45), (0.05, 0.3)])]


def _tshirt_extra(d, s, c, style):
    if style:  # v-neck
        _line(d, [(0.42, 0.16), (0.5, 0.3), (0.58, 0.16)], s, c, 0.015)
    else:
        d.arc(_flat((0.42, 0.08, 0.58, 0.24), s), 0, 180, fill=c, width=max(1, s // 60))


def _hoodie(style):
    body = [("poly", [(0.3, 0.2), (0.7, 0.2), (0.92, 0.35), (0.95, 0.85), (0.84, 0.85), (0.78, 0.45),
                      (0.76, 0.92), (0.24, 0.92), (0.22, 0.45), (0.16, 0.85), (0.05, 0.85), (0.08, 0.35)]),
            ("ellipse", (0.34, 0.06, 0.66, 0.32))]
    return body


def _hoodie_extra(d, s, c, style):
    _line(d, [(0.5, 0.3), (0.5, 0.92 if style else 0.45)], s, c, 0.012)  # zip vs pullover
    d.rectangle(_flat((0.36, 0.62, 0.64, 0.78), s), outline=c, width=max(1, s // 60))


def _jeans(style):
    flare = 0.05 if style else 0.0
    return [("poly", [(0.28, 0.08), (0.72, 0.08), (0.75 + flare, 0.92), (0.56, 0.92), (0.5, 0.35),
                      (0.44, 0.92), (0.25 - flare, 0.92)])]


def _jeans_extra(d, s, c, style):
    _line(d, [(0.28, 0.14), (0.72, 0.14)], s, c, 0.012)


def _skirt(style):
    if style:  # pleated / wide
        return [("poly", [(0.35, 0.15), (0.65, 0.15), (0.92, 0.82), (0.08, 0.82)])]
    return [("poly", [(0.33, 0.15), (0.67, 0.15), (0.75, 0.75), (0.25, 0.75)])]


def _cap(style):
    brim = (0.45, 0.55, 0.95, 0.68, 0.06) if style == 0 else (0.1, 0.55, 0.9, 0.66, 0.06)
    return [("ellipse", (0.15, 0.25, 0.75, 0.85)), ("rect", brim)]


# --- accessories ---------------------------------------------------------------------------------
def _backpack(style):
    return [("rect", (0.22, 0.18, 0.78, 0.9, 0.12)), ("rect", (0.3, 0.55, 0.7, 0.85, 0.05))]


def _backpack_extra(d, s, c, style):
    d.arc(_flat((0.38, 0.06, 0.62, 0.28), s), 180, 360, fill=c, width=max(2, s // 30))
    if style:
        _line(d, [(0.22, 0.45), (0.78, 0.45)], s, c, 0.015)


def _handbag(style):
    return [("poly", [(0.22, 0.4), (0.78, 0.4), (0.9, 0.85), (0.1, 0.85)])]


def _handbag_extra(d, s, c, style):
    if style:  # shoulder strap
        d.arc(_flat((0.15, 0.05, 0.85, 0.75), s), 180, 360, fill=c, width=max(2, s // 40))
    else:
        d.arc(_flat((0.33, 0.2, 0.67, 0.6), s), 180, 360, fill=c, width=max(2, s // 25))


def _sunglasses(style):
    if style:  # round
        return [("ellipse", (0.08, 0.35, 0.45, 0.65)), ("ellipse", (0.55, 0.35, 0.92, 0.65))]
    return [("rect", (0.06, 0.38, 0.46, 0.62, 0.08)), ("rect", (0.54, 0.38, 0.94, 0.62, 0.08))]


def _sunglasses_extra(d, s, c, style):
    _line(d, [(0.44, 0.45), (0.56, 0.45)], s, c, 0.03)
    for box in ((0.12, 0.41, 0.4, 0.59), (0.6, 0.41, 0.88, 0.59)):
        d.ellipse(_flat(box, s), fill=(25, 25, 30, 230))


def _watch(style):
    face = ("ellipse", (0.3, 0.3, 0.7, 0.7)) if style == 0 else ("rect", (0.3, 0.3, 0.7, 0.7, 0.06))
    return [("rect", (0.4, 0.02, 0.6, 0.98, 0.04)), face]


def _watch_extra(d, s, c, style):
    d.ellipse(_flat((0.35, 0.35, 0.65, 0.65), s), fill=(240, 240, 235, 255), outline=c)
    _line(d, [(0.5, 0.5), (0.5, 0.39)], s, (20, 20, 20), 0.015)
    _line(d, [(0.5, 0.5), (0.59, 0.5)], s, (20, 20, 20), 0.015)


# --- home ----------------------------------------------------------------------------------------
def _mug(style):
    tall = 0.15 if style else 0.28
    return [("rect", (0.2, tall, 0.68, 0.85, 0.04))]


def _mug_extra(d, s, c, style):
    tall = 0.15 if style else 0.28
    d.arc(_flat((0.55, tall + 0.12, 0.9, 0.72), s), 270, 90, fill=c, width=max(3, s // 18))
    d.ellipse(_flat((0.2, tall - 0.04, 0.68, tall + 0.05), s), outline=c, width=max(1, s // 60))


def _teapot(style):
    return [("ellipse", (0.22, 0.3, 0.78, 0.85)), ("poly", [(0.75, 0.6), (0.95, 0.35), (0.97, 0.4), (0.8, 0.75)]),
            ("ellipse", (0.42, 0.2, 0.58, 0.34))]


def _teapot_extra(d, s, c, style):
    d.arc(_flat((0.05, 0.38, 0.35, 0.72), s), 90, 270, fill=c, width=max(3, s // 22))
    if style:
        _line(d, [(0.25, 0.55), (0.75, 0.55)], s, c, 0.015)


def _bottle(style):
    body = (0.3, 0.35, 0.7, 0.95, 0.08) if style == 0 else (0.25, 0.4, 0.75, 0.95, 0.2)
    return [("rect", (0.42, 0.05, 0.58, 0.38, 0.02)), ("rect", body)]


def _plate(style):
    return [("ellipse", (0.05, 0.25, 0.95, 0.75))]


def _plate_extra(d, s, c, style):
    d.ellipse(_flat((0.22, 0.35, 0.78, 0.65), s), outline=c, width=max(1, s // 50))
    if style:
        d.ellipse(_flat((0.1, 0.28, 0.9, 0.72), s), outline=c, width=max(1, s // 80))


def _lamp(style):
    shade = [(0.3, 0.1), (0.7, 0.1), (0.85, 0.42), (0.15, 0.42)] if style == 0 else \
        [(0.25, 0.12), (0.75, 0.12), (0.75, 0.42), (0.25, 0.42)]
    return [("poly", shade), ("rect", (0.47, 0.42, 0.53, 0.85, 0.0)), ("rect", (0.3, 0.84, 0.7, 0.92, 0.03))]


def _clock(style):
    return [("ellipse", (0.1, 0.1, 0.9, 0.9))] if style == 0 else [("rect", (0.12, 0.12, 0.88, 0.88, 0.08))]


def _clock_extra(d, s, c, style):
    d.ellipse(_flat((0.18, 0.18, 0.82, 0.82), s), fill=(245, 245, 240, 255))
    for i in range(12):
        import math
        a = i * math.pi / 6
        x, y = 0.5 + 0.28 * math.cos(a), 0.5 + 0.28 * math.sin(a)
        d.ellipse(_flat((x - 0.015, y - 0.015, x + 0.015, y + 0.015), s), fill=c)
    _line(d, [(0.5, 0.5), (0.5, 0.28)], s, (10, 10, 10), 0.025)
    _line(d, [(0.5, 0.5), (0.66, 0.56)], s, (10, 10, 10), 0.02)


def _vase(style):
    if style:
        return [("poly", [(0.4, 0.08), (0.6, 0.08), (0.58, 0.25), (0.8, 0.5), (0.7, 0.92), (0.3, 0.92),
                          (0.2, 0.5), (0.42, 0.25)])]
    return [("poly", [(0.38, 0.08), (0.62, 0.08), (0.6, 0.2), (0.68, 0.92), (0.32, 0.92), (0.4, 0.2)])]


def _chair(style):
    back = (0.25, 0.08, 0.7, 0.5, 0.03) if style == 0 else (0.25, 0.2, 0.7, 0.5, 0.1)
    return [("rect", back), ("rect", (0.2, 0.5, 0.8, 0.6, 0.02)), ("rect", (0.22, 0.6, 0.28, 0.95, 0.0)),
            ("rect", (0.72, 0.6, 0.78, 0.95, 0.0))]


def _table(style):
    top = ("rect", (0.05, 0.3, 0.95, 0.4, 0.02)) if style == 0 else ("ellipse", (0.05, 0.25, 0.95, 0.42))
    return [top, ("rect", (0.12, 0.4, 0.18, 0.9, 0.0)), ("rect", (0.82, 0.4, 0.88, 0.9, 0.0))]


# --- electronics ---------------------------------------------------------------------------------
def _laptop(style):
    return [("rect", (0.18, 0.12, 0.82, 0.6, 0.02)), ("poly", [(0.18, 0.62), (0.82, 0.62), (0.97, 0.82), (0.03, 0.82)])]


def _laptop_extra(d, s, c, style):
    d.rectangle(_flat((0.22, 0.16, 0.78, 0.56), s), fill=(30, 40, 60, 255) if style == 0 else (200, 220, 240, 255))
    for i in range(3):
        _line(d, [(0.12 + i * 0.02, 0.67 + i * 0.045), (0.88 - i * 0.02, 0.67 + i * 0.045)], s, c, 0.008)


def _keyboard(style):
    return [("rect", (0.03, 0.32, 0.97, 0.68 if style == 0 else 0.62, 0.03))]


def _keyboard_extra(d, s, c, style):
    rows = 4 if style == 0 else 3
    for r in range(rows):
        for k in range(12):
            x, y = 0.06 + k * 0.075, 0.36 + r * 0.075
            d.rectangle(_flat((x, y, x + 0.06, y + 0.055), s), outline=c, width=1)


def _headphones(style):
    cups = [("ellipse", (0.08, 0.45, 0.32, 0.85)), ("ellipse", (0.68, 0.45, 0.92, 0.85))] if style == 0 else \
        [("rect", (0.1, 0.5, 0.3, 0.82, 0.05)), ("rect", (0.7, 0.5, 0.9, 0.82, 0.05))]
    return cups


def _headphones_extra(d, s, c, style):
    d.arc(_flat((0.15, 0.1, 0.85, 0.95), s), 180, 360, fill=c, width=max(3, s // 18))


def _speaker(style):
    return [("rect", (0.28, 0.08, 0.72, 0.92, 0.04 if style == 0 else 0.2))]


def _speaker_extra(d, s, c, style):
    d.ellipse(_flat((0.36, 0.2, 0.64, 0.44), s), fill=(30, 30, 30, 255))
    d.ellipse(_flat((0.32, 0.5, 0.68, 0.86), s), fill=(30, 30, 30, 255))


def _phone(style):
    return [("rect", (0.3, 0.06, 0.7, 0.94, 0.06 if style == 0 else 0.12))]


def _phone_extra(d, s, c, style):
    d.rounded_rectangle(_flat((0.33, 0.12, 0.67, 0.86), s), radius=int(0.03 * s), fill=(20, 25, 35, 255))
    if style:
        d.ellipse(_flat((0.47, 0.08, 0.53, 0.11), s), fill=c)


def _camera(style):
    return [("rect", (0.08, 0.3, 0.92, 0.82, 0.05)), ("rect", (0.2, 0.2, 0.42, 0.32, 0.02))]


def _camera_extra(d, s, c, style):
    r = 0.22 if style == 0 else 0.17
    d.ellipse(_flat((0.5 - r, 0.56 - r, 0.5 + r, 0.56 + r), s), fill=(35, 35, 40, 255), outline=c, width=3)
    d.ellipse(_flat((0.5 - r / 2, 0.56 - r / 2, 0.5 + r / 2, 0.56 + r / 2), s), fill=(70, 90, 120, 255))


DRAWERS: dict[str, Drawer] = {
    "sneakers": _shape(_sneaker, _sneaker_extra),
    "boots": _shape(_boot),
    "sandals": _shape(_sandal),
    "t-shirts": _shape(lambda st: _tshirt(st), _tshirt_extra),
    "hoodies": _shape(_hoodie, _hoodie_extra),
    "jeans": _shape(_jeans, _jeans_extra),
    "skirts": _shape(_skirt),
    "caps": _shape(_cap),
    "backpacks": _shape(_backpack, _backpack_extra),
    "handbags": _shape(_handbag, _handbag_extra),
    "sunglasses": _shape(_sunglasses, _sunglasses_extra),
    "watches": _shape(_watch, _watch_extra),
    "mugs": _shape(_mug, _mug_extra),
    "teapots": _shape(_teapot, _teapot_extra),
    "bottles": _shape(_bottle),
    "plates": _shape(_plate, _plate_extra),
    "lamps": _shape(_lamp),
    "wall clocks": _shape(_clock, _clock_extra),
    "vases": _shape(_vase),
    "chairs": _shape(_chair),
    "tables": _shape(_table),
    "laptops": _shape(_laptop, _laptop_extra),
    "keyboards": _shape(_keyboard, _keyboard_extra),
    "headphones": _shape(_headphones, _headphones_extra),
    "speakers": _shape(_speaker, _speaker_extra),
    "smartphones": _shape(_phone, _phone_extra),
    "cameras": _shape(_camera, _camera_extra),
}
