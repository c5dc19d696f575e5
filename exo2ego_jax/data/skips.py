"""Counted, logged skips: bad inputs that are dropped are never silent (the build summary lists every reason)."""
from __future__ import annotations

import collections
import logging

log = logging.getLogger("exo2ego_jax.data")


class SkipLog:
    """Counts skipped items by reason and logs the first `log_first` of each reason with its detail."""

    def __init__(self, log_first: int = 5):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.log_first = log_first

    def skip(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.log_first:
            self.examples[reason].append(detail)
            log.warning("skipped (%s): %s", reason, detail)

    def merge(self, other: SkipLog) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = self.log_first - len(self.examples[reason])
            self.examples[reason].extend(other.examples[reason][:max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in sorted(self.counts.items())}
