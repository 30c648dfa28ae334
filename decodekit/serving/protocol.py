"""OpenAI's request and response bodies: parsing into decodekit's settings, and the JSON back.

:func:`parse_completion` / :func:`parse_chat` turn a request body (already parsed JSON)
into a :class:`ParsedRequest`: the prompts, a validated :class:`~decodekit.SamplingParams`
and ``LLM.generate``'s options (steering, LoRA). Every problem is a :class:`RequestError`
with the HTTP status, an OpenAI-style message and the offending field (``param``); the
values themselves are checked by ``SamplingParams``, whose messages are rewritten to name
the OpenAI field. Unknown fields are refused rather than ignored.

:class:`ResponseBuilder` writes completion / chat bodies and stream chunks from
:class:`~decodekit.RequestOutput` objects.

May call: the parameter types (``SamplingParams``, ``GuidedDecodingParams``) and the
tokenizer's ``decode`` (token strings of logprobs). Plain functions otherwise: no engine.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..outputs import LogProbabilities, RequestOutput
from ..params import RequestOutputKind, SamplingParams
from ..structured.spec import GuidedDecodingParams

__all__ = ["ParsedRequest", "RequestError", "ResponseBuilder", "parse_chat", "parse_completion"]

#: OpenAI's default ``max_tokens`` of ``/v1/completions`` (chat: until the context is full).
COMPLETION_MAX_TOKENS = 16
_MAX_PROMPTS = 64  # prompts in one completions request
_MAX_MESSAGES = 1024
_MAX_TEXT = 1 << 20  # characters of one prompt / message


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message, the field (``param``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_

    def body(self) -> dict[str, Any]:
        """OpenAI's error body (text that is not valid UTF-8, such as lone surrogates echoed
        from the request, escaped)."""
        return {"object": "error",
                "error": {"message": _utf8(self.message), "type": self.type, "param": _utf8(self.param),
                          "code": self.status}}


def _utf8(text: str | None) -> str | None:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) backslash-escaped."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(name: str, text: str) -> None:
    """A 400 for text that is not valid Unicode (lone surrogates: no tokenizer takes them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} must be valid Unicode text (it holds a lone surrogate)", name) from None


@dataclass
class ParsedRequest:
    """A valid request: ``prompts`` (texts, token-id lists or one chat), ``params`` (the
    user's ``n`` / ``best_of``; ``output_kind`` DELTA), ``options`` for
    ``LLM.new_requests`` (steering, lora), and how to answer (``stream``, usage chunk).
    ``fit_to_context``: ``max_tokens`` was not given (chat), the engine sets it to what fits."""

    chat: bool
    model: str | None
    prompts: list[Any]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    fit_to_context: bool = False  # no max_tokens (chat): generate until the context is full


# ---------------------------------------------------------------------------- field checks
def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _want(body: Mapping, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` (``default`` when missing or null) if it is one of ``kinds`` (a bool is
    never a number), else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise RequestError(f"{name} must be {what}, got {_type_name(value)}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", name)
    return value


def _int(body: Mapping, name: str, default: Any = None) -> int | None:
    return _want(body, name, (int,), "an integer", default)


def _number(body: Mapping, name: str, default: Any = None) -> float | None:
    return _want(body, name, (int, float), "a number", default)


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    return _want(body, name, (bool,), "a boolean", default)


def _stop(body: Mapping) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop] if stop else []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or an array of strings", "stop")
    for s in stop:
        _check_text("stop", s)
    return stop or None


def _logit_bias(body: Mapping) -> dict[int, float] | None:
    bias = _want(body, "logit_bias", (dict,), "an object of token id -> bias")
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                               "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}",
                               "logit_bias")
        out[tid] = float(value)
    return out


def _int_list(body: Mapping, name: str) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RequestError(f"{name} must be an array of integers", name)
    return value


# ---------------------------------------------------------------------------- sampling settings
#: OpenAI / extra field -> SamplingParams field, for fields passed through unchanged.
_PASS = {"temperature": "temperature", "top_p": "top_p", "n": "n", "best_of": "best_of", "seed": "seed",
         "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
         "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
         "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
         "ignore_eos": "ignore_eos", "include_stop_str_in_output": "include_stop_str_in_output",
         "skip_special_tokens": "skip_special_tokens", "truncate_prompt_tokens": "truncate_prompt_tokens",
         "prompt_logprobs": "prompt_logprobs"}
_NUMBERS = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "typical_p",
            "repetition_penalty"}
_BOOLS = {"ignore_eos", "include_stop_str_in_output", "skip_special_tokens"}
_GUIDED_EXTRAS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_COMMON = set(_PASS) | set(_GUIDED_EXTRAS) | {
    "model", "stream", "stream_options", "stop", "logit_bias", "max_tokens", "stop_token_ids", "user",
    "response_format", "steering", "lora", "guided_decoding_backend"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools",
                          "tool_choice", "parallel_tool_calls", "metadata", "store"}


def _sampling_fields(body: Mapping) -> dict[str, tuple[str, Any]]:
    """SamplingParams field -> (OpenAI field, value) for the plain fields of ``body``."""
    out: dict[str, tuple[str, Any]] = {}
    for name, target in _PASS.items():
        if name in _NUMBERS:
            value = _number(body, name)
        elif name in _BOOLS:
            value = _want(body, name, (bool,), "a boolean")
        else:
            value = _int(body, name)
        if value is not None:
            out[target] = (name, value)
    stop = _stop(body)
    if stop:
        out["stop"] = ("stop", stop)
    bias = _logit_bias(body)
    if bias:
        out["logit_bias"] = ("logit_bias", bias)
    stop_ids = _int_list(body, "stop_token_ids")
    if stop_ids:
        out["stop_token_ids"] = ("stop_token_ids", stop_ids)
    return out


def _guided(body: Mapping) -> GuidedDecodingParams | None:
    """The output constraint of ``response_format`` or a ``guided_*`` extra (at most one)."""
    specs: list[tuple[str, dict[str, Any]]] = []
    rf = _want(body, "response_format", (dict,), "an object")
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            specs.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), (dict, bool)):
                raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                                   "response_format")
            specs.append(("response_format", {"json": js["schema"]}))
        elif kind != "text":
            raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                               f"got {kind!r}", "response_format")
    for name, mode in _GUIDED_EXTRAS.items():
        if body.get(name) is not None:
            specs.append((name, {mode: body[name]}))
    if not specs:
        return None
    if len(specs) > 1:
        given = ", ".join(n for n, _ in specs)
        raise RequestError(f"at most one of response_format and guided_*; got {given}",
                           specs[1][0])
    (name, spec), = specs
    backend = _want(body, "guided_decoding_backend", (str,), "a string", "auto")
    try:
        return GuidedDecodingParams(**spec, backend=backend)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{name}: {exc}", name) from None


def _params(body: Mapping, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """SamplingParams of ``body``; a bad value is a 400 naming the OpenAI field."""
    fields = _sampling_fields(body)
    if max_tokens is not None:
        fields["max_new_tokens"] = ("max_tokens", max_tokens)
    if logprobs is not None:
        fields["logprobs"] = ("logprobs", logprobs)
    for target, (name, value) in fields.items():  # one at a time: the message names the field
        try:
            SamplingParams(**{target: value})
        except ValueError as exc:
            raise RequestError(str(exc).replace(target, name, 1), name) from None
    kwargs = {target: value for target, (_, value) in fields.items()}
    guided = _guided(body)
    try:
        return SamplingParams(**kwargs, guided_decoding=guided, output_kind=RequestOutputKind.DELTA)
    except ValueError as exc:  # a rule between fields (best_of < n, ...)
        raise RequestError(str(exc)) from None


def _options(body: Mapping) -> dict[str, Any]:
    """``LLM.new_requests`` options: ``steering`` {preset | vector, strength, positions, op}, ``lora``."""
    out: dict[str, Any] = {}
    steering = _want(body, "steering", (dict,), "an object {preset | vector, strength, positions, op}")
    if steering is not None:
        unknown = set(steering) - {"preset", "vector", "strength", "positions", "op"}
        if unknown:
            raise RequestError(f"steering: unknown field(s) {sorted(unknown)}", "steering")
        if (steering.get("preset") is None) == (steering.get("vector") is None):
            raise RequestError("steering needs exactly one of preset (a name) and vector (a file path)",
                               "steering")
        for key in ("preset", "vector", "op"):
            if steering.get(key) is not None and not isinstance(steering[key], str):
                raise RequestError(f"steering.{key} must be a string", "steering")
        strength = steering.get("strength")
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                     or not math.isfinite(strength)):
            raise RequestError("steering.strength must be a finite number", "steering")
        positions = steering.get("positions", "all")
        if not isinstance(positions, str) and not (
                isinstance(positions, list) and len(positions) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) for p in positions)):
            raise RequestError("steering.positions must be 'all', 'prompt', 'generated' or [start, end]",
                               "steering")
        out.update(steering_preset=steering.get("preset"), steering_vector=steering.get("vector"),
                   steering_strength=strength, steering_positions=positions if isinstance(positions, str)
                   else slice(*positions), steering_op=steering.get("op", "add"))
    lora = _want(body, "lora", (str,), "a string (the name of a loaded adapter)")
    if lora is not None:
        out["lora"] = lora
    return out


def _common(body: Any, allowed: set[str]) -> tuple[str | None, bool, bool]:
    """Checks every request shares: an object with known fields; (model, stream, include_usage)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(map(repr, unknown[:10]))}", unknown[0])
    model = _want(body, "model", (str,), "a string")
    stream = _bool(body, "stream")
    opts = _want(body, "stream_options", (dict,), "an object")
    include_usage = False
    if opts is not None:
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        include_usage = _want(opts, "include_usage", (bool,), "a boolean", False)
    return model, stream, include_usage


def _check_stream(params: SamplingParams, stream: bool) -> None:
    if stream and params.samples > params.n:
        raise RequestError("best_of > n cannot be streamed (the best samples are known at the end)",
                           "best_of")
    if stream and params.prompt_logprobs is not None:
        raise RequestError("prompt_logprobs is returned in whole responses only (not with stream: true)",
                           "prompt_logprobs")


def _prompts(body: Mapping) -> list[Any]:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                     for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError("prompt must be a non-empty string, array of strings, array of token ids, or "
                           "array of token-id arrays", "prompt")
    if len(prompts) > _MAX_PROMPTS:
        raise RequestError(f"prompt: at most {_MAX_PROMPTS} prompts per request, got {len(prompts)}",
                           "prompt")
    for p in prompts:
        if isinstance(p, str) and (not p or len(p) > _MAX_TEXT):
            raise RequestError(f"prompt strings must have 1 to {_MAX_TEXT} characters", "prompt")
        if isinstance(p, str):
            _check_text("prompt", p)
    return prompts


def parse_completion(body: Any) -> ParsedRequest:
    """A ``/v1/completions`` body as a :class:`ParsedRequest` (or a :class:`RequestError`)."""
    model, stream, include_usage = _common(body, _COMPLETION_FIELDS)
    prompts = _prompts(body)
    if _bool(body, "echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise RequestError("suffix is not supported", "suffix")
    _want(body, "user", (str,), "a string")
    params = _params(body, _int(body, "max_tokens", COMPLETION_MAX_TOKENS), _int(body, "logprobs"))
    _check_stream(params, stream)
    return ParsedRequest(False, model, prompts, params, stream, include_usage, _options(body))


def _messages(body: Mapping) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` (text parts of a content array joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > _MAX_MESSAGES:
        raise RequestError(f"messages must be an array of 1 to {_MAX_MESSAGES} messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or len(content) > _MAX_TEXT:
            raise RequestError(f"messages[{i}].content must be a string of at most {_MAX_TEXT} characters "
                               "or an array of text parts", "messages")
        _check_text("messages", m["role"] + content)
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: Any) -> ParsedRequest:
    """A ``/v1/chat/completions`` body as a :class:`ParsedRequest` (or a :class:`RequestError`)."""
    model, stream, include_usage = _common(body, _CHAT_FIELDS)
    messages = _messages(body)
    if body.get("tools"):
        raise RequestError("tools are not supported", "tools")
    max_tokens = _int(body, "max_completion_tokens")
    max_tokens = _int(body, "max_tokens", max_tokens)
    top = _int(body, "top_logprobs")
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = 0 if top is None else top
    elif top is not None:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    params = _params(body, max_tokens, logprobs)
    _check_stream(params, stream)
    return ParsedRequest(True, model, [messages], params, stream, include_usage, _options(body),
                         fit_to_context=max_tokens is None)


# ---------------------------------------------------------------------------- responses
class ResponseBuilder:
    """Response bodies and stream chunks of one request (one id, one creation time)."""

    def __init__(self, request: ParsedRequest, model: str, tokenizer: Any) -> None:
        self.request, self.model, self.tokenizer = request, model, tokenizer
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if request.chat else "text_completion"
        self._pieces: dict[int, str] = {}

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return piece

    def choice_index(self, prompt_index: int, output_index: int) -> int:
        """OpenAI's choice index: prompt-major, ``n`` choices per prompt."""
        return prompt_index * self.request.params.n + output_index

    def logprobs(self, token_ids: list[int], lps: list[LogProbabilities] | None, offset: int = 0) -> Any:
        """The choice's ``logprobs`` object (None when not asked)."""
        if lps is None:
            return None
        pieces = [self._piece(t) for t in token_ids]
        k = self.request.params.logprobs or 0

        def top(lp: LogProbabilities) -> list[tuple[int, float]]:
            """The ``k`` most likely tokens (the generator adds the chosen one when it is not among them)."""
            return sorted((lp.top_log_probabilities[0] or {}).items(), key=lambda kv: -kv[1])[:k]
        if self.request.chat:
            def entry(piece: str, lp: float) -> dict[str, Any]:
                return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}
            return {"content": [dict(entry(p, lp.token_log_probabilities[0]), top_logprobs=[
                entry(self._piece(t), v) for t, v in top(lp)])
                for p, lp in zip(pieces, lps, strict=False)]}
        offsets, pos = [], offset
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        return {"tokens": pieces, "token_logprobs": [lp.token_log_probabilities[0] for lp in lps],
                "top_logprobs": [dict((self._piece(t), v) for t, v in top(lp)) for lp in lps],
                "text_offset": offsets}

    def prompt_logprobs(self, out: RequestOutput) -> list[Any]:
        """vLLM's ``prompt_logprobs``: per prompt token (the first None), token id -> {logprob,
        decoded_token}, the token itself and the top-k."""
        entries: list[Any] = []
        for token, lp in zip(out.prompt_token_ids, out.prompt_logprobs or [], strict=False):
            if lp is None:
                entries.append(None)
                continue
            top = {token: lp.token_log_probabilities[0], **(lp.top_log_probabilities[0] or {})}
            entries.append({str(t): {"logprob": v, "decoded_token": self._piece(t)} for t, v in top.items()})
        return entries

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def choice(self, index: int, text: str, token_ids: list[int], lps: Any, finish_reason: str | None,
               delta: bool, first: bool = False, offset: int = 0) -> dict[str, Any]:
        """One choice of a body (``delta`` False) or of a stream chunk (``delta`` True)."""
        logprobs = self.logprobs(token_ids, lps, offset)
        if not self.request.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if delta:
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or not first:
                d["content"] = text
            return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def body(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The whole response of one finished request (one output per prompt)."""
        choices, completion = [], 0
        for i, out in enumerate(outputs):
            for j, c in enumerate(out.outputs):
                choices.append(self.choice(self.choice_index(i, j), c.text, c.token_ids, c.logprobs,
                                           c.finish_reason, delta=False))
                completion += len(c.token_ids)
                if out.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = self.prompt_logprobs(out)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(prompt, completion)}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        """One stream chunk."""
        out: dict[str, Any] = {"id": self.id, "object": self.object + (".chunk" if self.request.chat else ""),
                               "created": self.created, "model": self.model, "choices": choices}
        if self.request.include_usage:
            out["usage"] = usage
        return out
