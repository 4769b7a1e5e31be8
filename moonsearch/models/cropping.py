"""What encoders need from core-product cropping, without depending on how it is done.

The interface (``Cropper``: ``box(image, title) -> Box``, optionally ``boxes(images)``), the ``crop``
of a box, and a registry that the implementations in ``moonsearch.vision`` fill when the package is
imported (``moonsearch/__init__.py``). Encoders ask the registry by the name in their config, so
``models/`` never imports ``vision/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from PIL import Image

from moonsearch.errors import UserError

Box = tuple[int, int, int, int]


class Cropper(Protocol):
    name: str

    def box(self, image: Image.Image, title: str = "") -> Box: ...


def crop(image: Image.Image, box: Box, pad: float = 0.05) -> Image.Image:
    """The box widened by ``pad`` of its size on each side, clipped to the image."""
    w, h = image.size
    x0, y0, x1, y1 = box
    px, py = (x1 - x0) * pad, (y1 - y0) * pad
    b = (max(0, int(x0 - px)), max(0, int(y0 - py)), min(w, int(x1 + px)), min(h, int(y1 + py)))
    return image.crop(b)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Cropper]  # factory(source: str = "", device: str = "cpu")
    fingerprint: Callable[[], bytes]  # what of the cropper's own weights changes its boxes
    needs_source: bool = False


_CROPPERS: dict[str, _Entry] = {}


def register_cropper(name: str, factory: Callable[..., Cropper], fingerprint: Callable[[], bytes] = lambda: b"",
                     needs_source: bool = False) -> None:
    _CROPPERS[name] = _Entry(factory, fingerprint, needs_source)


def cropper_names(offline: bool = False) -> list[str]:
    """Registered croppers; ``offline``: only those that need no model source."""
    return [n for n, e in _CROPPERS.items() if not (offline and e.needs_source)]


def make_cropper(name: str, source: str = "", device: str = "cpu") -> Cropper:
    """The cropper a config names; ``source`` is the model a grounding cropper asks (hub id or folder)."""
    if name not in _CROPPERS:
        raise UserError(f"cropper {name!r}: expected one of {', '.join(_CROPPERS)}")
    entry = _CROPPERS[name]
    if entry.needs_source and not source:
        raise UserError(f"cropper {name!r} asks a Qwen2-VL / Qwen2.5-VL model for the box: set grounding_source "
                        "to its hub id or local folder (or use backbone qwen-vl, whose source it then shares)")
    return entry.factory(source, device) if entry.needs_source else entry.factory()


def cropper_fingerprint(name: str) -> bytes:
    return _CROPPERS[name].fingerprint() if name in _CROPPERS else b""
