"""Continuous batching: which sequences run in the next forward, and with how many new tokens.

Every step fills one batch under two budgets, ``max_num_batched_tokens`` and ``max_num_seqs``:

  1. running decodes (one token each): latency-critical, so they go first;
  2. running sequences still prefilling (chunked prefill: a long prompt takes one chunk per step);
  3. waiting sequences, front first, each starting from its cached prefix; one whose next block another
     sequence is computing in this very step waits a step to hit it instead of computing it again.

Blocks are allocated lazily, step by step. When a running sequence needs a block and none is free, the most
recently admitted running sequence is preempted (blocks freed: its computed blocks stay cached, so the
recompute is mostly hits) and re-queued at the front of the waiting queue. No new sequence is admitted in
a step that had to preempt. A sequence that cannot fit even alone (pinned blocks took the room) fails with
an error rather than looping forever.

After the forward, ``commit`` turns the plan into computed tokens and cached blocks, and names the sequences
that sample a token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cache_service.block_hash import num_reusable_blocks
from workers.kv_manager import KVManager
from workers.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # finished with an error (no room even alone)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass(slots=True)
class AdmissionStats:
    num_query_tokens: int = 0  # tokens of sequences at their first admission
    num_hit_tokens: int = 0  # of those, served from the prefix cache (every tier)
    num_host_hit_tokens: int = 0  # of the hits, loaded back from host memory
    num_disk_hit_tokens: int = 0  # of the hits, loaded back from disk
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.stats = AdmissionStats()

    # ---- queue management -----------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and give back its blocks (abort / finish)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chosen: dict[int, ScheduledSequence] = {}  # id(seq) -> entry, in scheduling order

        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            if budget == 0:
                break
            while True:
                num_new = min(seq.num_uncomputed_tokens, budget)
                if num_new > 1:
                    # A prefill chunk shrinks to the room there is before anyone is preempted for it.
                    num_new = min(num_new, max(1, self.kv.max_new_tokens(seq)))
                if self.kv.allocate(seq, num_new):
                    chosen[id(seq)] = ScheduledSequence(seq, num_new)
                    budget -= num_new
                    break
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    self._fail(seq, out)  # nothing left to preempt: pins hold the room it needs
                    break
                budget += self._preempt(victim, chosen, out)
                if victim is seq:
                    break

        if not out.preempted:
            budget = self._admit_waiting(budget, chosen, out)

        out.scheduled = list(chosen.values())
        for entry in out.scheduled:
            if entry.num_new_tokens == 1 and entry.seq.num_uncomputed_tokens == 1:
                out.num_decode_tokens += 1
            else:
                out.num_prefill_tokens += entry.num_new_tokens
        return out

    # ---- after the forward ---------------------------------------------------
    def commit(self, scheduled: list[ScheduledSequence]) -> list[tuple[int, Sequence]]:
        """The forward computed the scheduled tokens: count them and cache every block that became full.

        Returns ``(row, seq)`` for each sequence whose tokens are now all computed (row = its index in
        ``scheduled``, which is its row of the batch's logits): exactly those sample a next token. A prefill
        chunk short of the prompt's end samples nothing.
        """
        ready = []
        for row, entry in enumerate(scheduled):
            seq = entry.seq
            seq.num_computed_tokens += entry.num_new_tokens
            self.kv.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append((row, seq))
        return ready

    def _admit_waiting(self, budget: int, chosen: dict[int, ScheduledSequence], out: SchedulerOutput) -> int:
        in_flight = self._blocks_in_flight(chosen.values())
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            hits = self.kv.lookup_prefix(seq)
            num_hit_tokens = len(hits) * self.kv.block_size
            if self._waits_for(seq, len(hits), in_flight):
                deferred.append(seq)
                continue
            num_new = min(seq.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate(seq, num_new, hits):
                if self.running:
                    self.waiting.appendleft(seq)
                    break  # wait for running sequences to finish and give blocks back
                # Alone, it prefills in whatever room there is (pins may hold the rest); with no room at
                # all it could never run, so it fails instead of waiting forever.
                num_new = min(num_new, self.kv.max_new_tokens(seq, hits))
                if num_new < 1 or not self.kv.allocate(seq, num_new, hits):
                    self._fail(seq, out)
                    continue
            if seq.num_cached_tokens is None:  # first admission (not a recompute after preemption)
                seq.num_cached_tokens = num_hit_tokens
                self.stats.num_query_tokens += seq.num_tokens
                self.stats.num_hit_tokens += num_hit_tokens
                # Loaded for this sequence by lookup_prefix (capped: blocks loaded while it waited may have
                # been evicted again before it got in).
                seq.num_host_hit_tokens = min(seq.num_host_hit_tokens, num_hit_tokens)
                seq.num_disk_hit_tokens = min(seq.num_disk_hit_tokens, num_hit_tokens - seq.num_host_hit_tokens)
                self.stats.num_host_hit_tokens += seq.num_host_hit_tokens
                self.stats.num_disk_hit_tokens += seq.num_disk_hit_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entry = ScheduledSequence(seq, num_new)
            chosen[id(seq)] = entry
            in_flight.update(self._blocks_in_flight([entry]))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))  # they keep their places at the front
        return budget

    def _blocks_in_flight(self, entries) -> set:
        """Hashes of the prompt blocks that this step's prefills are computing (this chunk and the next ones):
        each is cached as soon as the step that fills it ends."""
        bs = self.kv.block_size
        out = set()
        for e in entries:
            if e.num_new_tokens > 1:
                s = e.seq
                hashes = self.kv.update_block_hashes(s, s.num_computed_tokens + e.num_new_tokens)
                out.update(hashes[s.num_computed_tokens // bs :])
        return out

    def _waits_for(self, seq: Sequence, num_hits: int, in_flight: set) -> bool:
        """In-batch prefix sharing: True when the next block this sequence would compute is being computed
        in this very step by another sequence, so that waiting one step turns it into a hit. Requests that
        arrive together with a shared prefix thus compute it once, not once each."""
        if not in_flight:
            return False
        max_hits = num_reusable_blocks(seq.num_tokens, self.kv.block_size)
        # With prefix caching off a waiting sequence is never hashed: nothing to wait for.
        return num_hits < min(max_hits, len(seq.block_hashes)) and seq.block_hashes[num_hits] in in_flight

    def _preempt(self, victim: Sequence, chosen: dict[int, ScheduledSequence], out: SchedulerOutput) -> int:
        """Free the victim's blocks and re-queue it first; returns budget given back if it was chosen."""
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = SequenceStatus.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        self.stats.num_preemptions += 1
        out.preempted.append(victim)
        entry = chosen.pop(id(victim), None)
        return entry.num_new_tokens if entry else 0

    def _fail(self, seq: Sequence, out: SchedulerOutput) -> None:
        blocks_needed = -(-(seq.num_tokens) // self.kv.block_size)
        seq.error = (
            f"out of KV cache blocks: request {seq.request_id!r} needs {blocks_needed} blocks, "
            f"{self.kv.num_free_blocks + len(seq.block_table)} are available "
            f"(of {self.kv.num_blocks}; the rest are pinned)"
        )
        if seq in self.running:
            self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        out.failed.append(seq)
