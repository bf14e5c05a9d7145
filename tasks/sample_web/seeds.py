"""One random stream per item of the sample web, so adding items never changes the others."""

from __future__ import annotations

import random


def item_rng(seed: int, *parts: object) -> random.Random:
    """The stream of one item, e.g. `item_rng(seed, "scene", 17)`: the same in every process."""
    return random.Random("/".join(map(str, (seed, *parts))))
