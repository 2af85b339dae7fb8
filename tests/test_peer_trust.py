"""PeerTrust: which fetched runs are verified, and how long a peer whose run failed is quarantined. Pure: a
fixed sampling key and a hand-driven clock make every answer exact."""

from __future__ import annotations

from cache_service.peer_trust import PeerTrust, TrustConfig, VerifyResult

KEY = b"test-key"
# The sampling draws of fetch numbers 0..79 under KEY (blake2b keyed by KEY, one in 16).
SAMPLED_A = [22, 35, 36, 54, 66, 75]
SAMPLED_B = [11, 29, 33, 66]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def trust(clock: Clock | None = None, **config) -> PeerTrust:
    return PeerTrust(TrustConfig(**{"sample_key": KEY, **config}), clock=clock or Clock())


def verified_fetches(t: PeerTrust, peer: str, num_fetches: int) -> list[int]:
    """Fetch numbers (0-based) the policy verified among ``peer``'s next ``num_fetches``, all passing."""
    out = []
    for n in range(num_fetches):
        verify = t.should_verify(peer)
        if verify:
            out.append(n)
        t.record(peer, True if verify else None)
    return out


def test_sampling_is_one_in_sixteen_deterministic_per_peer_and_fetch_number():
    t = trust()
    assert [n for n in range(80) if t.sampled("A", n)] == SAMPLED_A
    assert [n for n in range(80) if t.sampled("B", n)] == SAMPLED_B
    assert sum(t.sampled("A", n) for n in range(16_000)) == 1005  # ~1000 expected
    # Another key draws other fetches (a peer cannot know which of its fetches are checked).
    other = trust(sample_key=b"another-key")
    assert [n for n in range(80) if other.sampled("A", n)] != SAMPLED_A
    assert [n for n in range(5) if trust(sample_every=1).sampled("A", n)] == [0, 1, 2, 3, 4]
    assert [n for n in range(5) if trust(sample_every=0).sampled("A", n)] == []


def test_first_fetches_are_verified_then_the_sampled_ones():
    t = trust()
    assert verified_fetches(t, "A", 80) == [0, 1, *SAMPLED_A]
    assert verified_fetches(t, "B", 40) == [0, 1, 11, 29, 33]
    rec = t.peer("A")
    assert rec is not None and (rec.num_fetches, rec.num_verifications, rec.num_failures) == (80, 8, 0)
    # verify_first=0 and sample_every=0: nothing is ever verified.
    off = trust(verify_first=0, sample_every=0)
    assert verified_fetches(off, "A", 40) == []


def test_a_failed_verification_quarantines_doubling_and_is_verified_again_after():
    clock = Clock(1000.0)
    t = trust(clock)
    assert verified_fetches(t, "A", 3) == [0, 1]
    assert t.may_fetch("A") and t.quarantined() == []
    assert t.record("A", False) == 1600.0  # 10 minutes from now
    assert t.num_quarantines == 1
    assert (t.may_fetch("A"), t.may_fetch("A", 1599.9), t.may_fetch("A", 1600.0)) == (False, False, True)
    assert t.may_fetch("B")  # others are not affected
    assert t.quarantined() == ["A"] and t.quarantined(1600.0) == []
    clock.now = 1600.0
    assert t.may_fetch("A")
    # Released: its next verify_first fetches are checked again, whatever the sampling says (fetch
    # numbers 4 and 5 are not sampled), then the sampled ones (22 is).
    assert verified_fetches(t, "A", 19) == [0, 1, 18]  # fetch numbers 4, 5 and 22
    # A second failure: twice as long.
    assert t.record("A", False) == 1600.0 + 1200.0
    clock.now = 2800.0
    assert t.record("A", False) == 2800.0 + 2400.0
    rec = t.peer("A")
    assert rec is not None and (rec.num_failures, rec.num_since_quarantine) == (3, 0)
    assert t.num_quarantines == 3


def test_quarantine_is_capped():
    clock = Clock(0.0)
    t = trust(clock, quarantine_s=10.0, max_quarantine_s=35.0)
    assert [t.record("A", False) for _ in range(4)] == [10.0, 20.0, 35.0, 35.0]


def test_an_unverified_fetch_counts_for_the_sampling_only():
    t = trust()
    t.record("A", None)
    rec = t.peer("A")
    assert rec is not None and (rec.num_fetches, rec.num_verifications, rec.num_since_quarantine) == (1, 0, 0)
    assert t.should_verify("A")  # still one of its first two verified fetches to come


def test_the_peer_table_is_bounded_and_never_forgets_a_quarantine_early():
    clock = Clock(0.0)
    t = trust(clock, max_peers=3)
    t.record("bad", False)  # quarantined until 600
    t.record("p1", True)
    t.record("p2", True)
    t.record("p3", True)  # full: p1, the least recently seen one not quarantined, goes
    assert (t.peer("p1"), t.peer("bad") is not None) == (None, True)
    t.record("p2", True)  # p2 is now the most recently seen
    t.record("p4", True)  # p3 goes
    assert sorted(p for p in ("bad", "p1", "p2", "p3", "p4") if t.peer(p) is not None) == ["bad", "p2", "p4"]
    assert not t.may_fetch("bad")
    # When every remembered peer is quarantined, the one released soonest is forgotten.
    t2 = trust(clock, max_peers=2)
    t2.record("x", False)
    clock.now = 100.0
    t2.record("y", False)
    t2.record("z", True)
    assert (t2.peer("x"), t2.peer("y") is not None, t2.peer("z") is not None) == (None, True, True)


def test_verify_result_relative_diff():
    r = VerifyResult(ok=True, max_abs_diff=0.002, tolerance=0.01, scale=4.0, block_index=3)
    assert r.rel_diff == 0.0005
    assert VerifyResult(False, 1.0, 0.0, 0.0, 0).rel_diff == float("inf")
