"""The cached decoding engine: one model, one paged KV cache, a prefix cache and a continuous-batching loop.

A request's path (see also the README's walk-through):

    add_request   admission.py: validate -> Sequence (prompt hashes computed lazily) -> scheduler.waiting
    step          scheduler.schedule()      decodes, prefill chunks, admissions (prefix hits), preemptions
                  build_forward_batch()     flat ForwardBatch: input ids, positions, slot mapping, block tables
                  model(batch, kv_cache)    writes the new K/V, returns the last token's logits per sequence
                  scheduler.commit()        tokens computed; every block that became full is cached (BlockStored)
                  sample()                  for sequences whose tokens are all computed
                  output_builder.py         detokenize, stop strings / EOS / max_tokens, RequestOutput
    finish        kv.free()                 blocks go back to the pool; hashed ones stay cached (LRU)

A step has a shared part (scheduling, the forward pass, commit: a failure there fails every request in the
step, engine_loop.py ``_fail_all``) and a per-request part (sampling the request's row, detokenizing, its stop
strings, its output delta: ``_advance``). A failure in the per-request part is that request's own: it alone
finishes with an error of kind REQUEST (the router does not retry it: another worker would fail the same way)
and every other request in the step goes on as if it had never been there.

The port side (lookups, pins, export / import, events) is ``engine_cache.py``; the load report is
``engine_load.py``. Everything here is single-threaded: the worker actor drives ``step()`` in a loop and calls
the other methods between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator
from typing import Sequence as Seq

import torch

from cache_service.records import FailureKind, InvalidRequestError, SamplingParams, WorkerLoad
from common.logs import get_logger
from workers.admission import RequestLimits, normalize_ids
from workers.block_pool import BlockPool
from workers.engine_cache import EngineCache
from workers.engine_load import StepRates, worker_load
from workers.kv_manager import KVManager
from workers.lower_tiers import LowerTiers
from workers.model import KVCache, LoadedModel, load_model
from workers.model_runner import build_forward_batch, tune_host_allocator
from workers.output_builder import OutputBuilder, accumulate, emit, rejected_output, request_output
from workers.sampling import SampleFailure, make_generator, sample
from workers.scheduler import Scheduler
from workers.sequence import RequestOutput, Sequence, SequenceStatus

__all__ = ["Engine", "EngineConfig"]

DEFAULT_KV_CACHE_BYTES = 256 << 20
MAX_ERROR_CHARS = 300  # a request's own error as it travels to the router (the log has the traceback)

log = get_logger("worker")


@dataclass(slots=True)
class EngineConfig:
    model: str = "demo"
    dtype: str | None = None
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None  # None -> as many as fit in kv_cache_memory_bytes
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": float8 e4m3 with scales (model/kv_cache.py)
    seed: int = 0  # the shared generator of unseeded sampled requests
    # Tiers under the device pool (workers/lower_tiers.py): host memory (0: none) and a disk folder (None:
    # none) bounded by disk_cache_gb; evicted blocks move down, hits below the pool are loaded back.
    host_cache_gb: float = 0.0
    disk_cache_dir: str | None = None
    disk_cache_gb: float = 16.0


class Engine(EngineCache):
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        if config.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {config.block_size}")
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config.model, config.dtype, config.device)
        lm = self.loaded
        if lm.device.type == "cpu":
            tune_host_allocator()
        self.model_config = lm.config
        self.tokenizer = lm.tokenizer
        num_blocks = config.num_blocks
        if num_blocks is None:
            num_blocks = KVCache.blocks_for_memory(lm.config, config.block_size, lm.dtype, config.kv_cache_memory_bytes,
                                                   config.kv_cache_dtype)
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block (num_blocks={num_blocks})")
        kv_cache = KVCache(lm.config, num_blocks, config.block_size, lm.dtype, lm.device, config.kv_cache_dtype)
        tiers = None
        if config.enable_prefix_caching:
            tiers = LowerTiers.for_cache(kv_cache, lm.model_id, host_cache_gb=config.host_cache_gb,
                                         disk_cache_dir=config.disk_cache_dir, disk_cache_gb=config.disk_cache_gb)
        # Only the KVManager touches the block pool.
        kv = KVManager(BlockPool(num_blocks, config.block_size, enable_caching=config.enable_prefix_caching),
                       lm.model_id, tiers)
        super().__init__(lm.model_id, kv, kv_cache)
        self.scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.max_model_len = lm.config.max_position_embeddings
        self.limits = RequestLimits(lm.config.vocab_size, self.max_model_len, config.block_size, num_blocks)
        self.outputs = OutputBuilder(lm.tokenizer, frozenset(lm.config.eos_token_ids), self.max_model_len)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs produced while generate()/pin() ran the loop
        self._rates = StepRates()
        self._next_internal_id = 0

    # ---- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ``InvalidRequestError`` (naming the field) for a request that can never be served."""
        self.limits.validate(prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, cache_salt: str = ""
    ) -> None:
        if request_id in self._seqs:
            raise InvalidRequestError(f"request_id {request_id!r} is already in the engine")
        if not isinstance(cache_salt, str):
            raise InvalidRequestError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        prompt = normalize_ids(prompt_token_ids)
        self.validate(prompt, params)
        self._add(request_id, prompt, params, cache_salt)

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str,
             internal: bool = False) -> Sequence:
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=params,
            cache_salt=cache_salt,
            generator=make_generator(params.seed),
            internal=internal,
        )
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its final output (finish_reason "abort") comes with the next step()."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        if not seq.internal:
            self._pending.append(request_output(seq, [], ""))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: an output for every request that produced tokens or finished."""
        outputs, self._pending = self._pending, []
        outputs.extend(self._step())
        return outputs

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs = []
        for seq in sched.failed:  # the scheduler finished these with an error
            self._seqs.pop(seq.request_id, None)
            if not seq.internal:
                outputs.append(emit(seq))
        if not sched.scheduled:
            return outputs
        t0 = time.perf_counter()
        batch = build_forward_batch(sched.scheduled, self.block_size)
        logits = self.loaded.model(batch, self.kv_cache)
        ready = self.scheduler.commit(sched.scheduled)
        if ready:
            rows = torch.tensor([r for r, _ in ready], device=logits.device)
            seqs = [s for _, s in ready]
            next_ids = sample(
                logits.index_select(0, rows) if len(ready) != logits.shape[0] else logits,
                [s.params for s in seqs],
                [s.generator for s in seqs],
                self._generator,
            )
            for seq, token in zip(seqs, next_ids):
                out = self._advance(seq, token)
                if out is not None:
                    outputs.append(out)
        self._rates.observe(sched, time.perf_counter() - t0)
        return outputs

    def _advance(self, seq: Sequence, token: int | SampleFailure) -> RequestOutput | None:
        """The per-request part of a step: the sampled token -> finished? -> the output delta.

        What can fail here belongs to this request (its row, its text, its stop strings) and fails it alone.
        Finishing (scheduler and blocks: state shared by every request) stays outside the guard: a failure
        there is the engine's and fails the step.
        """
        if isinstance(token, SampleFailure):
            self._fail_request(seq, "sampling its next token", token.error)
        else:
            try:
                self.outputs.append_token(seq, token)  # EOS / max_tokens, detokenizing, stop strings
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the batch's
                self._fail_request(seq, "adding its next token", exc)
        if seq.finish_reason is not None:
            self._finish(seq)  # before emit: the output says finished
        if seq.internal:
            return None
        if seq.error is None:
            try:
                return emit(seq)
            except Exception as exc:  # noqa: BLE001 - as above
                self._fail_request(seq, "building its output", exc)
                if not seq.is_finished:
                    self._finish(seq)
        # A failed request reports nothing more: the error ends it (its earlier deltas stand).
        return request_output(seq, [], "")

    @staticmethod
    def _fail_request(seq: Sequence, what: str, exc: Exception) -> None:
        """Mark ``seq`` failed by its own step part (``_finish`` then takes it out)."""
        log.error("a request failed alone", exc_info=(type(exc), exc, exc.__traceback__),
                  extra={"request_id": seq.request_id, "error_type": type(exc).__name__})
        lines = str(exc).strip().splitlines()
        message = f"the engine failed {what}: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        seq.error, seq.error_kind, seq.finish_reason = message, FailureKind.REQUEST, "error"

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _run_until_done(self, request_ids: Iterable[str]) -> Iterator[RequestOutput]:
        """Step until none of ``request_ids`` is in the engine, yielding their outputs; everyone else's are
        kept for the next ``step()``."""
        ids = set(request_ids)
        while any(rid in self._seqs for rid in ids):
            # The scheduler always makes progress or fails a request; this guards against a future bug
            # turning into a silent hang.
            if not self.scheduler.has_unfinished():
                raise RuntimeError("engine loop stalled: requests outstanding but none queued or running")
            for out in self._step():
                if out.request_id in ids:
                    yield out
                else:
                    self._pending.append(out)

    def _internal_id(self, kind: str) -> str:
        self._next_internal_id += 1
        return f"__{kind}-{self._next_internal_id}"

    # ---- running to completion for a caller -----------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        cache_salt: str = "",
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion together; full outputs in input order (invalid ones carry ``error``)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._internal_id("gen") for _ in prompts]
        results: dict[str, RequestOutput] = {}
        live = []
        for rid, prompt, p in zip(ids, prompts, params):
            try:
                self.add_request(rid, prompt, p, cache_salt)
                live.append(rid)
            except InvalidRequestError as exc:
                results[rid] = rejected_output(rid, len(prompt), str(exc))
        for out in self._run_until_done(live):
            total = results.get(out.request_id)
            results[out.request_id] = out if total is None else accumulate(total, out)
        return [results[rid] for rid in ids]

    def _warm_up(self, token_ids: list[int], cache_salt: str) -> None:
        # A pin's prefill: an internal request that stops after its first token and reports nothing.
        params = SamplingParams(max_tokens=1)
        self.validate(token_ids, params)
        rid = self._internal_id("pin")
        self._add(rid, token_ids, params, cache_salt, internal=True)
        for _ in self._run_until_done([rid]):
            pass

    # ---- introspection ---------------------------------------------------------------------------------
    def load(self) -> WorkerLoad:
        return worker_load(self.scheduler, self.kv, self.num_pinned_blocks, self._rates)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for seq in self.scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens
        for seq in self.scheduler.waiting:
            assert seq.status is SequenceStatus.WAITING and not seq.block_table
