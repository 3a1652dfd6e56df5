"""OpenAI request bodies into cortex GenerateRequests, and generation chunks into OpenAI responses.

Only field names of the cortex.v1 messages are used (prompt.text/tokens/chat, sampling.*), so this
works on whichever message types cortex.v1 defines. What the engine cannot do (n > 1, logprobs,
penalties, tools) is refused with a 400 that names the field, never silently ignored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from common.proto.cortex.v1 import cortex_pb2 as cpb

from .errors import bad_request

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
MAX_STOP_STRINGS = 16

# Accepted only at their "off" value: the engine has no such feature.
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
}
WHY_UNSUPPORTED = {"logprobs": "the engine returns no log-probabilities", "top_logprobs": "the engine returns no "
                   "log-probabilities", "echo": "prompts are not echoed", "best_of": "one sequence per request",
                   "suffix": "no insertion", "presence_penalty": "use repetition_penalty",
                   "frequency_penalty": "use repetition_penalty", "logit_bias": "not supported",
                   "tools": "no tool calling", "functions": "no tool calling",
                   "response_format": "no structured output"}


@dataclass
class Completion:
    """A parsed /v1/completions or /v1/chat/completions body."""
    chat: bool
    request: cpb.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        return self.request.model


def parse(body: object, chat: bool) -> Completion:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is missing: give the id of a loaded model (GET /v1/models lists them)", "model")
    _refuse_unsupported(body)
    n = body.get("n")
    if n not in (None, 1):
        raise bad_request(f"n = {n!r}: only n = 1 is supported (send separate requests for more choices)", "n")
    request = cpb.GenerateRequest(model=model)
    if chat:
        _set_messages(request, body.get("messages"))
    else:
        _set_prompt(request, body.get("prompt"))
    _set_sampling(request, body)
    stream = _optional(body, "stream", bool) or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    if include_usage and not stream:
        raise bad_request("stream_options is only allowed with stream = true", "stream_options")
    return Completion(chat, request, stream, include_usage)


def _refuse_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise bad_request(f"{name} = {body[name]!r} is not supported: {WHY_UNSUPPORTED[name]}; leave it out", name)


def _set_prompt(request: cpb.GenerateRequest, prompt: object) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty: give some text or token ids", "prompt")
        request.prompt.text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(not 0 <= t <= UINT32_MAX for t in prompt):
            raise bad_request("prompt token ids must be non-negative 32-bit integers", "prompt")
        request.prompt.tokens.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"prompt holds {len(prompt)} prompts: one prompt per request is supported", "prompt")
    else:
        raise bad_request("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def _set_messages(request: cpb.GenerateRequest, messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role and a content", f"messages[{i}]")
        added = request.prompt.chat.messages.add()
        added.role = message["role"]
        added.content = _content_text(message.get("content"), i)


def _content_text(content: object, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise bad_request(f"messages[{i}].content has parts of type {sorted(map(str, kinds - {'text'}))}: only "
                          "text parts are supported", f"messages[{i}].content")
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _set_sampling(request: cpb.GenerateRequest, body: dict) -> None:
    s = request.sampling
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    if max_tokens is not None:
        if not 1 <= max_tokens <= UINT32_MAX:
            raise bad_request(f"max_tokens = {max_tokens} must be at least 1", "max_tokens")
        s.max_tokens = max_tokens
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = _optional(body, name, float)
        if value is not None:
            setattr(s, name, value)
    top_k = _optional(body, "top_k", int)
    if top_k is not None:
        if top_k < -1 or top_k > UINT32_MAX:
            raise bad_request(f"top_k = {top_k} must be -1 or 0 (off) or a positive number of tokens", "top_k")
        s.top_k = max(top_k, 0)
    seed = _optional(body, "seed", int)
    if seed is not None:
        s.seed = seed % (UINT64_MAX + 1)  # OpenAI allows negative seeds; the engine takes 64 bits
    s.stop.extend(_stop_strings(body.get("stop")))
    ids = body.get("stop_token_ids")  # vLLM's extension
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t <= UINT32_MAX for t in ids):
            raise bad_request("stop_token_ids must be a list of token ids", "stop_token_ids")
        s.stop_token_ids.extend(ids)
    if _optional(body, "ignore_eos", bool):  # vLLM's extension
        s.ignore_eos = True


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    return stops


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict, name: str, kind: type):
    value = body.get(name)
    if value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and _is_int(value):
        return value
    if kind is float and (_is_int(value) or isinstance(value, float)):
        if not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number", name)
        return float(value)
    raise bad_request(f"{name} must be {'a boolean' if kind is bool else 'an integer' if kind is int else 'a number'}, "
                      f"got {value!r}", name)


# ---------------------------------------------------------------- responses

def finish_reason(chunk) -> str | None:
    """"stop" or "length" from a chunk's finish_reason enum (None while streaming)."""
    if not chunk.finish_reason:
        return None
    enum = chunk.DESCRIPTOR.fields_by_name["finish_reason"].enum_type
    return enum.values_by_number[chunk.finish_reason].name.removeprefix("FINISH_REASON_").lower()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_id(c: Completion, request_id: str) -> str:
    return f"{'chatcmpl' if c.chat else 'cmpl'}-{request_id}"


def full_response(c: Completion, request_id: str, text: str, finish: str | None, used: dict) -> dict:
    if c.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": completion_id(c, request_id), "object": "chat.completion" if c.chat else "text_completion",
            "created": c.created, "model": c.model, "choices": [choice], "usage": used}


def stream_chunk(c: Completion, request_id: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    """One SSE chunk with a text delta; `text` None with a finish reason: the closing delta."""
    if c.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    chunk = {"id": completion_id(c, request_id), "object": "chat.completion.chunk" if c.chat else "text_completion",
             "created": c.created, "model": c.model, "choices": [choice]}
    if c.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(c: Completion, request_id: str, used: dict) -> dict:
    return {"id": completion_id(c, request_id), "object": "chat.completion.chunk" if c.chat else "text_completion",
            "created": c.created, "model": c.model, "choices": [], "usage": used}
