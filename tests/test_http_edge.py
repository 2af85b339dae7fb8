"""The HTTP front door's refusals, with the real ``openai`` client and raw HTTP, on routers without workers.

Every refusal here happens before a request reaches a worker (auth, body, JSON, OpenAI shape, validation,
the in-flight cap, no live worker), so these routers need no Ray and start at once. What a worker does
with accepted requests is tests/test_http_serving.py's.
"""

from __future__ import annotations

import json
import socket

import httpx2 as httpx
import openai
import pytest

from deploy.serve import add_arguments, config_from_args
from router.auth import TokenAuth
from router.server import RouterConfig, RouterThread

pytestmark = pytest.mark.timeout(120)

CHAT = [{"role": "user", "content": "Hi"}]


def start_router(**overrides) -> RouterThread:
    router = RouterThread(RouterConfig(port=0, metrics_port=None, http_port=0, **overrides), [])
    router.start()
    return router


@pytest.fixture(scope="module")
def router():
    r = start_router()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def auth_router():
    r = start_router(auth=TokenAuth({"tok-a": "alpha"}))
    yield r
    r.stop()


def base_url(router: RouterThread) -> str:
    return f"http://127.0.0.1:{router.server.http_port}"


def client(router: RouterThread, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(router) + "/v1", api_key=api_key, max_retries=0)


def post_raw(router: RouterThread, path: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(base_url(router) + path, content=body,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=10)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(max_tokens=0), "max_tokens", "max_tokens must be a positive integer"),
    (dict(max_completion_tokens=-3), "max_completion_tokens", "max_completion_tokens must be a positive integer"),
    (dict(top_p=2), "top_p", "top_p must be in (0, 1]"),
    (dict(temperature=-1), "temperature", "temperature must be >= 0"),
    (dict(n=2), "n", "n=2 is not supported"),
    (dict(messages=[]), "messages", "messages must not be empty"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "must be one of system, user, assistant"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content", "only text parts are supported"),
    (dict(extra_body={"top_k": -5}), "top_k", "top_k must be an integer >= 0"),
    (dict(extra_body={"target_worker": "worker-9"}), "target_worker", "unknown target_worker 'worker-9'"),
    (dict(extra_body={"cache_salt": "s" * 300}), "cache_salt", "cache_salt is 300 characters long"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tools is not supported"),
    (dict(stop=["a", 3]), "stop", "stop must be a string or a list of strings"),
])
def test_bad_chat_requests_are_400s_naming_the_field(router, kwargs, param, words):
    args = {"model": "demo", "messages": CHAT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(router).chat.completions.create(**args)
    assert err.value.status_code == 400
    assert words in err.value.message
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(router):
    with pytest.raises(openai.NotFoundError) as err:
        client(router).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert "the model 'gpt-4o' does not exist" in err.value.message and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(router).models.retrieve("gpt-4o")
    assert client(router).models.retrieve("demo").id == "demo"


def test_bad_completion_prompts_are_400s(router):
    c = client(router)
    for prompt, words in [([1, 99999], "token id 99999 at position 1 is outside the vocabulary"),
                          (["a", "b"], "a batch of 2 prompts is not supported"),
                          ("", "prompt must not be empty"),
                          ([1, "x"], "position 1 is the string 'x'")]:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="demo", prompt=prompt, max_tokens=2)
        assert words in err.value.message, err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="demo", prompt="x", max_tokens=5000)
    assert "exceeds the model's context length of 4096 tokens" in err.value.message


@pytest.mark.parametrize("body, words", [
    (b"{bad", "the request body is not valid JSON"),
    (b"", "the request body is empty"),
    (b"[1, 2]", "must be a JSON object, got a list"),
    (b'{"prompt": "x", "max_tokens": NaN}', "NaN is not valid JSON"),
    (b"\xff\xfe\xfa", "not UTF-8"),
    (b"[" * 200_000, "nested too deeply"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens must be an integer, got the string '5'"),
    (b'{"prompt": "x", "temperature": true}', "temperature must be a number, got the boolean true"),
    (b'{"prompt": "x", "stream": "yes"}', "stream must be true or false"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options is only allowed with stream=true"),
    (b'{"prompt": {"a": 1}}', "prompt must be a string or a list of token ids, got an object"),
])
def test_undecodable_and_mistyped_bodies_are_400s_never_422s_or_tracebacks(router, body, words):
    r = post_raw(router, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert words in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_body_size_is_bounded(router):
    # The declared length alone is refused, before any of the body is read.
    with socket.create_connection(("127.0.0.1", router.server.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 9437184\r\n\r\n")
        data = b""
        while b"accepted" not in data and (part := s.recv(65536)):  # head and body may come apart
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"at most 8388608 are accepted" in body


def test_unknown_routes_and_methods_answer_in_openai_shape(router):
    r = httpx.get(base_url(router) + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(base_url(router) + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    for path in ("/docs", "/openapi.json", "/redoc"):  # nothing but the API on a client-facing port
        assert httpx.get(base_url(router) + path, timeout=10).status_code == 404


def test_no_live_worker_is_a_503_and_health_says_so(router):
    with pytest.raises(openai.InternalServerError) as err:
        client(router).completions.create(model="demo", prompt="hello", max_tokens=2)
    assert err.value.status_code == 503 and err.value.body["code"] == "no_live_worker"
    with pytest.raises(openai.InternalServerError) as err:  # a stream fails with its status too: nothing was sent
        list(client(router).chat.completions.create(model="demo", messages=CHAT, max_tokens=2, stream=True))
    assert err.value.status_code == 503
    r = httpx.get(base_url(router) + "/health", timeout=10)
    assert r.status_code == 503 and error_of(r)["code"] == "no_live_worker"


def test_in_flight_cap_is_a_429():
    r = start_router(max_in_flight=0)
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client(r).completions.create(model="demo", prompt="hello", max_tokens=2)
        assert err.value.status_code == 429 and "limit of 0 requests in flight" in err.value.message
    finally:
        r.stop()


def test_auth_who_may_call_what(auth_router):
    with pytest.raises(openai.AuthenticationError) as err:
        client(auth_router, api_key="wrong").chat.completions.create(model="demo", messages=CHAT)
    assert "invalid bearer token" in err.value.message
    r = post_raw(auth_router, "/v1/chat/completions", b"{bad")  # no token at all: 401 before the body is read
    assert r.status_code == 401 and "missing bearer token" in error_of(r)["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        client(auth_router, api_key="wrong").models.list()
    assert [m.id for m in client(auth_router, api_key="tok-a").models.list()] == ["demo"]
    with pytest.raises(openai.BadRequestError):  # a tenant's bad request: validated after auth
        client(auth_router, api_key="tok-a").chat.completions.create(model="demo", messages=CHAT, max_tokens=0)
    # Health stays open (load balancers); metrics carry every tenant's labels: not on this port with auth on.
    assert httpx.get(base_url(auth_router) + "/health", timeout=10).status_code == 503  # no worker, but answered
    r = httpx.get(base_url(auth_router) + "/metrics", headers={"authorization": "Bearer tok-a"}, timeout=10)
    assert r.status_code == 403 and "metrics port" in error_of(r)["message"]


def test_metrics_without_auth_and_refusals_counted(router):
    r = httpx.get(base_url(router) + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    # The refused requests of this module were counted (worker "none"), as the gRPC edge counts its own.
    assert 'prefixcache_requests_total{status="error",tenant="default",worker="none"}' in r.text


def test_a_taken_http_port_fails_the_start_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        router = RouterThread(RouterConfig(port=0, metrics_port=None, http_port=port), [])
        with pytest.raises(RuntimeError, match=f"cannot bind the HTTP front door to 127.0.0.1:{port}"):
            router.start()


def test_serve_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = config_from_args(parser.parse_args([]))
    assert default.http_port == 8000 and default.served_model_name is None
    off = config_from_args(parser.parse_args(["--http-port", "0", "--served-model-name", "tiny"]))
    assert off.http_port is None and off.served_model_name == "tiny"
    with pytest.raises(ValueError, match="--http-port must be a port number"):
        config_from_args(parser.parse_args(["--http-port", "70000"]))


def test_served_model_name_is_what_clients_name():
    r = start_router(served_model_name="tiny-chat")
    try:
        assert [m.id for m in client(r).models.list()] == ["tiny-chat"]
        with pytest.raises(openai.NotFoundError):
            client(r).completions.create(model="demo", prompt="x", max_tokens=1)
        body = json.loads(post_raw(r, "/v1/completions", b'{"prompt": "x", "max_tokens": 0}').text)
        assert body["error"]["param"] == "max_tokens"  # a missing model means the served one (vLLM's leniency)
    finally:
        r.stop()


def test_error_mapping_keeps_worker_words_and_long_fields_out():
    from router.dispatch import RequestFailedError
    from router.http_app import map_error
    from router.openai_request import OpenAIRequestError

    failed = map_error(RequestFailedError("worker-0 failed the request: Traceback ... secret.py line 3"))
    assert failed.status == 500 and failed.body["error"]["code"] == "request_failed"
    assert "secret" not in failed.body["error"]["message"] and "not retried" in failed.body["error"]["message"]
    long = map_error(OpenAIRequestError("stop must be ... " + "x" * 100_000, "stop"))
    assert long.status == 400 and len(long.body["error"]["message"].encode()) <= 2048
    assert map_error(ValueError("a bug")) is None  # not a request's fault: the app's 500 handler, logged
