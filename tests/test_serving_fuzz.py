"""Bad-input fuzz of the OpenAI-compatible server: a few thousand seeded random request bodies
against one in-process server, on ``/v1/completions`` and ``/v1/chat/completions``.

The bodies: valid requests (small ``max_tokens``, some streamed), valid requests with one to
three fields replaced by junk (wrong types, 1e308, +-10**30, NaN / Infinity as raw JSON text,
lone surrogates, deep nesting, thousands of stop strings, out-of-range edge values) or
removed, bodies of junk fields only, unknown fields, unknown models, non-object bodies,
invalid JSON and bytes, an empty body, 10,000-deep nesting, chunked bodies and bodies over
the size limit. Every request must get an answer (no hang) that is never a 5xx: a 2xx is a
complete body or a stream ending with ``data: [DONE]`` and no error chunk, anything else an
OpenAI error body with a message, and only 400 / 404 / 413. Afterwards the server is idle
with every slot free, healthy, writes no traceback, and answers a valid request exactly as
``LLM.generate`` does.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _serving import tiny_llm, wait_idle

from decodekit import SamplingParams, SteeringVector
from decodekit.serving import Server
from decodekit.serving.app import MAX_BODY_BYTES

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 20250611
CASES_PER_ROUTE = 1000
MAX_SEQ_LEN = 128
#: every status the fuzz may see: 200 answers, 400 bad input, 404 unknown model, 413 too large
ALLOWED = {200, 400, 404, 413}
ROUTES = {False: "/v1/completions", True: "/v1/chat/completions"}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "best_of", "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
          "frequency_penalty", "stream", "stream_options", "response_format", "top_k", "min_p", "typical_p",
          "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "steering", "lora",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "echo", "suffix", "user",
          "truncate_prompt_tokens", "prompt_logprobs"]
#: the server reads the body as JSON whatever the content type says
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"]
NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------------------- bodies
class Raw(str):
    """JSON text spliced into a body as it is (10,000-deep nesting, 5,000-digit numbers)."""


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """``value`` as JSON bytes: NaN / Infinity as the JavaScript literals json emits, Raw text
    spliced in; without ``ascii_only`` lone surrogates become invalid UTF-8 bytes."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), ensure_ascii=ascii_only)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text.encode("utf-8", "surrogatepass")


def _nested(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([1, "w5", None, []])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def _deep_raw(depth: int, obj: bool) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth if obj else "[" * depth + "]" * depth)


def junk(rng: random.Random) -> Any:
    """A value of any JSON type, mostly wrong for any field."""
    pick = rng.randrange(12)
    if pick == 0:
        return rng.choice([None, True, False, 0, 1, -1, 2, 3.5, -0.5, -0.0, 5e-324])
    if pick == 1:
        return rng.choice([1e308, -1e308, 10**30, -10**30, 2**31, 2**31 - 1, 2**63, 2**63 - 1, 2**64, -2**63])
    if pick == 2:
        return rng.choice([NAN, INF, -INF, Raw("1e999"), Raw("-1e999"), Raw("1" + "0" * 5000)])
    if pick == 3:
        return rng.choice(["", "w5", "tiny", "\x00", "\ud800", "\udfff w5", "💥" * 3, "NaN", "null", "true",
                           "x" * rng.randrange(1, 60), " ".join(["w9"] * rng.randrange(1, 30))])
    if pick == 4:
        return rng.choice([[], [None], [1, 2, 3], ["w5", "w6"], [[5, 6]], [[]], [True], [1.5], [{}], [NAN]])
    if pick == 5:
        return rng.choice([{}, {"a": 1}, {"type": "text"}, {"": None}, {"5": 1}, {"preset": 1},
                           {"role": "user"}])
    if pick == 6:
        return _nested(rng, rng.randrange(2, 60))
    if pick == 7:
        return [rng.randrange(-5, 400) for _ in range(rng.randrange(50, 2000))]
    if pick == 8:
        return "w7 " * rng.randrange(100, 30000)
    if pick == 9:
        return ["w9"] * rng.randrange(1000, 5000)  # a huge stop list anywhere
    if pick == 10:
        return _deep_raw(rng.choice([65, 500, 10_000]), rng.random() < 0.5)
    return {rng.choice(FIELDS): junk(rng) for _ in range(rng.randrange(1, 4))}


def edge(rng: random.Random, name: str) -> Any:
    """A value near the field's valid range, or a well-typed wrong one."""
    ints = [0, 1, -1, 2, 8, 2**31 - 1, 2**31, 2**63, 10**30, -10**30]
    floats = [0.0, 1.0, -1.0, 2.0, 2.0001, 1e-5, 1e-6, 5e-324, 1e308, -1e308, NAN, INF, -INF]
    table: dict[str, list[Any]] = {
        "model": ["tiny", "other", "TINY", "tiny ", "", "gpt-4"],
        "prompt": ["w5", [5, 6], [[5], [6, 7]], ["w5", "w6"], [], [[]], [-1], [320], [10**30], [True], "",
                   ["w5"] * 65, "w5 " * 200, "\ud800", "w5\x00w6", [["w5"]], [5, "w5"], [[5]] * 65],
        "messages": [[], [{}], [{"role": "user"}], [{"role": 5, "content": "w5"}], "w5",
                     [{"role": "user", "content": 5}], [{"role": "user", "content": None}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                     [{"role": "user", "content": "w5"}] * 1025, {"role": "user", "content": "w5"},
                     [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "w5 " * 300}],
                     [{"role": "user", "content": "{{ 7 * 7 }}{% raise %}"}]],
        "max_tokens": ints + [200, 120],
        "max_completion_tokens": ints + [200, 120],
        "temperature": floats + [100.0],
        "top_p": floats + [1e-300],
        "n": [0, 1, 2, 64, 65, -1, 10**30],
        "best_of": [0, 1, 2, 64, 65, -1, 10**30],
        "stop": ["", [""], ["w9"] * 65, ["w9"] * rng.randrange(1000, 5000), ["x" * 1025], [None], [5],
                 ["w7", "w8"], "w7", ["\ud800"]],
        "seed": [-1, 0, 2**63 - 1, 2**63, 10**30, -10**30],
        "logprobs": [0, 5, 20, 21, -1, True, False, 10**30],
        "top_logprobs": [0, 5, 20, 21, -1, 10**30],
        "logit_bias": [{"5": 100}, {"5": 101}, {"5": -100.5}, {"x": 1}, {"-1": 1}, {"320": 1}, {"1e3": 1},
                       {"5": "1"}, {"5": True}, {"5": None}, {"5": NAN}, {"5": 1e308}, {" 7 ": 1}, {"٣": 1},
                       {"1" * 5000: 1}, {str(i): -100 for i in range(320)}, {str(10**30): 1}],
        "presence_penalty": floats + [-2.01],
        "frequency_penalty": floats + [-2.01],
        "stream": [True, False, "true", 1, 0],
        "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, {"zzz": 1}, {}, []],
        "response_format": [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {},
                            {"type": 5},
                            {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}},
                            {"type": "json_schema", "json_schema": {"schema": 5}}, {"type": "xml"}],
        "top_k": [-2, -1, 0, 1, 320, 2**31 - 1, 2**31],
        "min_p": floats,
        "typical_p": floats + [1e-300],
        "repetition_penalty": floats,
        "min_tokens": [0, 8, 9, 2**31 - 1, 2**31, -1],
        "stop_token_ids": [[], [2], [-1], [320], [2**63], [True], [2.0], "2", [[2]], list(range(300))],
        "ignore_eos": [True, False, 1, "false"],
        "steering": [{"preset": "nope"}, {"vector": "/nonexistent/v.safetensors"}, {}, {"preset": 5},
                     {"preset": "a", "vector": "b"}, {"vector": "/no/v.gguf", "strength": NAN}, {"zzz": 1},
                     {"preset": "nope", "positions": [0, 10**30]}, {"preset": "nope", "positions": [5, 2]},
                     {"preset": "nope", "positions": "nowhere"}, {"preset": "nope", "op": 5}],
        "lora": ["nope", "", "/", "/nonexistent", 5],
        "guided_json": [{"type": "object"}, {"type": "zzz"}, {"$ref": "#"}, "{", '{"type": "string"}', 5, [],
                        {"type": "array", "minItems": 10**30},
                        {"type": "integer", "minimum": 5, "maximum": 1}],
        "guided_regex": ["w[0-9]+", "(", "", "a{1000000}", "(a*)*b", 5],
        "guided_choice": [["w7", "w8"], [], [""], ["x"] * 5000, 5, [5]],
        "guided_grammar": ['root ::= "w5"', "x", "", 5, "root ::= root"],
        "echo": [True, False, 1],
        "suffix": ["", "w5", 5],
        "user": ["u", 5, ""],
        "truncate_prompt_tokens": [-2, -1, 0, 1, 2**31 - 1, 2**31],
        "prompt_logprobs": [0, 5, 20, 21, -1],
    }
    return rng.choice(table[name])


def _words(rng: random.Random, lo: int = 1, hi: int = 10) -> str:
    return " ".join(f"w{rng.randrange(3, 320)}" for _ in range(rng.randint(lo, hi)))


def _prompt(rng: random.Random) -> Any:
    kind = rng.randrange(4)
    if kind == 0:
        return _words(rng)
    if kind == 1:
        return [_words(rng) for _ in range(rng.randint(1, 3))]
    if kind == 2:
        return [rng.randrange(3, 320) for _ in range(rng.randint(1, 10))]
    return [[rng.randrange(3, 320) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 3))]


def _messages(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for _ in range(rng.randint(1, 3)):
        content: Any = _words(rng, 0, 6)
        if rng.random() < 0.2:
            content = [{"type": "text", "text": _words(rng, 1, 3)} for _ in range(rng.randint(0, 2))]
        out.append({"role": rng.choice(["system", "user", "assistant"]), "content": content})
    return out


def valid(rng: random.Random, chat: bool, vector: str) -> dict[str, Any]:
    """A request the server must answer with 200 (at most 8 new tokens per sample)."""
    max_tokens = rng.randint(1, 8)
    body: dict[str, Any] = {"messages": _messages(rng)} if chat else {"prompt": _prompt(rng)}
    if chat and rng.random() < 0.3:  # chat needs a bound: its default (256) overflows max_seq_len
        body["max_completion_tokens"] = max_tokens
    else:
        body["max_tokens"] = max_tokens

    def maybe(p: float = 0.25) -> bool:
        return rng.random() < p

    options: dict[str, Callable[[], Any]] = {
        "model": lambda: "tiny", "temperature": lambda: rng.choice([0, 0.5, 1.0, 1.5]),
        "top_p": lambda: rng.uniform(0.1, 1.0), "top_k": lambda: rng.randint(-1, 50),
        "min_p": lambda: rng.uniform(0, 0.3), "typical_p": lambda: rng.uniform(0.2, 1.0),
        "repetition_penalty": lambda: rng.uniform(0.8, 1.5), "presence_penalty": lambda: rng.uniform(-2, 2),
        "frequency_penalty": lambda: rng.uniform(-2, 2), "seed": lambda: rng.randint(0, 2**63 - 1),
        "stop": lambda: rng.choice(["w9", ["w7", "w8"], [_words(rng, 1, 2)]]),
        "stop_token_ids": lambda: [rng.randrange(3, 320) for _ in range(rng.randint(1, 3))],
        "logit_bias": lambda: {str(rng.randrange(320)): rng.uniform(-100, 100)
                               for _ in range(rng.randint(1, 4))},
        "prompt_logprobs": lambda: rng.randint(0, 3), "ignore_eos": lambda: rng.random() < 0.5,
        "min_tokens": lambda: rng.randint(0, max_tokens), "user": lambda: "user-1",
        "truncate_prompt_tokens": lambda: rng.choice([-1, rng.randint(1, 20)]),
        "response_format": lambda: rng.choice([{"type": "text"}, {"type": "json_object"}]),
        "steering": lambda: {"vector": vector, "strength": rng.uniform(-3, 3),
                             "positions": rng.choice(["all", "prompt", "generated", [0, 4], [1, 100]])},
    }
    for name, make in options.items():
        if maybe(0.15 if name in ("response_format", "steering") else 0.25):
            body[name] = make()
    if maybe():
        body["n"] = rng.randint(1, 3)
        if maybe(0.5):
            body["best_of"] = body["n"] + rng.randint(0, 2)
    if chat:
        if maybe():
            body["logprobs"] = True
            if maybe(0.5):
                body["top_logprobs"] = rng.randint(0, 5)
    else:
        if maybe():
            body["logprobs"] = rng.randint(0, 5)
        if maybe(0.1):
            body["echo"] = False
    if "response_format" not in body and maybe(0.15):
        if maybe(0.5):
            body["guided_choice"] = rng.choice([["w7", "w8 w9", "w10"], ["w50"]])
        else:
            body["guided_regex"] = rng.choice(["w[0-9]+", "(w1[0-9]){2}"])
    if maybe(0.35):
        body["stream"] = True
        body.pop("best_of", None)  # best_of > n cannot be streamed, nor prompt_logprobs
        body.pop("prompt_logprobs", None)
        if maybe(0.5):
            body["stream_options"] = {"include_usage": rng.random() < 0.5}
    return body


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    kind: str
    chat: bool
    content: bytes | Callable[[], Iterator[bytes]]  # a callable: a chunked body
    expect: frozenset[int]
    headers: dict[str, str] | None = None

    def body(self) -> bytes:
        return b"".join(self.content()) if callable(self.content) else self.content

    def show(self) -> str:
        text = self.body()
        return f"{self.kind} {ROUTES[self.chat]} headers={self.headers} ({len(text)} bytes) {text[:300]!r}"


def _chunks(parts: list[bytes]) -> Callable[[], Iterator[bytes]]:
    return lambda: iter(parts)


def _oversize(chat: bool) -> bytes:
    filler = "w5 " * ((MAX_BODY_BYTES + 4096) // 3)
    body = {"messages": [{"role": "user", "content": filler}]} if chat else {"prompt": filler}
    return dumps(dict(body, max_tokens=2))


def make_cases(rng: random.Random, chat: bool, count: int, vector: str) -> list[Case]:
    cases: list[Case] = []
    ok, bad, any_ = frozenset({200}), frozenset({400}), frozenset({200, 400, 404})
    required = "messages" if chat else "prompt"
    kinds = ["valid", "mutated", "junk_fields", "unknown_field", "missing", "wrong_model", "non_object",
             "bad_bytes", "deep", "oversize", "chunked"]
    weights = [15, 42, 10, 5, 3, 3, 5, 7, 3, 1, 3]
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        headers = {"content-type": rng.choice(CONTENT_TYPES)} if rng.random() < 0.2 else None
        if kind == "valid":
            cases.append(Case(kind, chat, dumps(valid(rng, chat, vector), rng.random() < 0.5), ok, headers))
        elif kind == "mutated":
            body = valid(rng, chat, vector)
            for _ in range(rng.randint(1, 3)):
                name = rng.choice(FIELDS)
                roll = rng.random()
                if roll < 0.15:
                    body.pop(name, None)
                else:
                    body[name] = edge(rng, name) if roll < 0.6 else junk(rng)
            cases.append(Case(kind, chat, dumps(body, rng.random() < 0.7), any_, headers))
        elif kind == "junk_fields":
            body = {name: junk(rng) for name in rng.sample(FIELDS, rng.randint(1, 8))}
            cases.append(Case(kind, chat, dumps(body), any_, headers))
        elif kind == "unknown_field":
            body = valid(rng, chat, vector)
            name = rng.choice(["bogus", "", "Prompt", "max_new_tokens", "temperature ", "functions", "\u00e9",
                               "\ud800", "prompt" if chat else "messages",
                               "top_logprobs" if not chat else "echo"])
            body[name] = junk(rng)
            cases.append(Case(kind, chat, dumps(body), bad, headers))
        elif kind == "missing":
            body = valid(rng, chat, vector)
            if rng.random() < 0.5:
                del body[required]
            else:
                body[required] = None
            cases.append(Case(kind, chat, dumps(body), bad, headers))
        elif kind == "wrong_model":
            model = rng.choice(["gpt-4", "TINY", "tiny ", "", "t" * 3000])
            body = dict(valid(rng, chat, vector), model=model)
            cases.append(Case(kind, chat, dumps(body), frozenset({404}), headers))
        elif kind == "non_object":
            value = rng.choice([[], [valid(rng, chat, vector)], "w5", None, 5, 1e308, True, NAN,
                                Raw("-Infinity"), [{"prompt": "w5"}] * 10])
            cases.append(Case(kind, chat, dumps(value), bad, headers))
        elif kind == "bad_bytes":
            good = dumps(valid(rng, chat, vector))
            content = rng.choice([
                b"", b" ", b"\n", b"{", b"}", b"{}}", b"null null", b"{'prompt': 'w5'}", b'{"prompt": "w5",}',
                b'{"prompt": w5}', b"\xff\xfe\x00", b"\x00" * 16, b'{"prompt": "\xff"}', b"\xef\xbb\xbf",
                good[: rng.randrange(1, len(good))], good + b" trailing", good.replace(b":", b"=", 1),
                good.replace(b'"', b"'"), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                good + b"\x00", b'{"prompt": "w5", "max_tokens": 01}', b'{"prompt": "\\ud800\\u"}',
                b'{"prompt": "w5", "max_tokens": 2' + b" " * 10_000,
            ])
            cases.append(Case(kind, chat, content, bad, headers))
        elif kind == "deep":
            depth = rng.choice([65, 200, 5_000, 10_000, 100_000])
            if rng.random() < 0.5:  # the whole body
                content = dumps(_deep_raw(depth, rng.random() < 0.5))
            else:  # one field of a valid body
                content = dumps(dict(valid(rng, chat, vector),
                                     **{rng.choice(FIELDS): _deep_raw(depth, rng.random() < 0.5)}))
            cases.append(Case(kind, chat, content, bad, headers))
        elif kind == "oversize":
            cases.append(Case(kind, chat, _oversize(chat), frozenset({413}), headers))
        else:  # chunked transfer (no content-length): valid, invalid, over the limit
            roll = rng.random()
            if roll < 0.4:
                data = dumps(valid(rng, chat, vector))
                cut = rng.randrange(1, len(data))
                cases.append(Case(kind, chat, _chunks([data[:cut], data[cut:]]), ok, headers))
            elif roll < 0.8:
                data = dumps(valid(rng, chat, vector))[:-1]
                cases.append(Case(kind, chat, _chunks([data[:5], data[5:]]), bad, headers))
            else:
                cases.append(Case(kind, chat, _chunks([b'{"prompt": "'] + [b"w5 " * 100_000] * 15 + [b'"}']),
                                  frozenset({413}), headers))
    return cases


# ---------------------------------------------------------------------------- checks
def problem(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with a response (None: a well-formed answer or error of an allowed status)."""
    if status >= 500:
        return f"server error {status}"
    if status not in ALLOWED:
        return f"unexpected status {status}"
    if status == 200 and content_type.startswith("text/event-stream"):
        events = [e for e in text.split("\n\n") if e.strip()]
        if not events or events[-1] != "data: [DONE]":
            return "the stream does not end with data: [DONE]"
        if len(events) < 2:
            return "the stream has no chunk"
        for event in events[:-1]:
            if not event.startswith("data: "):
                return f"not a data event: {event[:100]!r}"
            try:
                chunk = json.loads(event[len("data: "):])
            except ValueError:
                return f"a chunk is not JSON: {event[:100]!r}"
            if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices"), list):
                return f"a bad or error chunk in the stream: {event[:300]!r}"
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return f"the body is not JSON: {text[:100]!r}"
    if not isinstance(body, dict):
        return f"the body is not an object: {text[:100]!r}"
    if status == 200:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(body.get("usage"), dict):
            return f"a 200 without choices and usage: {text[:300]!r}"
        return None
    err = body.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not err["message"].strip():
        return f"an error body without error.message: {text[:300]!r}"
    if err.get("code") != status or not isinstance(err.get("type"), str):
        return f"error.code / type do not match the status {status}: {text[:300]!r}"
    return None


def test_the_checker_catches_bad_responses():
    """Negative control: the fuzz's checker refuses what a broken server would send."""
    error = json.dumps({"object": "error",
                        "error": {"message": "bad", "type": "x", "param": None, "code": 400}})
    assert problem(400, "application/json", error) is None
    assert problem(404, "application/json", error.replace("400", "404")) is None
    stream = 'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert problem(200, "text/event-stream", stream) is None
    assert problem(200, "application/json", '{"choices": [{}], "usage": {}}') is None
    assert "server error" in problem(500, "application/json", error.replace("400", "500"))
    assert "server error" in problem(503, "text/plain", "Internal Server Error")
    assert problem(400, "text/plain", "Internal Server Error")  # not JSON
    assert problem(400, "application/json", '{"detail": "Not Found"}')  # FastAPI's shape, not OpenAI's
    assert problem(400, "application/json", error.replace('"bad"', '""'))  # empty message
    assert problem(400, "application/json", error.replace("400", "413"))  # code != status
    assert problem(429, "application/json", error.replace("400", "429"))  # not a status of bad input
    assert problem(200, "text/event-stream", 'data: {"choices": []}\n\n')  # cut short
    assert problem(200, "text/event-stream", "data: [DONE]\n\n")  # nothing streamed
    failed = json.dumps({"object": "error", "error": {"message": "the request failed", "code": 500}})
    assert problem(200, "text/event-stream", f"data: {failed}\n\ndata: [DONE]\n\n")  # failed mid-stream
    assert problem(200, "application/json", '{"choices": []}')


def _fail(message: str) -> None:
    """Fail without pytest's source traceback. Python 3.11's ``ast.parse`` keeps its depth counter
    per interpreter, not per thread: pytest parsing this file while the server thread prints a
    traceback (3.11's carets parse source too) can raise SystemError, an INTERNALERROR that
    hides the failure."""
    pytest.fail(message, pytrace=False)


def _send(client: httpx.Client, case: Case) -> tuple[int, str, str]:
    content = case.content() if callable(case.content) else case.content
    r = client.post(ROUTES[case.chat], content=content, headers=case.headers)
    return r.status_code, r.headers.get("content-type", ""), r.text


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> str:
    """A steering vector file of the tiny model (valid requests steer with it)."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz") / "vec.safetensors"
    SteeringVector({layer: 0.5 * torch.randn(64, generator=g) for layer in (0, 1)}).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(vector):
    with Server(tiny_llm(max_seq_len=MAX_SEQ_LEN), port=0, model_name="tiny",
                steering_dir=Path(vector).parent) as srv:
        yield srv


@pytest.mark.parametrize("per_route", [CASES_PER_ROUTE // 4,
                                       pytest.param(CASES_PER_ROUTE, marks=pytest.mark.slow)])
def test_bad_input_fuzz(server, vector, capfd, per_route):
    rng = random.Random(SEED + per_route)
    cases = make_cases(rng, False, per_route, vector) + make_cases(rng, True, per_route, vector)
    rng.shuffle(cases)
    oracle, gen = tiny_llm(max_seq_len=MAX_SEQ_LEN), server.engine.gen
    probe = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0}
    want = oracle.generate("w5 w6 w7", SamplingParams(max_new_tokens=8, temperature=0))[0]
    chat_probe = {"model": "tiny", "messages": [{"role": "user", "content": "w20 w21"}], "max_tokens": 6,
                  "temperature": 0}
    want_chat = oracle.generate([{"role": "user", "content": "w20 w21"}],
                                SamplingParams(max_new_tokens=6, temperature=0))[0]
    with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=8)) as client:
        assert client.post("/v1/completions", json=probe).json()["choices"][0]["text"] == want.text

        def run(case: Case) -> tuple[Case, int, str, str]:
            try:
                return (case, *_send(client, case))
            except httpx.HTTPError as exc:  # a timeout (a hang) or a dropped connection
                return case, -1, "", f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, cases))

        failures, seen = [], Counter()
        for case, status, content_type, text in results:
            seen[case.kind, status] += 1
            why = f"no answer: {text}" if status < 0 else problem(status, content_type, text)
            if why is None and status not in case.expect:
                why = f"status {status}, expected one of {sorted(case.expect)}: {text[:300]}"
            if why is None and status == 200 and case.kind in ("valid", "chunked"):
                body = json.loads(case.body())
                if bool(body.get("stream")) != content_type.startswith("text/event-stream"):
                    why = f"stream={body.get('stream')} answered as {content_type}"
            if why is not None:
                failures.append(f"{why}\n    request: {case.show()}")
        if failures:  # no source traceback: the server may still be printing its own (see _fail)
            _fail(f"{len(failures)} bad answers of {len(results)}:\n" + "\n".join(failures[:20]))
        statuses = {status for _, status in seen}
        if statuses != ALLOWED:
            _fail(f"statuses seen: {sorted(statuses)}; by kind: {sorted(seen.items())}")
        share = per_route / 1000
        refused = sum(n for (_, s), n in seen.items() if s == 400)
        assert seen["valid", 200] > 250 * share and refused > 1000 * share, seen

        # idle, every slot free, healthy, and still answering exactly as LLM.generate
        wait_idle(server, 10)
        assert server.engine.idle and len(gen.free_slots) == gen.max_batch_size
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/metrics").status_code == 200
        r = client.post("/v1/completions", json=probe)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want.text
        r = client.post("/v1/chat/completions", json=chat_probe)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want_chat.text
        wait_idle(server, 5)
    err = capfd.readouterr().err
    if "Traceback" in err or "Exception in ASGI" in err:
        _fail(f"the server printed a traceback:\n{err[-3000:]}")


# ---------------------------------------------------------------------------- bugs the fuzz found
def test_lone_surrogate_field_name_is_a_400_and_keeps_the_connection(server):
    """Was a 500 (the raw surrogate in the error body could not be encoded) that dropped the
    keep-alive connection."""
    answers = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(3):
            r = client.post("/v1/completions", content=b'{"prompt": "w5", "max_tokens": 2, "\\ud800": 1}')
            answers.append((r.status_code, problem(r.status_code, r.headers.get("content-type", ""), r.text)))
            try:  # the same keep-alive connection
                r = client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2})
                answers.append(r.status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))
    if answers != [(400, None), 200] * 3:
        _fail(f"answers: {answers}")


def test_steering_positions_start_end(server, vector):
    """Was always a 400 (the range reached Steering as a tuple, not a slice)."""
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={
        "prompt": "w5 w6", "max_tokens": 4, "steering": {"vector": vector, "positions": [0, 4]}})
    assert r.status_code == 200, r.text


def test_unknown_routes_get_openai_error_bodies(server):
    """Were FastAPI's ``{"detail": ...}``."""
    routes = [("POST", "/v1/nothing"), ("GET", "/v1/completions"), ("PUT", "/v1/chat/completions")]
    for method, path in routes:
        r = httpx.request(method, server.url + path, content=b"{}", timeout=30)
        assert r.status_code in (404, 405)
        assert isinstance(r.json().get("error"), dict) and r.json()["error"].get("message"), r.text
