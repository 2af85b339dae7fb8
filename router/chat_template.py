"""Chat templates: messages -> the prompt text a chat model was trained on, rendered as Hugging Face does.

    template = load_chat_template("path/to/checkpoint")      # or "demo": the built-in template
    text = template.render([{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(text, add_special_tokens=template.add_special_tokens)

Where the template comes from (as ``transformers`` looks for it): ``chat_template`` in tokenizer_config.json
(a string, or a list of named templates of which "default" is used), else a ``chat_template.jinja`` file in
the model folder. Rendering follows ``transformers``' ``apply_chat_template`` exactly, so that the prompt is
token for token what the model saw in training: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``raise_exception`` / ``strftime_now`` / ``namespace`` / ``dict`` globals, the ``tojson`` filter
(no HTML escaping), the ``{% generation %}`` tag, the tokenizer's special tokens as variables (bos_token,
eos_token, ...), ``add_generation_prompt=True``, and the text tokenized without added special tokens (the
template writes them). Templates are untrusted code from a checkpoint: the sandbox forbids attribute
access to Python internals, and a template error becomes the request's error, never the server's.

Cache reuse across turns (``check_prefix_stable``): turn k of a conversation hits the cache for everything
before its new message only if the template renders the earlier turns exactly as it rendered them before,
i.e. ``render(turns[:k-1], gen prompt) + answer`` is a prefix of ``render(turns[:k], gen prompt)``. Templates
that rewrite history (drop earlier reasoning, move the system message, stamp today's date) break this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEMO = "demo"

# The demo model has a byte tokenizer that cannot read special tokens out of text, so its template writes
# plain-text role markers and the tokenizer adds BOS (``add_special_tokens=True``).
DEMO_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template rejected the messages (its ``raise_exception``) or failed on them."""


class NoChatTemplateError(ValueError):
    """The model ships no chat template."""


@dataclass(slots=True, frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    add_special_tokens: bool = False  # when tokenizing the rendered text (True only for the demo)
    origin: str = ""  # where it was read from, for messages

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        template = _compile(self.source)
        try:
            return template.render(messages=list(messages), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception(...), or undefined names, or a sandbox refusal
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a template bug on this input (a TypeError, ...): the request's error
            raise ChatTemplateError(
                f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None


def load_chat_template(model: str) -> ChatTemplate | None:
    """The model's chat template, the built-in one for the demo, or None when the checkpoint has none."""
    if model == DEMO:
        return ChatTemplate(DEMO_TEMPLATE, {"bos_token": "", "eos_token": ""}, add_special_tokens=True,
                            origin="built-in")
    folder = Path(model).expanduser()
    config = _read_json(folder / "tokenizer_config.json")
    specials = _read_json(folder / "special_tokens_map.json")
    specials.update({k: v for k, v in config.items() if k in SPECIAL_TOKEN_NAMES})
    tokens = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(specials.get(name))) is not None}
    source = _template_from_config(config.get("chat_template"))
    origin = str(folder / "tokenizer_config.json")
    if source is None and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        origin = str(folder / "chat_template.jinja")
    if source is None:
        return None
    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template in {origin} does not parse: {exc}") from None
    return ChatTemplate(source, tokens, add_special_tokens=False, origin=origin)


# ---- multi-turn cache reuse -------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class PrefixCheck:
    stable: bool
    turn: int = 0  # the first turn whose prompt does not extend the previous one (0: none)
    detail: str = ""


PROBE_SYSTEM = "You are a helpful assistant."
PROBE_CONVERSATION: tuple[tuple[str, str], ...] = (
    ("user", "What is a KV cache?"),
    ("assistant", "It stores the attention keys and values of earlier tokens."),
    ("user", "Why does it help?"),
    ("assistant", "Later tokens reuse them instead of recomputing."),
    ("user", "Thanks!"),
)


def check_prefix_stable(template: ChatTemplate, encode: Callable[[str, bool], list[int]],
                        conversation: Sequence[tuple[str, str]] = PROBE_CONVERSATION,
                        system: str | None = PROBE_SYSTEM) -> PrefixCheck:
    """Whether each turn's prompt tokens start with the previous turn's prompt tokens followed by its
    answer's tokens, so that a cache holding turn k-1 (prompt + generated answer) covers all of turn k but
    its new user message. ``encode(text, add_special_tokens)`` is the tokenizer's ``encode``."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
    previous: list[int] | None = None
    answer: list[int] = []
    turn = 0
    for role, content in conversation:
        messages.append({"role": role, "content": content})
        if role == "assistant":
            answer = encode(content, False)  # what the model generated, as token ids
            continue
        turn += 1
        ids = encode(template.render(messages), template.add_special_tokens)
        if previous is not None:
            expected = previous + answer
            if ids[: len(expected)] != expected:
                same = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
                return PrefixCheck(False, turn, f"turn {turn} differs from turn {turn - 1}'s prompt + answer at token "
                                                f"{same} of {len(expected)}: everything after it is recomputed")
        previous = ids
    return PrefixCheck(True)


def probe_template(template: ChatTemplate, encode: Callable[[str, bool], list[int]]) -> PrefixCheck:
    """``check_prefix_stable`` on the probe conversation, with a system message and, for templates that
    refuse one (Mistral's [INST] raises), without; a template that refuses both is reported, not raised."""
    failure = ""
    for system in (PROBE_SYSTEM, None):
        try:
            return check_prefix_stable(template, encode, system=system)
        except ChatTemplateError as exc:
            failure = str(exc)
    return PrefixCheck(False, 0, f"the probe conversation could not be rendered ({failure})")


# ---- rendering environment, as transformers builds it ---------------------------------------------------------
def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '): chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names, as transformers' (no way to Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    """``dict(...)`` in a template, without the attribute access to the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering keeps
    the body as it is (transformers' AssistantTracker does the same when not tracking)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _TemplateDict()
    return env


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return raw if isinstance(raw, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken: {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None
