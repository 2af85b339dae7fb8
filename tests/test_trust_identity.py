"""Cluster identity (DESIGN 6b, members): only members reach the control and data planes, each only under its
own identity, and a worker imports blocks only from a peer that proves it is the node the index named.

On a real Valkey, real CacheServices, real engines behind real BlockTransfer servers (gRPC and the raw
stream), and certificates made here (``benchmarks/pki.py``: a cluster CA with worker-0, worker-1, router,
operator and cache-service, and an outsider CA). The finding this answers is reproduced first, on a service
that checks nothing: a stranger registers a fake node, publishes a prefix, pins it, and the real worker
warms the pin from the fake and answers a tenant with tokens a cold run never gives.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from cache_fixtures import PARAMS, cold_output, demo_model, make_node, prompt_of, wait_until  # noqa: F401
from valkey_fixtures import redis_dump, valkey_module  # noqa: F401  (pytest fixtures)

from benchmarks.pki import ThrowawayPki
from cache_service.block_hash import hash_prompt_blocks
from cache_service.block_wire import ExportedBlock, encode_payload, read_header
from cache_service.embedded_redis import connect_sync
from cache_service.loop_thread import LoopThread
from cache_service.peer_trust import TrustConfig
from cache_service.prefix_fetcher import FetchOutcome
from cache_service.raw_client import RawStreamError, RawStreamPool
from cache_service.raw_conn import TlsConn
from cache_service.raw_frames import (
    HEADER,
    KIND_AUTH,
    KIND_BLOCK,
    KIND_END,
    KIND_ERROR,
    KIND_REQUEST,
    RAW_STREAM_METHOD,
    frame,
)
from cache_service.records import PeerHint
from cache_service.server import CacheServiceConfig, CacheServiceThread
from cache_service.transfer_server import BlockTransferServicer, TransferServer
from cache_service.transfer_settings import FETCH_METHOD
from common.cluster_auth import Member, SharedSecret, TlsFiles
from protos.prefixcache.v1 import cache_pb2 as pb
from protos.prefixcache.v1 import cache_pb2_grpc
from workers.engine import Engine, EngineConfig

pytestmark = pytest.mark.timeout(240)

BS = 16
UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
NO_CREDENTIAL = ("no cluster credential: only cluster members may call this (send x-pc-member, x-pc-time and "
                 "x-pc-mac)")
CLUSTER_IDENTITIES = ["worker-0", "worker-1", "router", "operator", "cache-service"]


# ---- credentials and services ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    secret: SharedSecret
    tls: TlsFiles  # the cluster CA's files, "{id}" per identity
    outsider: TlsFiles  # another CA's, for the same identities
    ca_pem: bytes


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Credentials:
    folder = tmp_path_factory.mktemp("pki")
    cluster = ThrowawayPki(folder / "cluster")
    cluster.issue_all(CLUSTER_IDENTITIES)
    outsider = ThrowawayPki(folder / "outsider", name="outsider CA")
    outsider.issue_all(CLUSTER_IDENTITIES)
    return Credentials(SharedSecret.generate(), TlsFiles(*cluster.template()), TlsFiles(*outsider.template()),
                       cluster.ca_path.read_bytes())


def _service(url: str, member: Member | None, prefix: str = "pc:") -> CacheServiceThread:
    svc = CacheServiceThread(CacheServiceConfig(redis_url=url, port=0, sweep_interval_s=0.2, member=member,
                                                key_prefix=prefix))
    svc.start()
    return svc


@pytest.fixture(scope="module")
def cache_service(valkey_module, creds):
    """This module's members-only service under the shared secret (make_node registers with it)."""
    svc = _service(valkey_module.url, Member("cache-service", creds.secret))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def tls_service(valkey_module, creds):
    """The same under mutual TLS (its own key prefix: the two never see each other's records)."""
    svc = _service(valkey_module.url, Member("cache-service", creds.tls), prefix="tls:")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def open_service(valkey_module):
    """A service that checks no credential: what every service was before (the finding)."""
    svc = _service(valkey_module.url, None, prefix="open:")
    yield svc
    svc.stop()


@pytest.fixture
def redis(valkey_module, make_node):  # after make_node's flush
    connect_sync(valkey_module.url).flushall()
    return valkey_module


class Clients:
    """CacheService stubs per identity: ``clients(identity, method, request)`` calls as that member (``None``:
    a stranger, with no credential). Under a secret the identity rides in the token; under TLS in the
    channel's certificate."""

    def __init__(self, address: str, credential: SharedSecret | TlsFiles | None) -> None:
        self.address = address
        self.credential = credential
        self._stubs: dict[str | None, cache_pb2_grpc.CacheServiceStub] = {}

    def member(self, identity: str | None) -> Member | None:
        return Member(identity, self.credential) if identity is not None and self.credential is not None else None

    def stub(self, identity: str | None) -> cache_pb2_grpc.CacheServiceStub:
        if identity not in self._stubs:
            member = self.member(identity)
            channel = (member.sync_channel(self.address, "cache-service") if member is not None and member.tls
                       else grpc.insecure_channel(self.address))
            self._stubs[identity] = cache_pb2_grpc.CacheServiceStub(channel)
        return self._stubs[identity]

    def __call__(self, identity: str | None, method: str, request, metadata=None):
        member = self.member(identity)
        if metadata is None:
            metadata = member.call_metadata(f"/prefixcache.v1.CacheService/{method}") if member is not None else ()
        return getattr(self.stub(identity), method)(request, timeout=10, metadata=metadata)


def refused(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


# ---- what an attacker sends ----------------------------------------------------------------------------
def node_info(node_id: str, address: str = "127.0.0.1:7000") -> pb.NodeInfo:
    return pb.NodeInfo(node_id=node_id, transfer_address=address, model_id="demo", block_size=BS, capacity_blocks=64)


def events_for(hashes) -> list[pb.BlockEvent]:
    out, parent = [], b""
    for h in hashes:
        out.append(pb.BlockEvent(stored=pb.BlockStoredEvent(block_hash=bytes(h), parent_hash=parent)))
        parent = bytes(h)
    return out


def pin_request(tokens: list[int], pin_id: str = "sys", replicas: int = 2) -> pb.PinBlocksRequest:
    hashes = [bytes(h) for h in hash_prompt_blocks(tokens, BS, "demo")]
    return pb.PinBlocksRequest(pin_id=pin_id, model_id="demo", token_ids=tokens, block_hashes=hashes,
                               replicas=replicas)


def poison(block: ExportedBlock) -> ExportedBlock:
    """The same hash, token ids and a checksum that verifies, over KV values of the attacker's choosing."""
    h = read_header(block.payload)
    data = np.frombuffer(bytes(block.payload)[h.data_offset :], dtype=np.float32)
    garbage = (-3.0 * data + 1.0).astype(np.float32).tobytes()
    return ExportedBlock(block.block_hash, block.token_ids, encode_payload(h.model_id, h.block_hash, h.dtype,
                                                                           h.shape, garbage))


class FakePeer:
    """A BlockTransfer server that serves poisoned blocks of one prompt, with whatever credential it has."""

    def __init__(self, demo_model, prompt: list[int], *, member: Member | None = None, raw_stream: bool = True):
        engine = Engine(EngineConfig(model="demo", num_blocks=64), loaded=demo_model)
        engine.generate([prompt], PARAMS)  # the attacker computes the real blocks (the model is public)
        self.hashes = engine.block_hashes(prompt)
        self.blocks = {b.block_hash: poison(b) for b in engine.export_blocks(self.hashes)}
        self.loop = LoopThread("fake-peer").start()
        self.servicer = BlockTransferServicer(self.export, "demo")
        self.server = TransferServer(self.servicer, raw_stream=raw_stream, member=member)
        self.address = self.loop.run(self.server.start(), 30)

    def export(self, hashes):
        return [self.blocks[h] for h in hashes if h in self.blocks]

    def close(self) -> None:
        self.loop.run(self.server.stop(0), 10)
        self.loop.stop()


@pytest.fixture
def fake_peer(demo_model):
    peers: list[FakePeer] = []

    def make(prompt: list[int], **kw) -> FakePeer:
        peers.append(FakePeer(demo_model, prompt, **kw))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


# ---- the finding, where nothing checks a credential --------------------------------------------------------
def test_the_finding_on_a_service_that_checks_nothing(make_node, open_service, fake_peer, demo_model):
    """The finding as reported. Recomputation checks (peer_trust.py) verify a peer's first two fetches and
    then one in 16: a stranger that serves honest blocks first gets most of its later ones in. That sampled
    check is turned off here, so that the one fetch this test makes is one of those."""
    system = prompt_of(4 * BS, seed=1)
    fake = fake_peer(system + [0])
    w0 = make_node("worker-0", cache_address=open_service.address,
                   trust=TrustConfig(verify_first=0, sample_every=0))
    stranger = Clients(open_service.address, None)
    epoch = stranger(None, "RegisterNode", pb.RegisterNodeRequest(node=node_info("evil", fake.address),
                                                                  ttl_seconds=60)).epoch
    stranger(None, "PublishEvents", pb.PublishEventsRequest(node_id="evil", epoch=epoch,
                                                            events=events_for(fake.hashes)))
    lookup = pb.LookupRequest(block_hashes=[bytes(h) for h in fake.hashes], model_id="demo")
    assert stranger(None, "Lookup", lookup).matches[0].node_id == "evil"  # ranked first
    assert sorted(stranger(None, "Pin", pin_request(system, replicas=2)).node_ids) == ["evil", "worker-0"]
    # worker-0 warms the pin from "evil" (Lookup names it): poisoned KV, checksums and all, imported.
    wait_until(lambda: w0.call(lambda e: e.pinned()) == {"sys": 4}, what="worker-0 to warm the pin")
    assert fake.servicer.stats.num_blocks == 4
    prompt = system + prompt_of(9, seed=2)
    (out,), _ = w0.generate([prompt], PARAMS)
    assert out.cached_tokens == 4 * BS and out.new_token_ids != cold_output(demo_model, prompt)


# ---- the same attack against members-only services ----------------------------------------------------------
def test_a_fake_node_cannot_register_publish_or_pin(make_node, cache_service, redis, creds, fake_peer, demo_model):
    system = prompt_of(4 * BS, seed=1)
    fake = fake_peer(system + [0])
    clients = Clients(cache_service.address, creds.secret)
    before = redis_dump(redis)
    attempts = [
        ("RegisterNode", pb.RegisterNodeRequest(node=node_info("evil", fake.address), ttl_seconds=60)),
        ("PublishEvents", pb.PublishEventsRequest(node_id="evil", epoch=1, events=events_for(fake.hashes))),
        ("Pin", pin_request(system, replicas=1)),
    ]
    for method, request in attempts:
        assert refused(clients, None, method, request) == (UNAUTHENTICATED, NO_CREDENTIAL), method
    # A member's credential (worker-1's), used to act as another node, or to pin.
    as_worker_0 = [
        ("RegisterNode", pb.RegisterNodeRequest(node=node_info("worker-0", fake.address), ttl_seconds=60),
         "worker-1 may not call RegisterNode for node 'worker-0': a node calls it only for itself"),
        ("PublishEvents", pb.PublishEventsRequest(node_id="worker-0", epoch=1, events=events_for(fake.hashes)),
         "worker-1 may not call PublishEvents for node 'worker-0': a node calls it only for itself"),
        ("Pin", pin_request(system, replicas=1), "worker-1 may not call Pin: the router and operators may"),
    ]
    for method, request, why in as_worker_0:
        assert refused(clients, "worker-1", method, request) == (PERMISSION_DENIED, why), method
    assert redis_dump(redis) == before  # nothing written
    # The real worker finds no peer and computes the prompt itself: what a cold engine gives.
    w0 = make_node("worker-0", credential=creds.secret)
    prompt = system + prompt_of(9, seed=2)
    (out,), (fetch,) = w0.generate([prompt], PARAMS)
    assert (fetch.outcome, out.cached_tokens) == (FetchOutcome.NO_PEER, 0)
    assert out.new_token_ids == cold_output(demo_model, prompt) and fake.servicer.stats.num_requests == 0


def cache_requests(tokens: list[int]) -> dict[str, object]:
    hashes = [bytes(h) for h in hash_prompt_blocks(tokens, BS, "demo")]
    return {
        "RegisterNode": pb.RegisterNodeRequest(node=node_info("worker-0"), ttl_seconds=60),
        "Heartbeat": pb.HeartbeatRequest(node_id="worker-0", epoch=1),
        "PublishEvents": pb.PublishEventsRequest(node_id="worker-0", epoch=1, events=events_for(hashes)),
        "Lookup": pb.LookupRequest(block_hashes=hashes, model_id="demo"),
        "Pin": pin_request(tokens, replicas=1),
        "Unpin": pb.PinBlocksRequest(pin_id="sys"),
        "GetStats": pb.GetStatsRequest(),
    }


# Per RPC: an identity that may not call it (with the request above), and what it is told.
WRONG_IDENTITY = {
    "RegisterNode": ("worker-1", "worker-1 may not call RegisterNode for node 'worker-0': a node calls it only for "
                                 "itself"),
    "Heartbeat": ("router", "router may not call Heartbeat for node 'worker-0': a node calls it only for itself"),
    "PublishEvents": ("worker-1", "worker-1 may not call PublishEvents for node 'worker-0': a node calls it only "
                                  "for itself"),
    "Lookup": ("operator", "operator may not call Lookup: nodes and the router may"),
    "Pin": ("worker-0", "worker-0 may not call Pin: the router and operators may"),
    "Unpin": ("worker-0", "worker-0 may not call Unpin: the router and operators may"),
    "GetStats": ("worker-0", "worker-0 may not call GetStats: the router and operators may"),
}


def populate(clients: Clients, tokens: list[int]) -> None:
    """A registered worker-0 holding the prefix, and a pin (by the router): state a refused call could change."""
    clients("worker-0", "RegisterNode", pb.RegisterNodeRequest(node=node_info("worker-0"), ttl_seconds=600))
    hashes = hash_prompt_blocks(tokens, BS, "demo")
    clients("worker-0", "PublishEvents", pb.PublishEventsRequest(node_id="worker-0", epoch=1,
                                                                 events=events_for(hashes)))
    clients("router", "Pin", pin_request(tokens, replicas=1))


def check_the_right_identities_are_served(clients: Clients, requests: dict[str, object]) -> None:
    assert clients("router", "Lookup", requests["Lookup"]).matches[0].num_blocks == 3
    assert [n.node.node_id for n in clients("operator", "GetStats", requests["GetStats"]).nodes] == ["worker-0"]
    assert clients("worker-0", "Heartbeat", requests["Heartbeat"]).pins[0].pin_id == "sys"
    assert clients("operator", "Unpin", requests["Unpin"]).found


def test_every_cache_service_rpc_refuses_strangers_and_wrong_identities(cache_service, redis, creds):
    tokens = prompt_of(3 * BS, seed=3)
    clients = Clients(cache_service.address, creds.secret)
    populate(clients, tokens)
    before = redis_dump(redis)
    requests = cache_requests(tokens)
    assert sorted(requests) == sorted(pb.DESCRIPTOR.services_by_name["CacheService"].methods_by_name)
    for method, request in requests.items():
        assert refused(clients, None, method, request) == (UNAUTHENTICATED, NO_CREDENTIAL), method
        identity, why = WRONG_IDENTITY[method]
        assert refused(clients, identity, method, request) == (PERMISSION_DENIED, why), method
    # An expired token, a token made for another method (replayed), a token of another secret.
    path = "/prefixcache.v1.CacheService/RegisterNode"
    old = creds.secret.sign("worker-0", path, now=time.time() - 130).metadata()
    lookup_token = clients.member("worker-0").call_metadata("/prefixcache.v1.CacheService/Lookup")
    other = SharedSecret.generate().sign("worker-0", path).metadata()
    register = requests["RegisterNode"]
    code, why = refused(clients, "worker-0", "RegisterNode", register, metadata=old)
    assert code == UNAUTHENTICATED and why.startswith("cluster credential of 'worker-0' is 13"), why
    assert why.endswith(" s old; at most 120 s of clock skew is accepted")
    invalid = "invalid cluster credential for 'worker-0' (another secret, or a token made for another call)"
    for metadata in (lookup_token, other):
        assert refused(clients, "worker-0", "RegisterNode", register, metadata=metadata) == (UNAUTHENTICATED, invalid)
    assert redis_dump(redis) == before  # nothing written by any of them
    check_the_right_identities_are_served(clients, requests)


def fetch_request(node, tokens: list[int], requester: str) -> pb.FetchBlocksRequest:
    return pb.FetchBlocksRequest(block_hashes=[bytes(h) for h in node.engine.block_hashes(tokens)], model_id="demo",
                                 requester=requester)


def test_block_transfer_refuses_strangers_and_non_nodes(make_node, creds):
    w0 = make_node("worker-0", cache_address=None, credential=creds.secret)
    tokens = prompt_of(3 * BS, seed=4)
    w0.generate([tokens + [1]], PARAMS)
    fetch = cache_pb2_grpc.BlockTransferStub(grpc.insecure_channel(w0.transfer_address)).FetchBlocks

    def fetched(requester: str, member: Member | None, metadata=None) -> list:
        md = metadata if metadata is not None else (member.call_metadata(FETCH_METHOD) if member else ())
        return list(fetch(fetch_request(w0, tokens, requester), timeout=10, metadata=md))

    assert refused(fetched, "worker-1", None) == (UNAUTHENTICATED, NO_CREDENTIAL)
    for identity in ("router", "operator"):
        assert refused(fetched, identity, Member(identity, creds.secret)) == (
            PERMISSION_DENIED, f"{identity} may not fetch blocks: only nodes may")
    assert refused(fetched, "worker-0", Member("worker-1", creds.secret)) == (
        PERMISSION_DENIED, "worker-1 may not fetch blocks for 'worker-0': only for itself")
    lookup_token = Member("worker-1", creds.secret).call_metadata("/prefixcache.v1.CacheService/Lookup")
    assert refused(fetched, "worker-1", None, lookup_token)[0] == UNAUTHENTICATED  # replayed from another method
    assert w0.node.servicer.stats.num_blocks == 0  # nothing sent
    assert len(fetched("worker-1", Member("worker-1", creds.secret))) == 3  # a node, for itself: 3 blocks


def raw_exchange(address: str, data: bytes) -> list[tuple[int, bytes]]:
    """Send ``data`` on a fresh connection; every frame (kind, meta) the worker answers until it closes."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    frames, at = [], 0
    while at < len(answer):
        kind, meta_len, data_len = HEADER.unpack_from(answer, at)
        frames.append((kind, answer[at + HEADER.size : at + HEADER.size + meta_len]))
        at += HEADER.size + meta_len + data_len
    return frames


def raw_pool_fetch(member: Member, address: str, request: pb.FetchBlocksRequest, peer: str) -> int:
    """Blocks a requester's pool (raw_client) takes from ``address`` believing it is ``peer``."""
    chunks = []

    async def go():
        pool = RawStreamPool(member)
        try:
            await pool.fetch(address, request, chunks.append, peer)
        finally:
            pool.close()

    asyncio.run(asyncio.wait_for(go(), 20))
    return len(chunks)


def test_the_raw_stream_refuses_strangers_and_non_nodes(make_node, creds):
    w0 = make_node("worker-0", cache_address=None, credential=creds.secret)
    tokens = prompt_of(3 * BS, seed=5)
    w0.generate([tokens + [1]], PARAMS)
    address = w0.node.servicer.raw_stream_address

    def r_frame(requester: str) -> bytes:
        return frame(KIND_REQUEST, fetch_request(w0, tokens, requester).SerializeToString())

    def a_frame(member: Member, method: str = RAW_STREAM_METHOD, nonce: str = "ab") -> bytes:
        return frame(KIND_AUTH, member.token(method, nonce).to_bytes())

    def proof(identity: str = "worker-0", nonce: str = "ab") -> tuple[int, bytes]:
        return KIND_AUTH, creds.secret.prove(identity, nonce).encode()

    w1 = Member("worker-1", creds.secret)
    assert raw_exchange(address, r_frame("worker-1")) == [(KIND_ERROR, b"UNAUTHENTICATED: the raw block stream "
                                                          b"serves cluster members only: a connection opens with an "
                                                          b"A frame carrying a token")]
    invalid = b"UNAUTHENTICATED: invalid cluster credential for 'worker-1' (another secret, or a token made for " \
              b"another call)"
    assert raw_exchange(address, a_frame(w1, FETCH_METHOD) + r_frame("worker-1")) == [(KIND_ERROR, invalid)]
    stranger = Member("worker-1", SharedSecret.generate())
    assert raw_exchange(address, a_frame(stranger) + r_frame("worker-1")) == [(KIND_ERROR, invalid)]
    assert raw_exchange(address, a_frame(Member("router", creds.secret)) + r_frame("router")) == [
        proof(), (KIND_ERROR, b"PERMISSION_DENIED: router may not fetch blocks: only nodes may")]
    assert raw_exchange(address, a_frame(w1) + r_frame("worker-0")) == [
        proof(), (KIND_ERROR, b"PERMISSION_DENIED: worker-1 may not fetch blocks for 'worker-0': only for itself")]
    assert w0.node.servicer.stats.num_blocks == 0 and w0.node.transfer_server.raw.num_unauthenticated == 3
    frames = raw_exchange(address, a_frame(w1) + r_frame("worker-1"))  # a node, for itself
    assert [k for k, _ in frames] == [KIND_AUTH, KIND_BLOCK, KIND_BLOCK, KIND_BLOCK, KIND_END]
    assert frames[0] == proof()
    # The requester's side: worker-0's proof is not the proof of the node the index said lives there.
    request = fetch_request(w0, tokens, "worker-1")
    assert raw_pool_fetch(w1, address, request, "worker-0") == 3
    with pytest.raises(RawStreamError) as info:
        raw_pool_fetch(w1, address, request, "worker-9")
    assert str(info.value) == f"{address} did not prove it is 'worker-9' (its proof does not verify)"


@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw", "grpc"])
def test_a_worker_imports_nothing_from_a_peer_that_cannot_prove_it(make_node, fake_peer, creds, demo_model,
                                                                  raw_stream):
    prompt = prompt_of(4 * BS + 1, seed=6)
    w1 = make_node("worker-1", cache_address=None, credential=creds.secret, raw_stream=raw_stream)
    # The index (or a router's hint) names worker-0 at the fake's address: a peer with no credential, or
    # with another cluster's secret (it cannot verify worker-1's token, nor prove worker-0's key).
    open_fake = fake_peer(prompt, raw_stream=raw_stream)
    other_cluster = fake_peer(prompt, raw_stream=raw_stream, member=Member("worker-0", SharedSecret.generate()))
    for fake, why in (
        (open_fake, f"{open_fake.address} did not prove it is 'worker-0': no proof in its answer"),
        (other_cluster, f"fetch from {other_cluster.address} failed: UNAUTHENTICATED: invalid cluster credential "
                        f"for 'worker-1' (another secret, or a token made for another call)"),
    ):
        result = w1.fetch_prefix(prompt, peer=PeerHint("worker-0", fake.address, 4), peer_known=True)
        assert (result.outcome, result.num_blocks, result.error) == (FetchOutcome.FAILED, 0, why)
        assert w1.call(lambda e: e.num_cached_prefix_blocks(e.block_hashes(prompt))) == 0
    (out,), _ = w1.generate([prompt], PARAMS)
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))


# ---- mutual TLS -----------------------------------------------------------------------------------------------
def test_mtls_refuses_other_cas_and_plaintext_at_the_handshake_and_wrong_identities_after(tls_service, redis, creds):
    tokens = prompt_of(3 * BS, seed=7)
    clients = Clients(tls_service.address, creds.tls)
    outsiders = Clients(tls_service.address, creds.outsider)  # the same names, from another CA
    populate(clients, tokens)
    before = redis_dump(redis)
    requests = cache_requests(tokens)
    for method, request in requests.items():
        # No connection at all: a plaintext client, and a certificate of another CA, fail the handshake.
        for who, identity in ((clients, None), (outsiders, "worker-0"), (outsiders, "operator")):
            code, why = refused(who, identity, method, request)
            assert code == grpc.StatusCode.UNAVAILABLE, (method, identity, why)
        identity, why = WRONG_IDENTITY[method]
        assert refused(clients, identity, method, request) == (PERMISSION_DENIED, why), method
    assert redis_dump(redis) == before
    check_the_right_identities_are_served(clients, requests)


def tls_raw_fetch(address: str, context, request: pb.FetchBlocksRequest, server_hostname: str = "worker-0"):
    """Frames a TLS raw-stream connection answers, or the exception that ended it."""

    async def go():
        loop = asyncio.get_running_loop()
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.setblocking(False)
        conn = TlsConn(loop, sock, context, server_side=False, server_hostname=server_hostname)
        try:
            await conn.handshake()  # TLS 1.3: the server checks our certificate after this returns
            await conn.sendall(frame(KIND_REQUEST, request.SerializeToString()))
            kinds = []
            while True:
                kind, meta_len, data_len = HEADER.unpack(bytes(await conn.recv_exactly(HEADER.size)))
                kinds.append(kind)
                body = await conn.recv_exactly(meta_len + data_len)
                if kind == KIND_ERROR:
                    return kinds, bytes(body[:meta_len]).decode()
                if kind == KIND_END:
                    return kinds, ""
        finally:
            conn.close()

    try:
        return asyncio.run(asyncio.wait_for(go(), 20))
    except (OSError, EOFError) as exc:  # ssl.SSLError included
        return exc


def client_context(creds: Credentials, files: TlsFiles, identity: str):
    """A requester that trusts the cluster CA and presents ``files``' certificate of ``identity``."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    f = files.resolve(identity)
    ctx.load_cert_chain(f.cert, f.key)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode())
    return ctx


def test_mtls_block_transfer_and_raw_stream_serve_only_cluster_nodes(make_node, tls_service, creds):
    w0 = make_node("worker-0", cache_address=None, credential=creds.tls)
    tokens = prompt_of(3 * BS, seed=8)
    w0.generate([tokens + [1]], PARAMS)

    def grpc_fetch(files: TlsFiles | None, identity: str, requester: str):
        channel = (Member(identity, files).sync_channel(w0.transfer_address, "worker-0") if files is not None
                   else grpc.insecure_channel(w0.transfer_address))
        with channel:
            return list(cache_pb2_grpc.BlockTransferStub(channel).FetchBlocks(
                fetch_request(w0, tokens, requester), timeout=10))

    for files, identity in ((None, "worker-1"), (creds.outsider, "worker-1")):
        assert refused(grpc_fetch, files, identity, identity)[0] == grpc.StatusCode.UNAVAILABLE
    assert refused(grpc_fetch, creds.tls, "router", "router") == (
        PERMISSION_DENIED, "router may not fetch blocks: only nodes may")
    assert refused(grpc_fetch, creds.tls, "worker-1", "worker-0") == (
        PERMISSION_DENIED, "worker-1 may not fetch blocks for 'worker-0': only for itself")
    # The raw stream: a plaintext requester and another CA's certificate get no frame; a router is refused.
    raw = w0.node.servicer.raw_stream_address
    request = fetch_request(w0, tokens, "worker-1")
    assert raw_exchange(raw, frame(KIND_REQUEST, request.SerializeToString())) == []  # closed, not a byte back
    assert isinstance(tls_raw_fetch(raw, client_context(creds, creds.outsider, "worker-1"), request),
                      (OSError, EOFError))
    assert tls_raw_fetch(raw, client_context(creds, creds.tls, "router"), fetch_request(w0, tokens, "router")) == (
        [KIND_ERROR], "PERMISSION_DENIED: router may not fetch blocks: only nodes may")
    assert w0.node.servicer.stats.num_blocks == 0 and w0.node.transfer_server.raw.num_unauthenticated == 2
    assert tls_raw_fetch(raw, client_context(creds, creds.tls, "worker-1"), request) == (
        [KIND_BLOCK] * 3 + [KIND_END], "")
    assert len(grpc_fetch(creds.tls, "worker-1", "worker-1")) == 3
    # The requester's side: worker-0's certificate does not name the node the index said lives there.
    with pytest.raises(RawStreamError, match=r"did not prove it is 'worker-9': .*Hostname mismatch"):
        raw_pool_fetch(Member("worker-1", creds.tls), raw, request, "worker-9")


@pytest.mark.parametrize("raw_stream", [True, False], ids=["raw", "grpc"])
def test_mtls_a_worker_imports_nothing_from_a_peer_without_the_named_certificate(make_node, fake_peer, creds,
                                                                                demo_model, raw_stream):
    prompt = prompt_of(4 * BS + 1, seed=9)
    w1 = make_node("worker-1", cache_address=None, credential=creds.tls, raw_stream=raw_stream)
    # A certificate of another CA named worker-0, and a cluster certificate of another member (cache-service).
    for fake, why in ((fake_peer(prompt, raw_stream=raw_stream, member=Member("worker-0", creds.outsider)),
                       "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"),
                      (fake_peer(prompt, raw_stream=raw_stream, member=Member("cache-service", creds.tls)),
                       "Hostname Verification Check failed")):
        result = w1.fetch_prefix(prompt, peer=PeerHint("worker-0", fake.address, 4), peer_known=True)
        assert (result.outcome, result.num_blocks) == (FetchOutcome.FAILED, 0), result
        assert result.error.startswith(f"fetch from {fake.address} failed: UNAVAILABLE: ") and why in result.error
        assert fake.servicer.stats.num_blocks == 0
    (out,), _ = w1.generate([prompt], PARAMS)
    assert (out.cached_tokens, out.new_token_ids) == (0, cold_output(demo_model, prompt))


@pytest.mark.parametrize("kind", ["secret", "tls"])
def test_members_register_and_transfer_between_themselves(make_node, cache_service, tls_service, creds, demo_model,
                                                         kind):
    credential, service = (creds.secret, cache_service) if kind == "secret" else (creds.tls, tls_service)
    for raw_stream in (True, False):
        w0 = make_node("worker-0", cache_address=service.address, credential=credential, raw_stream=raw_stream)
        w1 = make_node("worker-1", cache_address=service.address, credential=credential, raw_stream=raw_stream)
        prompt = prompt_of(5 * BS + 3, seed=10 + raw_stream)
        w0.generate([prompt], PARAMS)
        assert w0.flush()
        (out,), (fetch,) = w1.generate([prompt], PARAMS)
        assert (fetch.outcome, fetch.peer, fetch.num_blocks) == (FetchOutcome.TRANSFERRED, "worker-0", 5)
        assert out.new_token_ids == cold_output(demo_model, prompt)
        assert (w1.node.transfer_client.num_raw_fetches > 0) == raw_stream
        w0.stop()
        w1.stop()


# ---- the router's client-facing endpoint ------------------------------------------------------------------
def test_the_router_warns_when_bearer_tokens_would_cross_in_clear_text(creds):
    from router.auth import TokenAuth
    from router.server import RouterConfig, RouterThread

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("prefixcache.router").addHandler(handler)
    try:
        for tls in (False, True):
            files = creds.tls.resolve("router")
            router = RouterThread(RouterConfig(port=0, metrics_port=None, auth=TokenAuth({"tok": "alpha"}),
                                               tls_cert_file=files.cert if tls else None,
                                               tls_key_file=files.key if tls else None), [])
            router.start()
            router.stop()
    finally:
        logging.getLogger("prefixcache.router").removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "bearer tokens cross the network in clear text: the router's endpoint has no TLS (give --tls-cert and "
        "--tls-key)"]


# ---- whole stacks -------------------------------------------------------------------------------------------
def generate(stub_, prompt: list[int], worker: str, metadata=()) -> object:
    from protos.prefixcache.v1 import generation_pb2 as gpb

    return stub_.Generate(gpb.GenerateRequest(token_ids=prompt, target_worker=worker,
                                              sampling=gpb.SamplingParams(max_tokens=6)), timeout=120,
                          metadata=metadata)


def check_a_transfer_between_the_workers(stub_, demo_model, metadata=()) -> None:
    prefix = prompt_of(8 * BS, seed=20)
    first = generate(stub_, prefix + prompt_of(5, seed=21), "worker-0", metadata)
    assert (first.worker_id, first.usage.cached_tokens) == ("worker-0", 0)
    prompt = prefix + prompt_of(9, seed=22)
    second = generate(stub_, prompt, "worker-1", metadata)
    assert (second.worker_id, second.usage.transferred_tokens, second.usage.cached_tokens) == ("worker-1", 128, 128)
    assert list(second.token_ids) == cold_output(demo_model, prompt)


def stats_as(stack, files_or_secret, identity: str) -> list[str]:
    clients = Clients(stack.cache_service_address, files_or_secret)
    return sorted(n.node.node_id for n in clients(identity, "GetStats", pb.GetStatsRequest()).nodes)


def test_a_stack_with_no_flags_runs_members_only_on_its_own_secret(demo_model):
    from deploy.stack import Stack, StackConfig
    from protos.prefixcache.v1 import generation_pb2_grpc

    with Stack(StackConfig(num_workers=2, port=0, metrics_port=None, cache_service_port=0, num_blocks=64,
                           always_transfer=True)) as stack:
        assert isinstance(stack.credential, SharedSecret) and len(stack.credential.secret) == 32
        with grpc.insecure_channel(stack.router_address) as channel:  # the README's first command: plaintext
            check_a_transfer_between_the_workers(generation_pb2_grpc.GenerationStub(channel), demo_model)
        # The router's own Lookup (its fallback index) is served: it calls as the member "router". A refused
        # one would fail here (routing itself falls back to the mirror silently).
        hashes = hash_prompt_blocks(prompt_of(8 * BS, seed=20), BS, "demo")
        link = stack.router_server.link
        wait_until(lambda: stack.router.call(link.lookup(hashes)) == {"worker-0": 8, "worker-1": 8},
                   what="both workers' blocks in the cache service")
        stranger = Clients(stack.cache_service_address, None)
        assert refused(stranger, None, "GetStats", pb.GetStatsRequest()) == (UNAUTHENTICATED, NO_CREDENTIAL)
        assert stats_as(stack, stack.credential, "operator") == ["worker-0", "worker-1"]
        w0 = stack.worker_infos["worker-0"].transfer_address
        with grpc.insecure_channel(w0) as channel:
            assert refused(lambda: list(cache_pb2_grpc.BlockTransferStub(channel).FetchBlocks(
                pb.FetchBlocksRequest(block_hashes=[b"\x01" * 16]), timeout=10))) == (UNAUTHENTICATED, NO_CREDENTIAL)


def test_a_stack_under_mutual_tls_serves_clients_over_tls_and_moves_blocks_between_members(creds, demo_model):
    from deploy.stack import Stack, StackConfig
    from protos.prefixcache.v1 import generation_pb2_grpc
    from router.auth import TokenAuth

    cert, key, ca = creds.tls.cert, creds.tls.key, creds.tls.ca
    with Stack(StackConfig(num_workers=2, port=0, metrics_port=None, cache_service_port=0, num_blocks=64,
                           always_transfer=True, tls_cert=cert, tls_key=key, tls_ca=ca, http_port=0,
                           auth=TokenAuth({"tok-a": "alpha"}))) as stack:
        assert stack.credential == creds.tls
        tls = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem)  # a client: no certificate of its own
        with grpc.secure_channel(stack.router_address, tls, options=[("grpc.ssl_target_name_override", "router")]
                                 ) as channel:
            s = generation_pb2_grpc.GenerationStub(channel)
            assert refused(generate, s, prompt_of(20), "worker-0")[0] == UNAUTHENTICATED  # no bearer token
            check_a_transfer_between_the_workers(s, demo_model, [("authorization", "Bearer tok-a")])
        with grpc.insecure_channel(stack.router_address) as channel:  # plaintext: no connection
            assert refused(generate, generation_pb2_grpc.GenerationStub(channel), prompt_of(20), "worker-0",
                           [("authorization", "Bearer tok-a")])[0] == grpc.StatusCode.UNAVAILABLE
        assert refused(Clients(stack.cache_service_address, creds.outsider), "operator", "GetStats",
                       pb.GetStatsRequest())[0] == grpc.StatusCode.UNAVAILABLE
        assert stats_as(stack, creds.tls, "operator") == ["worker-0", "worker-1"]
        # The HTTP front door serves TLS with the same certificate; a plaintext request gets no HTTP answer.
        http_port = stack.router_server.http_port
        assert https_get(http_port, "/v1/models", creds.ca_pem, "Bearer tok-a").startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as plain:
            plain.sendall(b"GET /health HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
            assert not plain.recv(1 << 16).startswith(b"HTTP/1.1 200")


def https_get(port: int, path: str, ca_pem: bytes, authorization: str) -> bytes:
    """One HTTPS GET to the router on 127.0.0.1 (its certificate names "router"), the whole answer."""
    import ssl

    context = ssl.create_default_context(cadata=ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="router") as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: router\r\nAuthorization: {authorization}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(1 << 16):
            answer += chunk
    return answer
