"""The synthetic product world's vocabulary: category tree, attributes and how they look or read.

Visual attributes (colour, pattern, material, style) change the picture; text-only ones (brand, size)
live in the title and attributes alone, so a model must read text to find them.
"""
from __future__ import annotations

from dataclasses import dataclass

# leaf name -> (path root first, title nouns (first is canonical), two style names)
LEAVES: dict[str, tuple[tuple[str, str, str], tuple[str, ...], tuple[str, str]]] = {
    "sneakers": (("apparel", "shoes", "sneakers"), ("sneakers", "trainers", "running shoes"), ("low-top", "high-top")),
    "boots": (("apparel", "shoes", "boots"), ("boots", "ankle boots", "booties"), ("ankle", "knee-high")),
    "sandals": (("apparel", "shoes", "sandals"), ("sandals", "slides", "flip flops"), ("two-strap", "three-strap")),
    "t-shirts": (("apparel", "tops", "t-shirts"), ("t-shirt", "tee", "shirt"), ("crew-neck", "v-neck")),
    "hoodies": (("apparel", "tops", "hoodies"), ("hoodie", "sweatshirt", "hooded jumper"), ("pullover", "zip-up")),
    "jeans": (("apparel", "bottoms", "jeans"), ("jeans", "denim pants", "trousers"), ("straight", "flared")),
    "skirts": (("apparel", "bottoms", "skirts"), ("skirt", "midi skirt", "mini skirt"), ("pencil", "a-line")),
    "caps": (("apparel", "headwear", "caps"), ("cap", "baseball cap", "hat"), ("curved-brim", "flat-brim")),
    "backpacks": (("accessories", "bags", "backpacks"), ("backpack", "rucksack", "school bag"), ("classic", "two-compartment")),
    "handbags": (("accessories", "bags", "handbags"), ("handbag", "tote bag", "purse"), ("top-handle", "shoulder")),
    "sunglasses": (("accessories", "eyewear", "sunglasses"), ("sunglasses", "shades", "sunnies"), ("square", "round")),
    "watches": (("accessories", "watches", "wristwatches"), ("watch", "wristwatch", "timepiece"), ("round-face", "square-face")),
    "mugs": (("home", "kitchen", "mugs"), ("mug", "coffee mug", "cup"), ("short", "tall")),
    "teapots": (("home", "kitchen", "teapots"), ("teapot", "tea kettle", "tea pot"), ("plain", "banded")),
    "bottles": (("home", "kitchen", "bottles"), ("water bottle", "bottle", "flask"), ("slim", "wide")),
    "plates": (("home", "kitchen", "plates"), ("plate", "dinner plate", "dish"), ("plain-rim", "double-rim")),
    "lamps": (("home", "decor", "lamps"), ("table lamp", "lamp", "desk lamp"), ("tapered-shade", "drum-shade")),
    "wall clocks": (("home", "decor", "wall clocks"), ("wall clock", "clock", "kitchen clock"), ("round", "square")),
    "vases": (("home", "decor", "vases"), ("vase", "flower vase", "jar"), ("slim", "bulbous")),
    "chairs": (("home", "furniture", "chairs"), ("chair", "dining chair", "seat"), ("high-back", "low-back")),
    "tables": (("home", "furniture", "tables"), ("table", "dining table", "coffee table"), ("rectangular", "oval")),
    "laptops": (("electronics", "computers", "laptops"), ("laptop", "notebook computer", "notebook"), ("dark-screen", "light-screen")),
    "keyboards": (("electronics", "computers", "keyboards"), ("keyboard", "computer keyboard", "mechanical keyboard"), ("full-size", "compact")),
    "headphones": (("electronics", "audio", "headphones"), ("headphones", "headset", "over-ear headphones"), ("round-cup", "square-cup")),
    "speakers": (("electronics", "audio", "speakers"), ("speaker", "bluetooth speaker", "loudspeaker"), ("boxy", "rounded")),
    "smartphones": (("electronics", "phones", "smartphones"), ("smartphone", "phone", "mobile phone"), ("classic", "notch")),
    "cameras": (("electronics", "cameras", "cameras"), ("camera", "digital camera", "mirrorless camera"), ("wide-lens", "compact-lens")),
}

# colour -> (rgb, synonyms used in titles and queries)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((205, 35, 40), ("red", "scarlet")),
    "blue": ((35, 80, 200), ("blue", "royal blue")),
    "navy": ((20, 30, 80), ("navy", "dark blue")),
    "green": ((40, 150, 60), ("green", "emerald")),
    "yellow": ((240, 210, 40), ("yellow", "lemon")),
    "orange": ((240, 130, 30), ("orange", "tangerine")),
    "pink": ((240, 130, 180), ("pink", "rose")),
    "purple": ((120, 50, 160), ("purple", "violet")),
    "black": ((25, 25, 25), ("black", "jet black")),
    "white": ((240, 240, 240), ("white", "snow white")),
    "grey": ((130, 130, 135), ("grey", "gray")),
    "brown": ((120, 75, 40), ("brown", "chocolate")),
}
PATTERNS = ("solid", "striped", "dotted", "checked")
MATERIALS = {
    "apparel": ("cotton", "leather", "knit", "denim"),
    "accessories": ("leather", "canvas", "metal", "plastic"),
    "home": ("ceramic", "wood", "glass", "metal"),
    "electronics": ("plastic", "metal", "matte", "glossy"),
}
SIZES = {
    "apparel": ("S", "M", "L", "XL"),
    "accessories": ("small", "medium", "large"),
    "home": ("250ml", "500ml", "1l", "family size"),
    "electronics": ("64GB", "128GB", "256GB", "standard"),
}
BRANDS = ("acme", "nordlys", "kestrel", "velora", "tamarind", "orbitex", "lumen", "brightwell", "quill",
          "zephyra", "halden", "mosaic", "pinecrest", "solenne", "tundra", "arcadia")
MARKETING = ("new", "2026", "hot sale", "premium", "best seller", "free shipping", "official store",
             "limited edition", "trendy", "classic")
PROMO_TEXTS = ("SALE", "-50%", "HOT", "NEW", "FREE SHIPPING", "BUY 1 GET 1", "TOP", "2026")


@dataclass(frozen=True)
class ProductSpec:
    """Everything that decides how a product looks and reads."""

    item_id: str
    group_id: str
    leaf: str
    colour: str
    pattern: str
    material: str
    style: int
    brand: str
    size: str

    @property
    def path(self) -> list[str]:
        return list(LEAVES[self.leaf][0])

    @property
    def top(self) -> str:
        return LEAVES[self.leaf][0][0]

    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "pattern": self.pattern, "material": self.material,
                "style": LEAVES[self.leaf][2][self.style], "brand": self.brand, "size": self.size}
