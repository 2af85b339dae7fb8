"""OpenAI request bodies (chat completions, completions) -> plain records, with errors that name the field.

    body bytes --decode_body--> dict --parse_chat / parse_completion--> OpenAIRequest
    OpenAIRequest --generate_args(encoder, template)--> GenerateArgs   (then router/validation.py, as gRPC)

Only the OpenAI shape is checked here (types, which fields, n=1, the model name); the sampling values are
checked by ``validate_generate``, the same function the gRPC edge uses, so both edges accept and refuse the
same requests. Parameters we cannot honour are refused when set to anything but their no-op value (a client
asking for tools or logprobs must not silently get an answer without them); fields this server does not know
are ignored, as vLLM does, so newer clients keep working.

Extensions (vLLM's ``extra_body`` style): ``top_k`` (-1 or 0: off), ``ignore_eos``, ``cache_salt``,
``session_id`` (``user`` when absent: sticky routing per end user), ``target_worker``, ``return_token_ids``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cache_service.records import InvalidRequestError
from router.chat_template import ChatTemplate, ChatTemplateError
from router.tokenize import PromptEncoder
from router.validation import GenerateArgs

ROLES = ("system", "user", "assistant")

# Known parameters we do not implement, with the value that means "not used": anything else is refused.
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}
_UNSUPPORTED_CHAT = {**_UNSUPPORTED_COMMON, "tools": (None, []), "functions": (None, []),
                     "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
                     "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
                     "prediction": (None,)}
_UNSUPPORTED_COMPLETION = {**_UNSUPPORTED_COMMON, "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1)}


class OpenAIRequestError(InvalidRequestError):
    """A request this server cannot serve as given; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(OpenAIRequestError):
    """The body names a model this server does not serve (404)."""


@dataclass(slots=True)
class OpenAIRequest:
    chat: bool
    # The sampling fields and extensions as the gRPC edge has them (OpenAI's defaults applied); a completion's
    # prompt too. A chat's prompt is its messages, rendered by ``generate_args``.
    args: GenerateArgs
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role, content (text), name
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


# ---- the body -----------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (``OpenAIRequestError`` for anything else)."""
    if not raw.strip():
        raise OpenAIRequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except UnicodeDecodeError:
        raise OpenAIRequestError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise OpenAIRequestError("the request body is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise OpenAIRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIRequestError(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def parse_chat(body: dict[str, Any], served_model: str) -> OpenAIRequest:
    req = _parse_common(body, served_model, chat=True, unsupported=_UNSUPPORTED_CHAT)
    req.messages = _parse_messages(body.get("messages"))
    # The newer name wins (OpenAI deprecated max_tokens for chat); either must be positive.
    max_completion = _opt_positive_int(body, "max_completion_tokens")
    if max_completion is not None:
        req.args.max_tokens = max_completion
    return req


def parse_completion(body: dict[str, Any], served_model: str) -> OpenAIRequest:
    req = _parse_common(body, served_model, chat=False, unsupported=_UNSUPPORTED_COMPLETION)
    req.args.text, req.args.token_ids = _parse_prompt(body.get("prompt"))
    return req


def generate_args(req: OpenAIRequest, encoder: PromptEncoder, template: ChatTemplate | None,
                  request_id: str = "") -> GenerateArgs:
    """The request as the router's ``GenerateArgs``. A chat is rendered and tokenized here (its prompt
    length sets the default ``max_tokens``: whatever the context leaves, as OpenAI's chat API does); a
    completion defaults to the gRPC default (16, as OpenAI's completions API)."""
    args = req.args
    args.request_id = request_id
    if req.chat:
        if template is None:
            raise OpenAIRequestError("this model has no chat template (tokenizer_config.json 'chat_template' or "
                                     "chat_template.jinja): use /v1/completions with a prompt", "messages")
        try:
            rendered = template.render(req.messages)
        except ChatTemplateError as exc:
            raise OpenAIRequestError(str(exc), "messages") from None
        args.token_ids = encoder.tokenizer.encode(rendered, add_special_tokens=template.add_special_tokens)
        if args.max_tokens is None:
            args.max_tokens = max(1, encoder.info.max_context - len(args.token_ids))
    return args


# Words that lead validate_generate's messages and are the body's field names: the error's ``param``.
_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "cache_salt", "session_id",
           "target_worker", "request_id")


def param_of(message: str, chat: bool) -> str | None:
    """The field a validation message is about (``validate_generate`` words them "<field> must ...")."""
    word = message.split(" ", 1)[0]
    if word in _PARAMS:
        return word
    if message.startswith(("the prompt", "token id", "prompt (", "no prompt", "both text")):
        return "messages" if chat else "prompt"
    return None


# ---- parts ------------------------------------------------------------------------------------------------------
def _parse_common(body: dict[str, Any], served_model: str, *, chat: bool,
                  unsupported: dict[str, tuple[Any, ...]]) -> OpenAIRequest:
    model = _opt_str(body, "model")
    # A missing model means the one served (vLLM's leniency: curl users forget it); a wrong one is a 404.
    if model is not None and model != served_model:
        raise ModelNotFoundError(f"the model {model!r} does not exist: this server serves {served_model!r}", "model")
    for name, no_ops in unsupported.items():
        if name in body and not any(_same(body[name], v) for v in no_ops):
            raise OpenAIRequestError(f"{name} is not supported by this server", name)
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise OpenAIRequestError(f"n={n} is not supported: only one choice per request (n=1)", "n")
    stream = bool(_opt_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise OpenAIRequestError("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict):
            raise OpenAIRequestError(f"stream_options must be an object, got {_json_type(options)}", "stream_options")
        include_usage = bool(_opt_bool(options, "include_usage", "stream_options.include_usage"))
    top_k = _opt_int(body, "top_k")
    temperature = _opt_number(body, "temperature")
    args = GenerateArgs(
        max_tokens=_opt_positive_int(body, "max_tokens"),
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default (gRPC's unset is greedy)
        top_p=_opt_number(body, "top_p"), top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM: -1 is off
        seed=_opt_int(body, "seed"), stop=_parse_stop(body.get("stop")),
        ignore_eos=bool(_opt_bool(body, "ignore_eos")), cache_salt=_opt_str(body, "cache_salt") or "",
        target_worker=_opt_str(body, "target_worker") or "",
        session_id=_opt_str(body, "session_id") or _opt_str(body, "user") or "",
    )
    return OpenAIRequest(chat=chat, args=args, stream=stream, include_usage=include_usage,
                         return_token_ids=bool(_opt_bool(body, "return_token_ids")))


def _parse_messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise OpenAIRequestError("messages is required: a list of {role, content} objects", "messages")
    if not isinstance(value, list):
        raise OpenAIRequestError(f"messages must be a list, got {_json_type(value)}", "messages")
    if not value:
        raise OpenAIRequestError("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise OpenAIRequestError(f"{where} must be an object with role and content, got {_json_type(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise OpenAIRequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        message = {"role": role, "content": _parse_content(m.get("content"), role, f"{where}.content")}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise OpenAIRequestError(f"{where}.name must be a string, got {_json_type(name)}", f"{where}.name")
            message["name"] = name
        out.append(message)
    return out


def _parse_content(value: Any, role: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":  # an assistant turn that only called tools: no text
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise OpenAIRequestError(f"{where}[{j}] is a {kind!r} part: only text parts are supported", where)
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIRequestError(f"{where}[{j}].text must be a string, got {_json_type(text)}", where)
            texts.append(text)
        # Text-only models see one string: vLLM joins the parts with a newline as well.
        return "\n".join(texts)
    raise OpenAIRequestError(f"{where} must be a string or a list of text parts, got {_json_type(value)}", where)


def _parse_prompt(value: Any) -> tuple[str, list[int]]:
    if value is None:
        raise OpenAIRequestError("prompt is required: a string or a list of token ids", "prompt")
    # [one string] and [[token ids]] are a batch of one; a longer batch needs one request per prompt.
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) != 1:
            raise OpenAIRequestError(f"a batch of {len(value)} prompts is not supported: send one request per "
                                     "prompt", "prompt")
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise OpenAIRequestError("prompt must not be empty", "prompt")
        return value, []
    if isinstance(value, list):
        if not value:
            raise OpenAIRequestError("prompt must not be empty", "prompt")
        for pos, t in enumerate(value):
            if isinstance(t, bool) or not isinstance(t, int):
                raise OpenAIRequestError(f"prompt must be a string or a list of integer token ids; position {pos} "
                                         f"is {_json_type(t)}", "prompt")
        return "", list(value)
    raise OpenAIRequestError(f"prompt must be a string or a list of token ids, got {_json_type(value)}", "prompt")


def _parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise OpenAIRequestError(f"stop must be a string or a list of strings, got {_json_type(value)}", "stop")


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenAIRequestError(f"{name} must be an integer, got {_json_type(value)}", name)
    return value


def _opt_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = _opt_int(body, name)
    if value is not None and value <= 0:
        raise OpenAIRequestError(f"{name} must be a positive integer, got {value} (leave it unset for the default)",
                                 name)
    return value


def _opt_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OpenAIRequestError(f"{name} must be a number, got {_json_type(value)}", name)
    return float(value)


def _opt_bool(body: dict[str, Any], name: str, where: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise OpenAIRequestError(f"{where or name} must be true or false, got {_json_type(value)}", where or name)


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise OpenAIRequestError(f"{name} must be a string, got {_json_type(value)}", name)


def _same(a: Any, b: Any) -> bool:
    # bool is an int in Python: False must not match 0 by accident where the types differ in JSON.
    return type(a) is type(b) and a == b or (a is None and b is None)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return "a list"
    return "an object"
