"""Query understanding from the catalog itself: a gazetteer of attribute values and category names.

``Gazetteer.from_parts(readings_of(c) for each category c)`` collects every attribute value (per key) and
every category path segment of the indexed catalog. ``parse(query)`` finds them in the query (whole values, matched on folded
and stemmed words, longest first), with a few spelling synonyms for values the catalog has ("gray" finds
"grey"). A value that is found exactly and has one reading (one key, not also a category or a brand) is
a FILTER: hits that carry it come first. A word with several readings (a colour that is also a brand)
is a BOOST for each reading. Hits are ordered by how many filter values they carry (all first), then by
boost values, then by score. Short values (one or two characters, like sizes "S" / "M") only count after
the word "size", so "levi's" never means size S. Tokens with digits that no value explains ("P0001429",
"x200") are CODES: the lexical ranking leads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from moonsearch.index.lexical import fold, stem, words

# spelling variants -> the canonical form, used only when the canonical form is a catalog value
SYNONYMS = {"gray": "grey", "colour": "color", "jumper": "sweater", "trainers": "sneakers", "sneaker": "sneakers",
            "tshirt": "t shirt", "tee": "t shirt", "purse": "handbag", "cellphone": "smartphone",
            "mobile": "smartphone", "sofa": "couch", "fuchsia": "pink", "violet": "purple"}
MAX_WORDS = 4


@dataclass
class Reading:
    key: str  # attribute key, or "category"
    value: str  # the catalog's own spelling (a category: "a > b > c")
    words: tuple[str, ...]


@dataclass
class Understood:
    filters: dict[str, str] = field(default_factory=dict)  # key -> value (category: path)
    boosts: list[tuple[str, str]] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    _want: list | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out: dict = dict(self.filters)
        if self.boosts:
            out["boost"] = [f"{k}={v}" for k, v in self.boosts]
        if self.codes:
            out["codes"] = list(self.codes)
        return out

    def line(self) -> str:
        parts = [f"{k}={v}" for k, v in self.filters.items()]
        parts += [f"{k}~{v} (boost)" for k, v in self.boosts]
        parts += [f"code {c}" for c in self.codes]
        return ", ".join(parts)

    def __bool__(self) -> bool:
        return bool(self.filters or self.boosts or self.codes)

    def matches(self, category: list[str], attributes: dict) -> tuple[int, int]:
        """(how many filter values it carries, how many boost values): hits with every filter value rank
        first, then those with most of them (a filter that nothing satisfies whole degrades gracefully)."""
        wanted = self._wanted()
        path = None

        def has(key, want):
            nonlocal path
            if key == "category":
                if path is None:
                    path = [fold(c) for c in category]
                return path[:len(want)] == want
            return fold(str(attributes.get(key, ""))) == want

        return sum(has(k, w) for k, w in wanted[0]), sum(has(k, w) for k, w in wanted[1])

    def _wanted(self) -> list[list[tuple[str, object]]]:
        """[filters, boosts] as (key, folded value; a category as its folded path), folded once per query."""
        if self._want is None:
            self._want = [[(k, [fold(c) for c in v.split(" > ")] if k == "category" else fold(v)) for k, v in group]
                          for group in (list(self.filters.items()), list(self.boosts))]
        return self._want

    def carries_filters(self, category: list[str], attributes: dict) -> bool:
        """Whether a hit carries every filter value (``matches(...)[0] == len(filters)``, stopping at the
        first value it lacks: the filtered rankings ask this of every candidate they widen over)."""
        for key, want in self._wanted()[0]:
            if key == "category":
                if [fold(c) for c in category[:len(want)]] != want:
                    return False
            elif fold(str(attributes.get(key, ""))) != want:
                return False
        return True


def _stem_words(ws) -> tuple[str, ...]:
    return tuple(stem(ws))


class Gazetteer:
    def __init__(self, readings: list[Reading]):
        self.by_words: dict[tuple[str, ...], list[Reading]] = {}
        for r in readings:
            key = _stem_words(r.words)
            if key and all(x.key != r.key or x.value != r.value for x in self.by_words.get(key, [])):
                self.by_words.setdefault(key, []).append(r)

    @classmethod
    def from_parts(cls, parts: Iterable[list[Reading]]) -> "Gazetteer":
        """From each category's readings (``readings_of``), in category order; a reading that several
        categories hold counts once (a search router merges its shards' parts in the manifest's order)."""
        readings: list[Reading] = []
        seen = set()
        for part in parts:
            for r in part:
                k = (r.key, r.value)
                if k not in seen:
                    seen.add(k)
                    readings.append(r)
        # a category segment that appears under several parents ("accessories > bags" only once, but
        # "tops" could be twice): several readings of the same words, so a boost, not a filter
        return cls(readings)

    def parse(self, query: str) -> Understood:
        ws = words(query)
        ws = [w for x in ws for w in SYNONYMS.get(x, x).split()]
        stems = list(_stem_words(ws))
        out = Understood()
        used = [False] * len(ws)
        for n in range(min(MAX_WORDS, len(ws)), 0, -1):
            for i in range(len(ws) - n + 1):
                if any(used[i:i + n]):
                    continue
                found = self.by_words.get(tuple(stems[i:i + n]))
                if not found:
                    continue
                if sum(len(w) for w in ws[i:i + n]) <= 2 and not (i > 0 and ws[i - 1] == "size"):
                    continue  # "s", "m", "xl": only after "size"
                for j in range(i, i + n):
                    used[j] = True
                if i > 0 and ws[i - 1] == "size" and len(found) > 1:
                    found = [r for r in found if r.key == "size"] or found
                if len(found) == 1 and found[0].key not in out.filters:
                    out.filters[found[0].key] = found[0].value
                else:
                    out.boosts += [(r.key, r.value) for r in found]
        for w, u in zip(ws, used):
            if not u and any(ch.isdigit() for ch in w) and len(w) >= 3:
                out.codes.append(w)
        return out


def describe(understood: dict) -> str:
    """One line for people: 'colour=red, category=apparel > shoes > sneakers (filters); brand~orange (boost)'."""
    boosts, codes = understood.get("boost", []), understood.get("codes", [])
    filters = [f"{k}={v}" for k, v in understood.items() if k not in ("boost", "codes")]
    parts = []
    if filters:
        parts.append(", ".join(filters) + " (filter)")
    if boosts:
        parts.append(", ".join(b.replace("=", "~") for b in boosts) + " (boost)")
    if codes:
        parts.append("codes " + ", ".join(codes) + " (lexical first)")
    return "; ".join(parts)


def readings_of(c) -> list[Reading]:
    """One category index's readings: its path's prefixes and its items' attribute values (first seen
    first, each once)."""
    out: list[Reading] = []
    seen = set()
    path = list(c.infos["category"])
    for depth in range(1, len(path) + 1):
        k = ("category", " > ".join(path[:depth]))
        if k not in seen:
            seen.add(k)
            out.append(Reading("category", k[1], tuple(words(path[depth - 1]))))
    for a in c.meta.column("attributes").to_pylist():
        for key, v in json.loads(a or "{}").items():
            k = (key, str(v))
            if k not in seen and words(str(v)):
                seen.add(k)
                out.append(Reading(key, str(v), tuple(words(str(v)))))
    return out
