"""Backoff delays, one home for all of them.

Two jitters, on purpose: a replay to an instance takes "full" jitter (many
clients' replays spread over the whole window: no herd on a recovering
instance); a webhook delivery round takes "equal" jitter (at least half the
wait: a target that is down is not hammered early by the luck of the draw).
"""

from __future__ import annotations

import random


def exponential(attempt: int, base: float, cap: float) -> float:
    """``base * 2**attempt`` (``attempt`` counts from 0), at most ``cap``."""
    return min(cap, base * 2.0 ** max(0, attempt))


def full_jitter(delay: float) -> float:
    return random.uniform(0.0, delay)


def equal_jitter(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)


def backoff(attempt: int, base: float, cap: float = 2.0) -> float:
    """Before a replay: full-jitter exponential backoff."""
    return full_jitter(exponential(attempt, base, cap))
