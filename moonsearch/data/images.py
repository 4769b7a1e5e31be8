"""Loading product images from paths, file:// or http(s) URLs, or embedded bytes.

Every failure is an ``ImageError`` whose message says what went wrong (missing file, unreachable URL,
corrupt, truncated, decompression bomb, ...), so callers can report and skip it.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps
from moonsearch.errors import UserError

ImageRef = Union[str, bytes]
MAX_PIXELS = 64_000_000  # anything larger is treated as a decompression bomb
MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
EXIF_ORIENTATION = 0x0112


# how pictures are read: turned upright by their EXIF orientation (a phone photo stored sideways with
# an orientation tag, as browsers show it), and a picture with transparency laid on white, as a shop page
# shows it (a bare convert("RGB") shows the colour stored under transparent pixels, black in most PNG
# exports), and 16-bit / 32-bit / float greyscale (scans, TIFF and 16-bit PNG exports) scaled to 8 bits
# (Pillow's convert clips them: a 16-bit picture turns almost white, a 0..1 float one black), and colours
# in sRGB: a picture with an embedded colour profile (an iPhone's Display P3, Adobe RGB, a print CMYK
# profile) converted from it, as browsers do. Part of the indexer's content keys (``reading()``), so
# vectors cached under another reading are embedded again.
RGB_READING = "upright-srgb-on-white-wide-grey-scaled"
# pictures are read at most this many pixels on their longer side (0: as stored). Every model input is far
# smaller (160 px moon-mini / clip-mini, 224 open_clip, 448 the 3B preset), and a core-product crop of a
# third of the side still has 512 px; a 12-megapixel phone photo is decoded at reduced scale (JPEG) and
# shrunk once here instead of by every consumer (detector, towers, crops, content hashes).
READ_MAX_SIDE = 1536


def reading() -> str:
    """The name of how pictures are read now: part of the indexer's content keys."""
    return f"{RGB_READING}-max{READ_MAX_SIDE}"


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """A greyscale picture stored wider than 8 bits (modes I;16*, I, F) as 8-bit L, its range scaled
    rather than clipped: 16-bit values by 1/257; 32-bit integers the same when they exceed 255 (16-bit
    data, as older Pillows open 16-bit PNGs), else as they are; floats in [0, 1] by 255, else clipped."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1 else 1.0
    elif img.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        scale = 1 / 257 if a.size and a.max() > 255 else 1.0
    a = np.nan_to_num(a * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


_SRGB = None


def _in_srgb(img: Image.Image) -> Image.Image:
    """``img`` converted from its embedded ICC colour profile to sRGB (RGB, RGBA and CMYK pictures); as
    it is when it has none, when the profile is sRGB already (most photos: nothing to do), or when the
    profile cannot be used (the numbers are then read as sRGB, as a browser that cannot parse it does)."""
    global _SRGB
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(src).lower():
            return img
        if _SRGB is None:
            _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        out = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return img
    out.info.pop("icc_profile", None)  # converted: never again
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB, the way every picture is read (files, uploads, PIL pictures handed to encoders):
    in sRGB (``_in_srgb``); transparent and translucent pixels (an alpha channel, a palette with alpha,
    or a transparent colour key: Pillow's ``has_transparency_data``) laid on white; wide greyscale
    scaled to 8 bits (``_wide_grey_to_l``); at most READ_MAX_SIDE pixels on the longer side. ``img``
    itself is never changed."""
    img = _in_srgb(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        out = _wide_grey_to_l(img).convert("RGB")
    elif img.has_transparency_data:
        out = Image.new("RGBA", img.size, (255, 255, 255, 255))
        out.alpha_composite(img.convert("RGBA"))
        out = out.convert("RGB")
    else:
        out = img if img.mode == "RGB" else img.convert("RGB")
    w, h = out.size
    if READ_MAX_SIDE and max(w, h) > READ_MAX_SIDE:
        s = READ_MAX_SIDE / max(w, h)
        out = out.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS, reducing_gap=3.0)
    return out


class ImageError(UserError):
    """An image could not be used; the message is the reason shown to the user."""


def describe(ref: ImageRef) -> str:
    return f"<{len(ref)} embedded bytes>" if isinstance(ref, (bytes, bytearray)) else str(ref)


def resolve_path(ref: str, base_dir: Path | None) -> Path | None:
    """The local path a reference points to, or None for http(s) URLs."""
    if ref.startswith(("http://", "https://")):
        return None
    if ref.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(ref).path))
    p = Path(ref)
    return p if p.is_absolute() or base_dir is None else base_dir / p


# failures a server or network recovers from: the answer says so, and the indexer embeds the item again on
# its next run (a product is never left without a photo because a CDN hiccuped once)
TRANSIENT = "temporary: the next index run tries again"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
RETRY_WAITS = (0.2, 0.6)  # seconds before the 2nd and 3rd try of a quick failure (status above, reset, refused)


def is_transient(reason: str) -> bool:
    """Whether a problem's reason (an ImageError's message) is one that can pass by itself."""
    return reason.endswith(f"({TRANSIENT})")


def _fetch(ref: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``ref``; a retryable status, a refused or reset connection is tried up to 3 times. A timeout is
    not tried again here (each costs ``timeout``), only flagged temporary."""
    waits = list(RETRY_WAITS)
    while True:
        try:
            req = urllib.request.Request(ref, headers={"User-Agent": "moonsearch"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS:
                raise ImageError(f"unreachable URL {ref}: HTTP {e.code}") from None
            why, quick = f"HTTP {e.code}", True
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            why, quick = str(reason), isinstance(reason, ConnectionError)
        if not (quick and waits):
            raise ImageError(f"unreachable URL {ref}: {why} ({TRANSIENT})")
        time.sleep(waits.pop(0))


def read_bytes(ref: ImageRef, base_dir: Path | None = None, timeout: float = 10.0,
               max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    path = resolve_path(ref, base_dir)
    if path is None:
        data = _fetch(ref, timeout, max_bytes)
        if len(data) > max_bytes:
            raise ImageError(f"URL {ref} is larger than {max_bytes} bytes")
        return data
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"missing image file {path}") from None
    except OSError as e:
        raise ImageError(f"unreadable image file {path}: {e.strerror or e}") from None


# major brands of the ISO base media "ftyp" box that mark a HEIF picture (HEIC: HEVC-coded, iPhones' default)
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


# an SVG has no pixels: it is drawn SVG_SIDE x SVG_SIDE (its drawing centred, aspect kept, on white), as
# the real-artwork check draws its vendors' SVGs for the towers
SVG_SIDE = 512


def _is_svg(data: bytes) -> bool:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!--", b"<!doctype")) and b"<svg" in head)


def _render_svg(data: bytes, what: str) -> Image.Image:
    """An SVG drawn by cairosvg with nothing fetched: no files, URLs or XML entities (a catalog's SVG
    must not make the indexer read the disk or the network)."""
    from cairosvg.surface import PNGSurface

    def refuse(url, resource_type):
        raise ImageError(f"{what}: the SVG refers to {url}; external resources are not fetched")

    try:  # svg2png's own signature has no url_fetcher; the surface passes it on to the parser
        png = PNGSurface.convert(bytestring=data, unsafe=False, url_fetcher=refuse, output_width=SVG_SIDE,
                                 output_height=SVG_SIDE)
    except ImageError:
        raise
    except Exception as e:  # cairosvg raises assorted errors on broken or hostile files
        raise ImageError(f"{what}: corrupt SVG ({type(e).__name__}: {e})") from None
    return Image.open(io.BytesIO(png))


def _open(data: bytes, what: str) -> Image.Image:
    """Image.open, plus SVG (drawn, ``_render_svg``) and HEIF: pillow-heif's opener is registered the
    first time such a file is met (its import costs more than the check), so an iPhone's HEIC photo
    reads like a JPEG."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        if _is_svg(data):
            return _render_svg(data, what)
        if data[4:8] != b"ftyp" or data[8:12] not in HEIF_BRANDS:
            raise
    try:
        import pillow_heif
    except ImportError:
        raise ImageError(f"{what}: a HEIC / HEIF photo; install pillow-heif to read it (pip install pillow-heif)") \
            from None
    pillow_heif.register_heif_opener()
    return Image.open(io.BytesIO(data))


def decode(data: bytes, what: str = "image") -> Image.Image:
    """Fully decode ``data`` to an upright RGB image (see RGB_READING) at most READ_MAX_SIDE pixels on its
    longer side, rejecting corrupt, truncated and bomb images."""
    if not data:
        raise ImageError(f"{what}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(data, what)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{what}: decompression bomb ({w}x{h} pixels > {MAX_PIXELS})")
            cap = READ_MAX_SIDE
            if cap and max(w, h) > cap:  # JPEG decodes at 1/2, 1/4 or 1/8 scale, still at least this size
                s = cap / max(w, h)
                img.draft(None, (max(1, round(w * s)), max(1, round(h * s))))
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what}: decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{what}: corrupt or not an image") from None
    except OSError as e:
        msg = str(e)
        kind = "truncated" if "truncated" in msg else "corrupt"
        raise ImageError(f"{what}: {kind} image ({msg})") from None
    except Exception as e:  # Pillow raises assorted errors on hostile files
        raise ImageError(f"{what}: corrupt image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def load_image(ref: ImageRef, base_dir: Path | None = None, timeout: float = 10.0) -> Image.Image:
    return decode(read_bytes(ref, base_dir, timeout), describe(ref))


def load_images(refs, base_dir: Path | None = None, timeout: float = 10.0, load=None
                ) -> tuple[list[Image.Image], list[tuple[int, str]]]:
    """Every image of a record that loads, and ``(position, reason)`` for each that does not: the one
    place where an item's images are loaded, so no caller drops a bad image without saying so.
    ``load(ref)`` replaces the default loader (e.g. a caching one)."""
    images, problems = [], []
    for i, ref in enumerate(refs):
        try:
            images.append(load(ref) if load else load_image(ref, base_dir, timeout))
        except ImageError as e:
            problems.append((i, str(e)))
    return images, problems


def url_version(ref: str, timeout: float = 10.0) -> str:
    """What a HEAD request says of the picture behind ``ref`` (ETag, Last-Modified, Content-Length), so a
    picture replaced at the same address can be told apart; "" when the server says nothing of use or
    does not answer (the GET that loads it reports that)."""
    try:
        req = urllib.request.Request(ref, method="HEAD", headers={"User-Agent": "moonsearch"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            seen = [resp.headers.get(k, "") for k in ("ETag", "Last-Modified", "Content-Length")]
    except (urllib.error.URLError, TimeoutError, OSError, ValueError):
        return ""
    return "|".join(seen) if any(seen) else ""


def fingerprint(ref: ImageRef, base_dir: Path | None = None, versions: dict[str, str] | None = None) -> str:
    """A cheap identity for caching: path + size + mtime for files, a hash of bytes, the URL; with
    ``versions`` (URL -> ``url_version``) the URL and what its server says of the picture."""
    if isinstance(ref, (bytes, bytearray)):
        return "sha1:" + hashlib.sha1(ref).hexdigest()
    path = resolve_path(ref, base_dir)
    if path is None:
        version = (versions or {}).get(ref)
        return f"{ref}#{version}" if version else ref
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{path}:missing"


_CONTENT_KEYS: dict[int, str] = {}  # id(image) -> key, dropped when the image is garbage-collected


def content_key(im: Image.Image) -> str:
    """md5 of a decoded image's pixels: the key of per-image caches (crop boxes, frozen vision
    features). Computed once per image object, so callers on the hot path share the work."""
    key = _CONTENT_KEYS.get(id(im))  # (PIL images are unhashable, so not a WeakKeyDictionary)
    if key is None:
        key = hashlib.md5(im.tobytes()).hexdigest()
        _CONTENT_KEYS[id(im)] = key
        weakref.finalize(im, _CONTENT_KEYS.pop, id(im), None)
    return key
