"""Exponential backoff with full jitter (the AWS architecture blog's recommendation): the delay
is uniform in [0, min(max, initial * multiplier**(attempt-1))], so retries of many events spread
out instead of hitting a recovering broker in waves."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    maximum: float
    multiplier: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry number `attempt` (1-based)."""
        exponent = max(attempt - 1, 0)
        try:
            # (A float power: an int multiplier would build a huge integer for a late attempt.)
            grown = self.initial * float(self.multiplier) ** exponent
        except OverflowError:  # past any float, so past the maximum
            return self.maximum
        return min(self.maximum, grown)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))
