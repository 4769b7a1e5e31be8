"""Fill a keyed cache for a batch: compute only the missing keys, each once, in one call."""
from __future__ import annotations

from typing import Callable, Sequence


def fill_missing(cache: dict, keys: Sequence, items: Sequence, compute: Callable[[list], Sequence]) -> list:
    """``cache[k]`` for every key, after ``compute([item, ...])`` ran once over the first item of each
    key not yet cached; returns the values in ``keys`` order."""
    first: dict = {}
    for k, item in zip(keys, items):
        if k not in cache and k not in first:
            first[k] = item
    if first:
        for k, v in zip(first, compute(list(first.values()))):
            cache[k] = v
    return [cache[k] for k in keys]
