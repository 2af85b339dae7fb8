"""The OpenAI-compatible HTTP front door end to end, with the real ``openai`` client (sync, async, streaming),
on one real stack: local Ray, embedded Valkey, the cache service, two demo workers, the router serving gRPC
and HTTP on one loop. A second router with auth runs over the same two workers (a cheap thread).

Expected hit counts are computed from the rendered prompts (the demo template, the byte tokenizer) and the
cache's rules: full blocks of 16 only, never the block holding the prompt's last token
(``num_reusable_blocks``), and a finished request leaves its prompt + all but its last generated token
cached. Greedy output must be the gRPC edge's, token for token.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache_service.block_hash import num_reusable_blocks
from deploy.stack import Stack, StackConfig
from protos.prefixcache.v1 import generation_pb2 as pb
from protos.prefixcache.v1 import generation_pb2_grpc
from router.auth import TokenAuth
from router.chat_template import load_chat_template
from router.ray_client import RayWorkerClient
from router.server import RouterConfig, RouterThread, WorkerEndpoint, wait_until
from workers.model import load_tokenizer

pytestmark = pytest.mark.timeout(300)

BS = 16
TEMPLATE = load_chat_template("demo")
TOKENIZER = load_tokenizer("demo")


@pytest.fixture(scope="module")
def stack():
    with Stack(StackConfig(num_workers=2, port=0, metrics_port=0, http_port=0, cache_service_port=0, num_blocks=256,
                           block_size=BS, max_num_seqs=16)) as s:
        yield s


@pytest.fixture(scope="module")
def auth_router(stack):
    endpoints = [WorkerEndpoint(RayWorkerClient(w, h), stack.worker_infos[w].node_id,
                                stack.worker_infos[w].transfer_address) for w, h in stack.workers.items()]
    r = RouterThread(RouterConfig(block_size=BS, port=0, metrics_port=None, http_port=0,
                                  cache_service_address=stack.cache_service_address,
                                  auth=TokenAuth({"tok-a": "alpha", "tok-b": "beta"})), endpoints)
    r.start()
    yield r
    r.stop()


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=url(stack.router_server) + "/v1", api_key="unused", max_retries=0, timeout=60)


def rendered_ids(messages: list[dict]) -> list[int]:
    return TOKENIZER.encode(TEMPLATE.render(messages), add_special_tokens=TEMPLATE.add_special_tokens)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_hit(prompt: list[int], cached: list[int]) -> int:
    """Cached tokens a prompt reports against a worker holding ``cached``'s full blocks."""
    return min(common_prefix(prompt, cached) // BS, num_reusable_blocks(len(prompt), BS)) * BS


def chat(client, messages, **kw):
    return client.chat.completions.create(model="demo", messages=messages, temperature=0, **kw)


def test_chat_completion(client):
    r = chat(client, [{"role": "user", "content": "Say hi."}], max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(rendered_ids(
        [{"role": "user", "content": "Say hi."}])), 5, u.prompt_tokens + 5)
    assert u.prompt_tokens_details.cached_tokens == 0


def test_shared_system_prompt_hits_from_a_second_session(client):
    system = {"role": "system", "content": "You are a patient tutor for distributed systems. " * 6}
    first = [system, {"role": "user", "content": "Hi!"}]
    second = [system, {"role": "user", "content": "What is a KV cache?"}]
    r1 = chat(client, first, max_tokens=4, user="session-a")
    r2 = chat(client, second, max_tokens=4, user="session-b", extra_body={"return_token_ids": True})
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    ids1, ids2 = rendered_ids(first), rendered_ids(second)
    assert r2.model_extra["prompt_token_ids"] == ids2
    shared = common_prefix(ids1, ids2)  # BOS + "system: <prompt>\n\nuser: "
    assert shared > 300
    assert r2.usage.prompt_tokens_details.cached_tokens == expected_hit(ids2, ids1) == shared // BS * BS


def test_streamed_chat_with_usage(client):
    messages = [{"role": "user", "content": "Count to three, streamed."}]
    chunks = list(chat(client, messages, max_tokens=6, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *choice_chunks, closing, last = chunks
    assert closing.choices[0].finish_reason == "length" and all(c.usage is None for c in chunks[:-1])
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens == len(rendered_ids(messages))
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    streamed = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    unary = chat(client, messages, max_tokens=6, extra_body={"ignore_eos": True})
    assert streamed == unary.choices[0].message.content
    # Without include_usage: no usage chunk, and still the [DONE] end (the client would hang otherwise).
    plain = list(chat(client, messages, max_tokens=2, stream=True))
    assert plain[-1].choices[0].finish_reason is not None and plain[-1].usage is None


def test_three_turn_conversation_hits_all_but_the_new_message(client):
    messages = [{"role": "system", "content": "You answer questions about caches. Keep answers short. " * 3}]
    previous: list[int] | None = None
    last_answer: list[int] = []
    for turn, question in enumerate(["What is a prefix cache?", "And a block?", "Why 16 tokens?"], start=1):
        messages.append({"role": "user", "content": question})
        r = chat(client, messages, max_tokens=12, extra_body={"return_token_ids": True, "ignore_eos": True})
        prompt, answer = r.model_extra["prompt_token_ids"], r.choices[0].model_extra["token_ids"]
        assert prompt == rendered_ids(messages)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if previous is None:
            assert cached == 0
        else:
            # The template keeps turn k-1's prompt unchanged, so turn k starts with it and then the answer as the
            # client sent it back. The worker holds turn k-1's prompt + its answer but the last token, so turn k
            # hits all of that as far as the answer round-trips: all of it with a real model; with the demo's
            # random bytes, up to the first one that is not UTF-8 (the client only ever saw U+FFFD for it).
            assert prompt[: len(previous)] == previous
            assert cached == expected_hit(prompt, previous + last_answer[:-1])
            assert cached >= len(previous) // BS * BS  # at least all of the last turn's prompt
        previous, last_answer = prompt, answer
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def test_completions_with_text_and_token_ids(client):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    r = client.completions.create(model="demo", prompt=text, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    (choice,) = r.choices
    assert choice.model_extra["prompt_token_ids"] == TOKENIZER.encode(text)
    by_ids = client.completions.create(model="demo", prompt=TOKENIZER.encode(text), max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    assert by_ids.choices[0].model_extra["token_ids"] == choice.model_extra["token_ids"]
    assert by_ids.choices[0].text == choice.text
    assert by_ids.usage.prompt_tokens_details.cached_tokens == expected_hit(TOKENIZER.encode(text),
                                                                            TOKENIZER.encode(text))
    streamed = list(client.completions.create(model="demo", prompt=text, max_tokens=6, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[0].choices[0].model_extra["prompt_token_ids"] == TOKENIZER.encode(text)
    assert [t for c in streamed for t in c.choices[0].model_extra["token_ids"]] == choice.model_extra["token_ids"]


def test_greedy_output_equals_the_grpc_edge(stack, client):
    prompt = "Prefix caching saves prefill work: " * 4
    messages = [{"role": "user", "content": "Explain prefix caching in one line."}]
    with grpc.insecure_channel(stack.router_address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        sampling = pb.SamplingParams(max_tokens=16, ignore_eos=True)
        g_text = stub.Generate(pb.GenerateRequest(text=prompt, sampling=sampling), timeout=60)
        g_chat = stub.Generate(pb.GenerateRequest(token_ids=rendered_ids(messages), sampling=sampling), timeout=60)
    extra = {"return_token_ids": True, "ignore_eos": True}
    h_text = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0, extra_body=extra)
    assert h_text.choices[0].model_extra["token_ids"] == list(g_text.token_ids)
    assert h_text.choices[0].text == g_text.text
    h_chat = chat(client, messages, max_tokens=16, extra_body=extra)
    assert h_chat.choices[0].model_extra["token_ids"] == list(g_chat.token_ids)
    assert h_chat.choices[0].message.content == g_chat.text


def test_async_client(stack):
    async def go():
        async with openai.AsyncOpenAI(base_url=url(stack.router_server) + "/v1", api_key="unused",
                                      max_retries=0, timeout=60) as aclient:
            messages = [{"role": "user", "content": "Async hello."}]
            one, two = await asyncio.gather(*(aclient.chat.completions.create(
                model="demo", messages=messages, max_tokens=4, temperature=0) for _ in range(2)))
            stream = await aclient.chat.completions.create(model="demo", messages=messages, max_tokens=4,
                                                           temperature=0, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return one, two, streamed

    one, two, streamed = asyncio.run(go())
    assert one.choices[0].message.content == two.choices[0].message.content == streamed


def test_auth_and_tenants_never_share_cached_tokens(auth_router):
    base = url(auth_router.server) + "/v1"
    alpha = openai.OpenAI(base_url=base, api_key="tok-a", max_retries=0, timeout=60)
    beta = openai.OpenAI(base_url=base, api_key="tok-b", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="nope", max_retries=0).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}])
    messages = [{"role": "system", "content": "A prompt both tenants send, word for word. " * 8},
                {"role": "user", "content": "Same question."}]
    full = expected_hit(rendered_ids(messages), rendered_ids(messages))
    # One worker for all: a hit could only come from the other tenant's blocks. A client salt of the other
    # tenant's name does not help either: the salt is derived server-side from the token.
    same_worker = {"target_worker": "worker-0"}
    a1 = chat(alpha, messages, max_tokens=2, extra_body=same_worker)
    a2 = chat(alpha, messages, max_tokens=2, extra_body=same_worker)
    b1 = chat(beta, messages, max_tokens=2, extra_body={**same_worker, "cache_salt": ""})
    b2 = chat(beta, messages, max_tokens=2, extra_body=same_worker)
    assert a1.usage.prompt_tokens_details.cached_tokens == 0
    assert a2.usage.prompt_tokens_details.cached_tokens == full > 0
    assert b1.usage.prompt_tokens_details.cached_tokens == 0
    assert b2.usage.prompt_tokens_details.cached_tokens == full


def test_a_client_that_disconnects_mid_stream_aborts_its_request(stack):
    server = stack.router_server
    body = {"model": "demo", "prompt": "Stream a long answer, then I hang up. ", "max_tokens": 3000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url(server) + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
        # Leaving the block closes the connection with the request far from done.
    assert wait_until(lambda: server.dispatcher.num_in_flight == 0, 30)
    metrics = httpx.get(url(server) + "/metrics", timeout=10).text
    aborted = [s for s in samples(metrics) if s.name == "prefixcache_requests_total"
               and s.labels.get("status") == "aborted"]
    assert sum(s.value for s in aborted) >= 1


def test_models_health_metrics(stack, client):
    assert [m.id for m in client.models.list()] == ["demo"]
    server = stack.router_server
    assert httpx.get(url(server) + "/health", timeout=10).json() == {"status": "ok"}
    via_http = httpx.get(url(server) + "/metrics", timeout=10).text
    via_metrics_port = httpx.get(stack.metrics_url, timeout=10).text
    names = {s.name for s in samples(via_http)}
    assert names == {s.name for s in samples(via_metrics_port)}  # one registry, two ports
    assert "prefixcache_prefix_cache_hits_tokens_total" in names


def test_bench_drives_the_http_endpoint_as_grpc(stack, tmp_path):
    """`prefixcache bench --endpoint http`: a multi-turn workload through /v1/completions feeds the generated
    answers back (token ids via return_token_ids) and measures what the gRPC driver measures."""
    from deploy import cli

    def bench(endpoint: str, target: str) -> dict:
        out = tmp_path / endpoint
        assert cli.main(["bench", "--no-progress", "--out", str(out), "--endpoint", endpoint, "--target", target,
                         "--workload", "multi-turn", "--requests", "6", "--scale", str(1 / 16), "--time-scale",
                         "0.01", "--param", "num_turns=3", "--policy-label", "chat", "--seed", "5"]) == 0
        result = json.loads((out / "chat.json").read_text())
        assert result["meta"]["endpoint"] == endpoint and result["summary"]["num_ok"] == 6
        return {r["request_id"].split("-", 1)[1]: r for r in result["requests"]}

    http = bench("http", f"127.0.0.1:{stack.router_server.http_port}")
    prompt_lengths = {k: r["prompt_tokens"] for k, r in http.items()}
    for s in range(2):
        for k in (1, 2):
            prev, cur = http[f"chat-{s}-{k - 1}"], http[f"chat-{s}-{k}"]
            assert cur["prompt_tokens"] > prev["prompt_tokens"] + prev["completion_tokens"]
            assert cur["cached_tokens"] >= prev["prompt_tokens"] // BS * BS, (prev, cur)
            assert cur["ttft_s"] > 0 and cur["finish_reason"] == "length"
    grpc_rows = bench("grpc", stack.router_address)  # same seed: the same sessions, greedy: the same answers
    assert {k: r["prompt_tokens"] for k, r in grpc_rows.items()} == prompt_lengths
    assert {k: r["completion_tokens"] for k, r in grpc_rows.items()} == {k: r["completion_tokens"]
                                                                         for k, r in http.items()}
