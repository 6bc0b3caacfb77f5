"""Named, independent random streams derived from one seed."""

from __future__ import annotations

import hashlib


def derived_seed(stream: str, seed: int) -> int:
    """A 32-bit seed for the random stream ``stream`` of run seed ``seed``.

    Streams with different names never share values the way ``seed + offset`` schemes
    do (e.g. client 1009 of round 1 and client 0 of round 2).

    Parameters
    ----------
    stream : str
        What the randomness is for, e.g. ``"head"`` or ``"train:3:17"``.
    seed : int
        The run's seed.
    """
    return int.from_bytes(hashlib.sha256(f"{stream}:{seed}".encode()).digest()[:4], "little")
