"""moonsearch: multimodal product search (MOON encoders + per-category FAISS indices)."""

# the core-product croppers register themselves with moonsearch.models.cropping (models never import vision)
from moonsearch.vision import croppers as _croppers  # noqa: E402,F401
