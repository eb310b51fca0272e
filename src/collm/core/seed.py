"""The one range of seeds every stage accepts: numpy's (accelerate's set_seed and mathematics_dataset seed it),
the narrowest of the generators collm seeds; torch's and Python's accept all of it."""

from __future__ import annotations

from collm.errors import CollmError

MAX_SEED = 2**32 - 1


def check_seed(seed) -> int:
    """``seed`` if it is an integer in [0, MAX_SEED]; CollmError otherwise (a huge one overflowed inside torch)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise CollmError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed
