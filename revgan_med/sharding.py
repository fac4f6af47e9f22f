"""Job-array splitting (``--shard i/n``) shared by the batch commands; light, so the CLI checks it first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 ≤ i < n) → (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def shard_items(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The `index`-th of `count` contiguous, near-equal slices of `items` (sorted by the caller)."""
    return list(items[len(items) * index // count : len(items) * (index + 1) // count])
