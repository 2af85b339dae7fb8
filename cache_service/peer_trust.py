"""Integrity beyond the sender's word: which fetched runs to verify by recomputation, and which peers to avoid.

Every structural check an import makes (hash chain, tokens, checksum, header) is one the sender can
satisfy: a member with a bug (or worse) can send well-formed blocks of wrong values. The fetcher
(``prefix_fetcher.py``) therefore recomputes one block of some imported runs (``EnginePort.verify_block``)
and asks this class which runs, and whom it may still fetch from:

    should_verify(peer)   before keeping a run: the peer's first ``verify_first`` fetches (counted again
                          from zero after every quarantine, so a peer coming back is checked first), and then
                          one fetch in ``sample_every``, chosen by a keyed hash of (peer, fetch number):
                          deterministic for a given key (tests are exact), unpredictable to the peer
    record(peer, ok)      one fetch from ``peer`` kept or dropped: ok True / False (verified), None (not)
    may_fetch(peer, now)  False while the peer is quarantined

    a failed verification -> quarantine: no fetch for quarantine_s, doubled on every later failure
                             (capped at max_quarantine_s); the failure count is never forgiven

State is per peer id, in memory, bounded (``max_peers``: the least recently seen peer that is not
quarantined is forgotten first). Pure: no I/O, an injectable clock, tested without engines
(``tests/test_peer_trust.py``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple


class VerifyResult(NamedTuple):
    """One block recomputed by the importer and compared with the imported copy (``EnginePort.verify_block``).

    The comparison is per (layer, K|V) slice of the block: ``max_abs_diff`` and ``tolerance`` are those of the
    slice that came closest to (or furthest past) its tolerance, ``scale`` that slice's largest recomputed
    magnitude (so ``max_abs_diff / scale`` is the relative figure tolerances are chosen on).
    """

    ok: bool
    max_abs_diff: float
    tolerance: float
    scale: float
    block_index: int

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / self.scale if self.scale else float("inf")


@dataclass(slots=True)
class TrustConfig:
    verify_first: int = 2  # fetches verified after a peer is first seen and after each quarantine
    sample_every: int = 16  # then one fetch in this many (1: every fetch; 0: none)
    quarantine_s: float = 600.0  # the first quarantine; each later one is twice the previous
    max_quarantine_s: float = 24 * 3600.0
    max_peers: int = 4096  # peers remembered (a bound, like every table of the node)
    # Keys the sampling hash. Random per process by default, so a peer cannot tell which of its fetches
    # will be checked; tests pass a fixed key.
    sample_key: bytes = field(default_factory=lambda: os.urandom(16))


@dataclass(slots=True)
class PeerRecord:
    num_fetches: int = 0  # kept or dropped runs fetched from this peer, all time (the sampling's counter)
    num_since_quarantine: int = 0  # verified fetches since it was first seen or last released
    num_verifications: int = 0
    num_failures: int = 0
    quarantined_until: float | None = None


class PeerTrust:
    def __init__(self, config: TrustConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or TrustConfig()
        self.clock = clock
        self._peers: OrderedDict[str, PeerRecord] = OrderedDict()  # least recently seen first
        self.num_quarantines = 0  # quarantines started, all peers

    # ---- queries -----------------------------------------------------------------------------------------
    def may_fetch(self, peer: str, now: float | None = None) -> bool:
        rec = self._peers.get(peer)
        if rec is None or rec.quarantined_until is None:
            return True
        return (self.clock() if now is None else now) >= rec.quarantined_until

    def should_verify(self, peer: str) -> bool:
        """Whether the next run fetched from ``peer`` must be verified before it is kept."""
        cfg = self.config
        rec = self._peers.get(peer)
        if rec is None:
            return cfg.verify_first > 0 or self.sampled(peer, 0)
        return rec.num_since_quarantine < cfg.verify_first or self.sampled(peer, rec.num_fetches)

    def sampled(self, peer: str, fetch_number: int) -> bool:
        """The sampling draw of ``peer``'s fetch number ``fetch_number`` (0-based): one in ``sample_every``."""
        every = self.config.sample_every
        if every <= 1:
            return every == 1
        digest = hashlib.blake2b(f"{peer}\x00{fetch_number}".encode("utf-8", "surrogatepass"), digest_size=8,
                                 key=self.config.sample_key[:64]).digest()
        return int.from_bytes(digest, "little") % every == 0

    def quarantined(self, now: float | None = None) -> list[str]:
        """Peers quarantined at ``now``, sorted."""
        t = self.clock() if now is None else now
        return sorted(p for p, r in self._peers.items() if r.quarantined_until is not None and t < r.quarantined_until)

    def peer(self, peer: str) -> PeerRecord | None:
        return self._peers.get(peer)

    # ---- updates ---------------------------------------------------------------------------------------------
    def record(self, peer: str, ok: bool | None) -> float | None:
        """One run fetched from ``peer``: verified and kept (True), verified and dropped (False), or kept
        unverified (None). Returns the quarantine's end when this record started one, else None."""
        rec = self._touch(peer)
        rec.num_fetches += 1
        if ok is None:
            return None
        rec.num_verifications += 1
        if ok:
            rec.num_since_quarantine += 1
            return None
        rec.num_failures += 1
        cfg = self.config
        seconds = min(cfg.max_quarantine_s, cfg.quarantine_s * 2.0 ** (rec.num_failures - 1))
        rec.quarantined_until = self.clock() + seconds
        rec.num_since_quarantine = 0  # back on probation once released
        self.num_quarantines += 1
        return rec.quarantined_until

    def _touch(self, peer: str) -> PeerRecord:
        rec = self._peers.get(peer)
        if rec is not None:
            self._peers.move_to_end(peer)
            return rec
        if len(self._peers) >= self.config.max_peers:
            self._forget_one()
        rec = self._peers[peer] = PeerRecord()
        return rec

    def _forget_one(self) -> None:
        """Drop the least recently seen peer that is not quarantined now (a quarantine is never forgotten
        early); when every one is, the one released soonest."""
        now = self.clock()
        for p, r in self._peers.items():
            if r.quarantined_until is None or r.quarantined_until <= now:
                del self._peers[p]
                return
        soonest = min(self._peers, key=lambda p: self._peers[p].quarantined_until or 0.0)
        del self._peers[soonest]
