"""Trust under chaos: a real stack keeps answering correctly while its Valkey is killed and a machine is lost.

One stack on its own two-node Ray cluster (``tests/ray_fixtures.py``: this module's cluster, so removing its
second node touches no other module): worker-0 on the head node, worker-1 on the second one, the cache service
on the stack's supervised, durable embedded Valkey. Four client threads send a fixed, bounded load (each 5
phases x 3 calls, GenerateStream and Generate mixed, greedy, 16 tokens, two shared-prefix groups, every call
with a deadline) while the controller (the test's own thread):

1. SIGKILLs the embedded valkey-server by PID once the first calls completed (others in flight), and waits
   for it to be restarted, for GetStats to answer again and for the index to hold every worker's blocks;
2. removes worker-1's machine (``lose_worker_node``: its Ray node and, at once, its worker processes) while a
   stream on worker-1 is delivering tokens, and waits for the registry to take worker-1 out of rotation and
   for a request to be served by worker-0.

Clients enter each phase once the controller has done the step before it (phase 1 after the kill, phase 2
after the index is back, phase 3 after the removal, phase 4 once worker-1 is out of rotation), so each fault
lands under load, and calls follow the loss, whatever the machine's speed. Asserted (events only, never
elapsed time): every completed answer is exactly a cold engine's greedy output for its prompt; the only
failures are streams that had already delivered tokens from worker-1 when its machine went (UNAVAILABLE
"... was lost after streaming ..."), and their partial output is right too; every unary call and every stream
that had not started completes; the cache service is back with the surviving worker's blocks indexed; and a
last request hits its cached prefix on worker-0. The recovery times are printed (``pytest -s``; README,
"Chaos under load").
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from cache_service.records import SamplingParams
from deploy.stack import Stack, StackConfig
from deploy.stats import parse_metrics
from protos.prefixcache.v1 import cache_pb2
from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from router.server import wait_until
from tests.cache_fixtures import member_stub
from tests.ray_fixtures import two_node_cluster  # noqa: F401  (module-scoped: this module's own cluster)

pytestmark = pytest.mark.timeout(300)

BS = 16
NUM_BLOCKS = 96
MAX_TOKENS = 16
PREFIX_BLOCKS = 4
NUM_QUESTIONS = 3  # per prefix group
NUM_CLIENTS = 4
# before the kill | Valkey down and back | the removal | right after it | once worker-1 is out of rotation
NUM_PHASES = 5
CALLS_PER_PHASE = 3  # per client
CALL_DEADLINE_S = 60.0  # every call's gRPC deadline
WAIT_S = 60.0  # every wait for an event (a deadline, never a sleep)
LOST = "worker-1"  # the worker whose machine is removed
SURVIVOR = "worker-0"


@dataclass
class Outcome:
    client: int
    phase: int
    kind: str  # "stream" | "unary"
    prompt: int  # index into the prompt list
    started: float
    ended: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    worker_ids: set[str] = field(default_factory=set)  # of the messages received
    code: grpc.StatusCode | None = None  # None: completed
    details: str = ""


def schedule(client: int, phase: int, k: int) -> tuple[str, int, int]:
    """(kind, prefix group, question) of a client's k-th call in a phase: each client alternates kinds and
    groups, so every phase has streams and unary calls on both groups (group g is warmed on worker-g)."""
    group = (client + k) % 2
    kind = "stream" if (client // 2 + k) % 2 == 0 else "unary"
    return kind, group, (phase + client + k) % NUM_QUESTIONS


def request(prompt: list[int], target_worker: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=prompt, target_worker=target_worker,
                              sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))


def test_correct_answers_through_a_valkey_kill_and_a_lost_machine(two_node_cluster):  # noqa: F811
    import ray

    from workers.engine import Engine, EngineConfig

    rng = random.Random(2024)
    prefixes = [[rng.randrange(256) for _ in range(PREFIX_BLOCKS * BS)] for _ in range(2)]
    prompts = [p + [rng.randrange(256) for _ in range(10 + q)] for p in prefixes for q in range(NUM_QUESTIONS)]
    final_prompt = prefixes[1] + [rng.randrange(256) for _ in range(9)]  # worker-1's group, asked at the end
    # The references: a cold engine (no prefix caching) in this process, one prompt at a time.
    engine = Engine(EngineConfig(model="demo", num_blocks=NUM_BLOCKS, block_size=BS, enable_prefix_caching=False))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    references = []
    for p in [*prompts, final_prompt]:
        (out,) = engine.generate([p], greedy)
        assert out.error is None
        references.append(list(out.new_token_ids))
    del engine

    stack = Stack(StackConfig(num_workers=2, node_ids=two_node_cluster.node_ids, port=0, metrics_port=0,
                              cache_service_port=0, num_blocks=NUM_BLOCKS, block_size=BS, max_num_seqs=8))
    stack.start()
    router = grpc.insecure_channel(stack.router_address)
    cache = member_stub(stack.cache_service_address, stack.credential)  # members only: as an operator
    gates = [threading.Event() for _ in range(NUM_PHASES)]  # gates[p]: clients may start phase p
    abort = threading.Event()
    pool = ThreadPoolExecutor(NUM_CLIENTS, thread_name_prefix="chaos-client")
    try:
        gen = generation_pb2_grpc.GenerationStub(router)
        svc = cache
        registry = stack.router_server.registry
        assert stack.worker_infos[SURVIVOR].node_id == two_node_cluster.head_node_id
        assert stack.worker_infos[LOST].node_id == two_node_cluster.worker_node_id
        lost_pid = ray.get(stack.workers[LOST].__ray_call__.remote(lambda actor: os.getpid()), timeout=30)

        def index_matches(workers: list[str]) -> bool:
            """GetStats answers, and the index holds as many blocks of each of ``workers`` as it caches."""
            try:
                stats = svc.GetStats(cache_pb2.GetStatsRequest(), timeout=2)
            except grpc.RpcError:
                return False  # Valkey down or coming back: UNAVAILABLE
            cached = {w: len(ray.get(stack.workers[w].cached_hashes.remote(), timeout=10)) for w in workers}
            indexed = {n.node.node_id: n.num_indexed_blocks for n in stats.nodes
                       if n.alive and n.node.node_id in cached}
            return indexed == cached

        def get_stats_answers() -> bool:
            try:
                svc.GetStats(cache_pb2.GetStatsRequest(), timeout=2)
                return True
            except grpc.RpcError:
                return False

        # Warm group g on worker-g, so that cache_aware routing sends each group to its own worker.
        for i, p in enumerate(prompts):
            worker = f"worker-{i // NUM_QUESTIONS}"
            r = gen.Generate(request(p, worker), timeout=CALL_DEADLINE_S)
            assert (r.worker_id, list(r.token_ids)) == (worker, references[i])
        assert wait_until(lambda: index_matches([SURVIVOR, LOST]), WAIT_S), "the warm-up's blocks were not indexed"

        # ---- the load ----------------------------------------------------------------------------------------
        lock = threading.Lock()
        outcomes: list[Outcome] = []
        streaming: dict[tuple[int, int, int], str] = {}  # (client, phase, k) -> worker, while a stream delivers

        def call(o: Outcome, key: tuple[int, int, int]) -> None:
            req = request(prompts[o.prompt])
            try:
                if o.kind == "unary":
                    r = gen.Generate(req, timeout=CALL_DEADLINE_S)
                    o.token_ids, o.worker_ids = list(r.token_ids), {r.worker_id}
                    return
                for d in gen.GenerateStream(req, timeout=CALL_DEADLINE_S):
                    o.token_ids.extend(d.token_ids)
                    o.worker_ids.add(d.worker_id)
                    if o.token_ids:
                        with lock:
                            streaming[key] = d.worker_id
            except grpc.RpcError as exc:
                o.code, o.details = exc.code(), exc.details() or ""
            finally:
                o.ended = time.monotonic()
                with lock:
                    streaming.pop(key, None)
                    outcomes.append(o)

        def client(c: int) -> None:
            for phase in range(NUM_PHASES):
                if not gates[phase].wait(WAIT_S * 3) or abort.is_set():
                    return
                for k in range(CALLS_PER_PHASE):
                    if abort.is_set():
                        return
                    kind, group, question = schedule(c, phase, k)
                    call(Outcome(c, phase, kind, group * NUM_QUESTIONS + question, time.monotonic()), (c, phase, k))

        def num_done() -> int:
            with lock:
                return len(outcomes)

        def streaming_on(worker: str) -> bool:
            with lock:
                return worker in streaming.values()

        futures = [pool.submit(client, c) for c in range(NUM_CLIENTS)]
        gates[0].set()

        # ---- fault 1: SIGKILL the embedded Valkey --------------------------------------------------------------
        assert wait_until(lambda: num_done() >= 2, WAIT_S), "the load did not start"
        killed = stack.cache.redis.pid
        in_flight_at_kill = stack.router_server.dispatcher.num_in_flight
        t_kill = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        gates[1].set()
        assert wait_until(lambda: stack.cache.redis.pid not in (None, killed), WAIT_S, 0.005), "Valkey not restarted"
        t_restarted = time.monotonic()
        assert wait_until(get_stats_answers, WAIT_S, 0.01), "GetStats did not answer again"
        t_stats = time.monotonic()
        assert wait_until(lambda: index_matches([SURVIVOR, LOST]), WAIT_S, 0.01), "the index was not rebuilt"
        t_indexed = time.monotonic()
        assert stack.cache.redis.num_restarts == 1
        gates[2].set()

        # ---- fault 2: worker-1's machine goes, while a stream on it is delivering tokens -----------------------
        before = parse_metrics(scrape(stack))
        assert wait_until(lambda: streaming_on(LOST), WAIT_S, 0.005), "no stream reached worker-1"
        in_flight_on_lost = registry.workers[LOST].num_in_flight
        t_remove = time.monotonic()
        killed_workers = two_node_cluster.lose_worker_node()
        t_removed = time.monotonic()
        assert lost_pid in killed_workers, (lost_pid, killed_workers)
        gates[3].set()
        assert wait_until(lambda: [w.worker_id for w in registry.live_workers()] == [SURVIVOR], WAIT_S, 0.01)
        t_out = time.monotonic()
        gates[4].set()
        probe = gen.Generate(request(prompts[0]), timeout=CALL_DEADLINE_S)
        t_served = time.monotonic()
        assert (probe.worker_id, list(probe.token_ids)) == (SURVIVOR, references[0])

        for f in futures:
            f.result(timeout=WAIT_S * 3)
        assert len(outcomes) == NUM_CLIENTS * NUM_PHASES * CALLS_PER_PHASE

        # ---- what the clients saw ----------------------------------------------------------------------------------
        failed = [o for o in outcomes if o.code is not None]
        for o in outcomes:
            expected = references[o.prompt]
            if o.code is None:
                assert o.token_ids == expected, f"wrong answer: {o}"
                continue
            # Only a stream that had delivered worker-1's tokens when its machine went may fail, and what it
            # delivered is right.
            assert o.kind == "stream" and o.code == grpc.StatusCode.UNAVAILABLE, o
            assert f"{LOST} was lost after streaming" in o.details, o
            assert o.worker_ids == {LOST} and o.token_ids and o.started < t_removed, o
            assert o.token_ids == expected[:len(o.token_ids)], f"wrong partial answer: {o}"
        after = parse_metrics(scrape(stack))
        retried = after.workers[LOST].errors - before.workers[LOST].errors - len(failed)  # failed attempts, retried
        # Once worker-1 is out of rotation, everything is served by worker-0.
        assert all(o.worker_ids == {SURVIVOR} for o in outcomes if o.started > t_out)
        assert after.workers[LOST].up == 0 and after.workers[SURVIVOR].up == 1

        # ---- the cache service is back, and serving goes on from the caches ------------------------------------
        assert wait_until(lambda: index_matches([SURVIVOR]), WAIT_S), "worker-0's blocks are not indexed"
        final = gen.Generate(request(final_prompt), timeout=CALL_DEADLINE_S)
        # worker-1's group was computed again on worker-0 in the last phase: its prefix is a hit there now.
        assert (final.worker_id, final.usage.cached_tokens) == (SURVIVOR, PREFIX_BLOCKS * BS)
        assert list(final.token_ids) == references[-1]

        ok = len(outcomes) - len(failed)
        print(f"\nchaos: {len(outcomes)} calls ({ok} ok, {len(failed)} streams lost after streaming "
              f"{[len(o.token_ids) for o in failed]} tokens, {max(int(retried), 0)} attempts on {LOST} retried); "
              f"{in_flight_at_kill} in flight at the Valkey kill, {in_flight_on_lost} on {LOST} at its removal")
        print(f"chaos: Valkey SIGKILL -> restarted {t_restarted - t_kill:.2f} s, GetStats answers "
              f"{t_stats - t_kill:.2f} s, index matches {t_indexed - t_kill:.2f} s")
        print(f"chaos: node removal ({t_removed - t_remove:.2f} s) -> {LOST} out of rotation "
              f"{t_out - t_remove:.2f} s, a request served by {SURVIVOR} {t_served - t_remove:.2f} s")
    finally:
        abort.set()
        for g in gates:
            g.set()
        pool.shutdown(wait=True, cancel_futures=True)
        router.close()
        cache.close()
        stack.stop()


def scrape(stack: Stack) -> str:
    import urllib.request

    return urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
