"""The checked-in generated gRPC code must match the .proto sources."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "protos" / "compile.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contract_names():
    from protos.prefixcache.v1 import cache_pb2, generation_pb2

    gen = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert {m.name for m in gen.methods} == {"Generate", "GenerateStream", "Pin", "Unpin"}
    cache = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
    assert {m.name for m in cache.methods} == {
        "RegisterNode", "Heartbeat", "PublishEvents", "Lookup", "Pin", "Unpin", "GetStats"}
    fetch = cache_pb2.DESCRIPTOR.services_by_name["BlockTransfer"].methods_by_name["FetchBlocks"]
    assert fetch.server_streaming
    req = generation_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in ("request_id", "text", "token_ids", "sampling", "cache_salt", "session_id", "target_worker"):
        assert name in req
    sp = generation_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"):
        assert name in sp
