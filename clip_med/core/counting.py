"""Merging counts by kind (read errors per worker, per rank, per shard) with :class:`collections.Counter`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """The sum of several ``kind -> count`` mappings, kinds in first-seen order (zeros kept).

    ``merge_counts(*parts)`` for an iterable of mappings; ``merge_counts()`` is ``{}``.
    """
    total: Counter[str] = Counter()
    for part in counts:
        total.update(part)
    return dict(total)

