"""The one best-peer choice: which worker holds the longest prefix of a prompt.

Used by the routing policies (which peer a chosen worker should pull from), the router's peer hint, the
simulator (through the policies) and the worker's prefix fetcher (which peer to pull from when it asked
the index itself), so that all of them agree on the same answer for the same matches.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping


def best_peer(
    matches: Mapping[str, int],
    *,
    exclude: str | Collection[str] = (),
    eligible: Collection[str] | None = None,
    more_than: int = 0,
    tie_key: Callable[[str], Any] | None = None,
) -> tuple[str, int] | None:
    """``(worker, blocks)`` for the worker holding the longest prefix, or None when none holds more than
    ``more_than`` blocks.

    ``matches``: worker -> leading blocks of the prompt it holds. ``exclude`` (one id or several) and
    ``eligible`` (None: everyone) filter the candidates. Ties go to the smallest ``tie_key(worker)``
    (default: the worker id itself), so the answer never depends on the order of ``matches``.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    best: str | None = None
    best_len = more_than
    best_key: Any = None
    for wid, n in matches.items():
        if n < best_len or wid in exclude or (eligible is not None and wid not in eligible):
            continue
        if n > best_len or best is None:
            best, best_len, best_key = wid, n, None
            continue
        # A tie with the current best (n == best_len > more_than): the smaller key wins.
        if best_key is None:
            best_key = tie_key(best) if tie_key is not None else best
        key = tie_key(wid) if tie_key is not None else wid
        if key < best_key:
            best, best_key = wid, key
    if best is None or best_len <= more_than:
        return None
    return best, best_len
