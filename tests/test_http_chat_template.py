"""Chat templates render exactly as ``transformers``' ``apply_chat_template`` (text and token ids), on the
templates of the three families the tiny checkpoints carry; the prefix-stability check that multi-turn cache
reuse depends on; templates as untrusted code (the sandbox); and the OpenAI message forms."""

from __future__ import annotations

import pytest

from router.chat_template import (ChatTemplate, ChatTemplateError, check_prefix_stable, load_chat_template,
                                  probe_template)
from router.openai_request import OpenAIRequestError, parse_chat
from tests.model_fixtures import build_tiny_checkpoint, write_chat_template
from workers.model import load_tokenizer

pytestmark = pytest.mark.timeout(300)

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "hello there"}],
    "system + user": [SYSTEM, {"role": "user", "content": "what is a cache?"}],
    "three turns": [SYSTEM, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello, how can I help?"},
                    {"role": "user", "content": "the block size?"},
                    {"role": "assistant", "content": " sixteen tokens "},
                    {"role": "user", "content": "and the hash?\nxxh3"}],
}
# (architecture, template style, template in chat_template.jinja rather than tokenizer_config.json)
FAMILIES = [("llama3", "llama3", False), ("mistral", "mistral", True), ("qwen2", "qwen2", False)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for arch, style, as_file in FAMILIES:
        folder = build_tiny_checkpoint(root, arch)
        write_chat_template(folder, style, as_file=as_file)
        out[style] = folder
    return out


def conversation(style: str, name: str) -> list[dict]:
    msgs = CONVERSATIONS[name]
    return [m for m in msgs if m["role"] != "system"] if style == "mistral" else msgs  # [INST] has no system role


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("style", [f[1] for f in FAMILIES])
def test_rendering_equals_transformers(checkpoints, style, name):
    from transformers import AutoTokenizer

    folder = checkpoints[style]
    hf = AutoTokenizer.from_pretrained(str(folder))
    template = load_chat_template(str(folder))
    assert template is not None and template.add_special_tokens is False
    msgs = conversation(style, name)
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert template.render(msgs, add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = load_tokenizer(str(folder)).encode(template.render(msgs), add_special_tokens=template.add_special_tokens)
    assert ids == list(expected_ids)


def test_template_sources(checkpoints):
    assert load_chat_template(str(checkpoints["mistral"])).origin.endswith("chat_template.jinja")
    assert load_chat_template(str(checkpoints["qwen2"])).origin.endswith("tokenizer_config.json")
    assert load_chat_template(str(checkpoints["llama3"])).special_tokens["bos_token"] == "<s>"
    demo = load_chat_template("demo")
    assert demo.add_special_tokens and demo.render([SYSTEM, {"role": "user", "content": "hi"}]) == (
        "system: You are a terse assistant. Answer in one line.\n\nuser: hi\n\nassistant: ")


def test_checkpoint_without_template(tmp_path):
    assert load_chat_template(str(build_tiny_checkpoint(tmp_path, "llama"))) is None


def test_raise_exception_is_the_requests_error(checkpoints):
    template = load_chat_template(str(checkpoints["mistral"]))
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([SYSTEM, {"role": "user", "content": "hi"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of what the server passed in
])
def test_templates_are_sandboxed(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])


def test_tojson_and_generation_tag_as_transformers():
    t = ChatTemplate("{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}", {})
    assert t.render([{"role": "user", "content": "<é>"}]) == '{"role": "user", "content": "<é>"}'


@pytest.mark.parametrize("style", [f[1] for f in FAMILIES])
def test_templates_keep_earlier_turns_unchanged(checkpoints, style):
    folder = checkpoints[style]
    template = load_chat_template(str(folder))
    system = None if style == "mistral" else "You are a helpful assistant."
    check = check_prefix_stable(template, load_tokenizer(str(folder)).encode, system=system)
    assert check.stable, check.detail


def test_the_startup_probe_copes_with_a_template_that_refuses_system_messages(checkpoints):
    folder = checkpoints["mistral"]
    assert probe_template(load_chat_template(str(folder)), load_tokenizer(str(folder)).encode).stable
    refuses_all = ChatTemplate("{{ raise_exception('no') }}", {})
    check = probe_template(refuses_all, load_tokenizer("demo").encode)
    assert not check.stable and "could not be rendered" in check.detail


def test_an_hf_checkpoint_behind_the_http_door(checkpoints, tmp_path):
    """A router over a checkpoint (no workers: what happens before dispatch): the folder's name is the model
    id, the template's own refusal is a 400 naming it, and a checkpoint without a template refuses chats."""
    import openai

    from router.server import RouterConfig, RouterThread

    def router(model: str) -> RouterThread:
        r = RouterThread(RouterConfig(model=model, port=0, metrics_port=None, http_port=0), [])
        r.start()
        return r

    mistral, plain = router(str(checkpoints["mistral"])), router(str(build_tiny_checkpoint(tmp_path, "llama")))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{mistral.server.http_port}/v1", api_key="x", max_retries=0)
        name = checkpoints["mistral"].name
        assert [m.id for m in c.models.list()] == [name]
        with pytest.raises(openai.BadRequestError, match="Conversation roles must alternate") as err:
            c.chat.completions.create(model=name, messages=[SYSTEM, {"role": "user", "content": "hi"}])
        assert err.value.body["param"] == "messages"
        with pytest.raises(openai.InternalServerError):  # rendered and valid: refused only for want of a worker
            c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{plain.server.http_port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="this model has no chat template"):
            c.chat.completions.create(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "hi"}])
    finally:
        mistral.stop()
        plain.stop()


def test_demo_template_keeps_earlier_turns_unchanged():
    check = check_prefix_stable(load_chat_template("demo"), load_tokenizer("demo").encode)
    assert check.stable, check.detail


def test_prefix_check_catches_a_template_that_drops_earlier_reasoning():
    # Qwen3-style: earlier assistant turns lose their <think> part, so turn k no longer starts with what the
    # model generated in turn k-1 and the cache stops at the start of that answer.
    strip = ChatTemplate(
        "{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", {})
    check = check_prefix_stable(strip, load_tokenizer("demo").encode, conversation=(
        ("user", "hi"), ("assistant", "<think>Greet back.</think>Hello!"), ("user", "bye")))
    assert not check.stable and check.turn == 2 and "recomputed" in check.detail


def test_openai_message_forms():
    body = {"model": "demo", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None},
    ]}
    req = parse_chat(body, "demo")
    assert req.messages == [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "q", "name": "ann"},
                            {"role": "assistant", "content": ""}]
    # OpenAI's defaults: temperature 1; max_tokens set once the prompt's length is known (generate_args).
    assert req.args.temperature == 1.0 and req.args.max_tokens is None
    both = parse_chat({**body, "max_tokens": 5, "max_completion_tokens": 7, "user": "u-1", "top_k": -1}, "demo")
    assert (both.args.max_tokens, both.args.session_id, both.args.top_k) == (7, "u-1", 0)
    with pytest.raises(OpenAIRequestError, match="messages is required"):
        parse_chat({"model": "demo"}, "demo")
    with pytest.raises(OpenAIRequestError, match=r"messages\[0\].content must be a string or a list of text parts"):
        parse_chat({"messages": [{"role": "user", "content": 3}]}, "demo")
    # Parameters we cannot honour are refused unless set to their no-op value.
    assert parse_chat({**body, "logprobs": False, "presence_penalty": 0, "tool_choice": "none"}, "demo")
    with pytest.raises(OpenAIRequestError, match="logprobs is not supported"):
        parse_chat({**body, "logprobs": True}, "demo")
