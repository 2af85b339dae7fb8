"""Transfer or recompute? A prediction from measured rates.

    transfer_s  = latency + bytes / bandwidth
    recompute_s = tokens / prefill_rate

Both rates are exponential moving averages of what this node measured (its
own fetches; its engine's prefill steps), seeded with conservative defaults
so that the first decisions are sane before anything was measured. A fetch
is made when ``transfer_s * margin < recompute_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seeds: a modest network and a modest CPU prefill rate.
DEFAULT_BANDWIDTH_BYTES_PER_S = 100e6
DEFAULT_LATENCY_S = 0.002
DEFAULT_PREFILL_TOKENS_PER_S = 2_000.0
# Below this many bytes a fetch's duration is mostly latency.
LATENCY_PROBE_BYTES = 64 << 10


@dataclass(slots=True)
class Decision:
    transfer: bool
    predicted_transfer_s: float
    predicted_recompute_s: float


@dataclass(slots=True)
class TransferPolicy:
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S
    latency_s: float = DEFAULT_LATENCY_S
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    # >1 demands a clear win before moving bytes (a fetch can still fail and cost its time).
    margin: float = 1.2
    alpha: float = 0.3
    num_transfer_samples: int = 0
    num_prefill_samples: int = 0

    def predict_transfer_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s

    def predict_recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def decide(self, num_tokens: int, num_bytes: int) -> Decision:
        t = self.predict_transfer_s(num_bytes)
        r = self.predict_recompute_s(num_tokens)
        return Decision(num_tokens > 0 and t * self.margin < r, t, r)

    def _ema(self, old: float, new: float, num_samples: int) -> float:
        # The first sample replaces the seed outright: a measurement beats a guess.
        return new if num_samples == 0 else (1 - self.alpha) * old + self.alpha * new

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        """A completed fetch of ``num_bytes`` that took ``seconds`` end to end."""
        if seconds <= 0:
            return
        if num_bytes < LATENCY_PROBE_BYTES:
            self.latency_s = (1 - self.alpha) * self.latency_s + self.alpha * seconds
            return
        payload_s = max(seconds - self.latency_s, seconds * 0.5)
        self.bandwidth_bytes_per_s = self._ema(self.bandwidth_bytes_per_s, num_bytes / payload_s,
                                               self.num_transfer_samples)
        self.num_transfer_samples += 1

    def observe_prefill_rate(self, tokens_per_s: float) -> None:
        """The engine's measured prefill throughput (0 = not measured yet: ignored)."""
        if tokens_per_s > 0:
            self.prefill_tokens_per_s = self._ema(self.prefill_tokens_per_s, tokens_per_s,
                                                  self.num_prefill_samples)
            self.num_prefill_samples += 1
