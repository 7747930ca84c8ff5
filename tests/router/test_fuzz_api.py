"""Property-based fuzzing of the live HTTP API (the real Ray Serve app as `mixserve serve` deploys it by
default: Serve's HTTP proxy -> the ingress deployment -> one LLM-server replica, tiny random-weight
checkpoint, loopback only).

Properties, for every generated request:
- never a status >= 500 and never a dropped connection or an HTTP protocol error;
- every 4xx carries OpenAI's error body {"error": {"message": <non-empty str>, "type": <str>, ...}};
- every 200 has the right shape: a `text_completion` / `chat.completion` object with one choice per
  `n`, or (stream) an SSE body whose events are strict JSON (no NaN/Infinity tokens) and which ends
  with `data: [DONE]`; an error event may only be the last event before [DONE], and must not be a
  server error;
- a request generated to be valid gets 200.
After the run: no unhandled exception in the server's logs (this module's own Ray session: a 500 that
no client received is still one), the same LLM-server replica answers (X-Mixserve-Replica on every
200, the engine's own stats), the same Serve replica actors are alive and the app is RUNNING, a greedy
probe gives the same text as before the run, and the engine ends idle (nothing running or waiting, no
KV block held).

Design. Schemathesis is not used: it is not installed here, and the app's OpenAPI schema says nothing
about the bodies (the endpoints read the raw Request), so it would generate nothing useful. The
strategies are hypothesis's, built from the pydantic request models themselves (router/protocol.py):
`edge_values` reads each field's type and bounds (Ge/Gt/Le/MaxLen/MinLen, unions, Literals, nested
models) and yields values at, just inside and just beyond every bound plus the generic hard cases
(2^31, 2^63, 2^64, huge negatives, -0.0, 5e-324, NaN/Infinity/1e400 as raw JSON tokens,
empty/unicode/lone-surrogate/over-long strings, empty/over-long lists, wrong types). The same models
are the oracle of what the server reads from a body (`Expect`: stream, n, max_tokens, stop). Kinds:
- `valid`: every field in range and cheap (max_tokens <= 8, prompts up to the 512-token context's end,
  chats in the template's role order, n up to 16, logprobs, echo, penalties, stop strings/ids); 200;
- `twin`: a valid request with a seed, sent whole and then streamed: the texts must be equal;
- `mutated`: a valid body with 1-3 fields replaced by edge values or wrong types, fields removed,
  unknown fields added, odd roles / content parts / nested prompts; now and then an unbounded budget
  (max_tokens null: the rest of the context) is kept; any status < 500 is fine;
- `raw`: malformed bytes: empty, truncated JSON, deep nesting, non-UTF-8, UTF-16/BOM, CESU-8
  surrogates, duplicate keys, over-long numbers, non-object JSON, oversized and chunked bodies, odd
  content types;
- `abandoned`: a valid request whose client leaves (a stream after its first bytes, else after 30 ms);
- wrong methods and unknown paths.
Both endpoints, streamed and not. On a 200 also: no stop string in the text, at most n x max_tokens
tokens, and exactly max_tokens when a single choice finished by length.

Running it: one seeded `@given(case=...)` test, one hypothesis example per request. The first pass
submits each case as soon as it is drawn and returns (at most CONCURRENCY requests in flight over a
keep-alive httpx.AsyncClient on a background event loop, at most 2 x CONCURRENCY waiting; answers
are checked as they arrive), so drawing overlaps sending and the server always has work. If any case
failed, a replay pass runs the same seeded test again: it draws the same sequence (fixed seed, no
example database), sends only the failing indices, one at a time, and raises on the first that
fails again, so hypothesis shrinks that request to a minimal body (every shrink step is one request
sent alone). The test fails naming every failure of the concurrent pass and the shrunk one (or saying
that none failed alone: a failure under concurrency only). This keeps determinism per seed, bounds in
count (max_examples) and time (nothing is sent after MIXSERVE_FUZZ_TIME_S), and shrinking.

Environment (a longer run by hand, e.g. MIXSERVE_FUZZ_REQUESTS=50000 MIXSERVE_FUZZ_TIME_S=3000 with
`-o timeout=3600`): MIXSERVE_FUZZ_REQUESTS (5000), MIXSERVE_FUZZ_SEED (0), MIXSERVE_FUZZ_CONCURRENCY
(32), MIXSERVE_FUZZ_TIME_S (100: the sending budget), MIXSERVE_FUZZ_KV_CACHE_BYTES (unset:
serve_helpers.start's; 1048576 makes preemption common).

Found by this fuzzer and fixed: a temperature under ~1e-37 sampled garbage (now greedy below 1e-5),
FastAPI's {"detail": ...} body on 404/405 (now OpenAI's error body), an unhandled ClientDisconnect
when a client left while its body was read (now 499), and a relayed call cancelled after its reader
left whose error nothing retrieved.
"""

import asyncio
import dataclasses
import json
import math
import os
import pathlib
import re
import threading
import time
import types
import typing
import unittest
from collections import Counter
from dataclasses import dataclass, field

import annotated_types
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from ray import serve

from mixserve.router.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from mixserve.workers.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

from .serve_helpers import llm_stats, start, stop, wait_until_idle

REQUESTS = int(os.environ.get("MIXSERVE_FUZZ_REQUESTS", "5000"))
SEED = int(os.environ.get("MIXSERVE_FUZZ_SEED", "0"))
CONCURRENCY = int(os.environ.get("MIXSERVE_FUZZ_CONCURRENCY", "32"))
TIME_S = float(os.environ.get("MIXSERVE_FUZZ_TIME_S", "100"))
# the server's KV cache (bytes); unset: serve_helpers.start's. A small one (1 MiB) makes preemption common.
KV_CACHE_BYTES = int(os.environ["MIXSERVE_FUZZ_KV_CACHE_BYTES"]) if os.environ.get("MIXSERVE_FUZZ_KV_CACHE_BYTES") \
    else None
REQUEST_TIMEOUT_S = 60.0  # a request's, beyond LONG_S_PER_TOKEN per token of a long one (Expect.long)
LONG_TOKENS = 64
LONG_S_PER_TOKEN = 0.25
ABANDON_S = 0.03  # a non-streamed abandoned request: the client leaves this long after sending
MIN_FRACTION = 0.2  # of REQUESTS that must have been sent when the time budget cut the run short

VOCAB = 32000  # the tiny preset's
MAX_MODEL_LEN = 512  # serve_helpers.start's
BODY_LIMIT = 1 << 20  # ServeSettings.max_body_bytes' default
PROBE = {"prompt": "The quick brown fox jumps over", "max_tokens": 16, "temperature": 0}
CHAT_PROBE = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12, "temperature": 0}
APP = "mixserve"


# ---- JSON with raw tokens and duplicate keys --------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is: NaN, Infinity, 1e400, -0, a 5000-digit integer, ..."""

    token: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object written from (key, value) pairs, duplicates kept."""

    items: tuple


def dump(value, ascii_only: bool = True) -> str:
    """JSON text of `value`, with Raw tokens and Pairs objects written as they say (json's C encoder does
    the rest: a body of 500,000 ids is written in milliseconds). Floats: NaN / Infinity as bare tokens."""
    raws = []

    def default(obj):
        if isinstance(obj, Raw):
            raws.append(obj.token)
        elif isinstance(obj, Pairs):
            raws.append("{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}"
                                       for k, v in obj.items) + "}")
        else:
            raise TypeError(type(obj))
        return f"{_MARK}{len(raws) - 1}{_MARK}"

    text = json.dumps(value, ensure_ascii=ascii_only, default=default)
    return _MARKED.sub(lambda m: raws[int(m.group(1))], text) if raws else text


_MARK = "\x01\x02\x03"  # a placeholder json writes as "\u0001\u0002\u0003<i>\u0001\u0002\u0003"
_MARKED = re.compile(r'"\\u0001\\u0002\\u0003(\d+)\\u0001\\u0002\\u0003"')


def encode_body(value, ascii_only: bool) -> bytes:
    # not ASCII-escaped, a lone surrogate goes out as CESU-8 bytes (json.loads(bytes) reads them back)
    return dump(value, ascii_only).encode("utf-8", "surrogatepass")


# ---- requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the server reads from a body the request models accept (they are the oracle: pydantic coerces
    "stream": 1 to True, "8" to 8); a refused body has none and must get a 4xx."""

    stream: bool
    n: int
    max_tokens: int | None  # the completion budget asked for; None: the context's rest
    stop: tuple[str, ...]
    echo: bool

    @property
    def long(self) -> bool:
        """Up to more tokens per choice than a cheap request: seconds on a loaded 2-core machine."""
        return self.max_tokens is None or self.max_tokens > LONG_TOKENS

    def timeout_s(self) -> float:
        budget = MAX_MODEL_LEN if self.max_tokens is None else min(self.max_tokens, MAX_MODEL_LEN)
        return REQUEST_TIMEOUT_S + (LONG_S_PER_TOKEN * budget * (1 + self.n / 4) if self.long else 0.0)


@dataclass
class Case:
    path: str
    content: bytes
    kind: str  # valid | mutated | raw | abandoned | twin
    method: str = "POST"
    content_type: str | None = "application/json"
    chunked: bool = False  # sent with Transfer-Encoding: chunked (no Content-Length)
    expect: Expect | None = None
    abandon: bool = False  # the client goes away: a stream after its first bytes, else after ABANDON_S
    twin: bytes | None = None  # the same body streamed: sent after `content`, the texts must be equal

    @property
    def stream(self) -> bool:
        return self.expect is not None and self.expect.stream

    def __repr__(self):
        body = self.content[:600].decode("utf-8", "backslashreplace")
        more = f"... ({len(self.content)} bytes)" if len(self.content) > 600 else ""
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("method", "content_type", "chunked", "abandon")
                        if getattr(self, k) != Case.__dataclass_fields__[k].default)
        return f"Case({self.kind} {self.path}{extra}: {body}{more})"


def _weighted(*pairs):
    """A strategy choosing among strategies by integer weight (hypothesis's one_of is unweighted)."""
    table = [s for w, s in pairs for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


# ---- edge values, read from the request models -----------------------------------------------------

JUNK = [None, True, False, 0, 1, -1, 1.5, "", "1", "true", "null", [], [None], {}, {"a": 1}, Raw("NaN"),
        Raw("-Infinity"), Raw("1e400"), Raw("-0"), "\ud800"]
ODD_STRINGS = ["", " ", "a", "\x00", "\u0000x", "é", "日本語", "🦙", "e\u0301", "\u202eabc", "\ufeff", "\ud800",
               "\udc00\ud800", "\ud83e", "</s>", "<s>", "<unk>", "[INST]", "[/INST]", "{{ 7 * 7 }}",
               "{% for x in range(10**9) %}x{% endfor %}", "\n\n", "\t", "\\", '"', "\ufffd", "\U0010ffff",
               "<0xFF>", "▁"]
BIG_INTS = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**31), -(2**63), -(2**63) - 1,
            -(2**64), 10**40, -(10**40)]
ODD_FLOATS = [-0.0, 0.0, 5e-324, -5e-324, 1e-40, 1e-300, 1e300, 1.7976931348623157e308, float("nan"),
              float("inf"), float("-inf"), Raw("1e309"), Raw("-1e309"), Raw("1E-400"), Raw("-0"), Raw("1.0e0"),
              Raw("0." + "0" * 400 + "1"), Raw("1" + "0" * 400 + ".0")]


def _bounds(metadata) -> dict:
    out = {}
    for m in metadata:
        if isinstance(m, FieldInfo):
            out.update(_bounds(m.metadata))
        elif isinstance(m, annotated_types.Ge):
            out["ge"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            out["gt"] = m.gt
        elif isinstance(m, annotated_types.Le):
            out["le"] = m.le
        elif isinstance(m, annotated_types.Lt):
            out["lt"] = m.lt
        elif isinstance(m, annotated_types.MaxLen):
            out["max_len"] = m.max_length
        elif isinstance(m, annotated_types.MinLen):
            out["min_len"] = m.min_length
    return out


def _long_string(n: int):
    # a string field capped beyond the body limit: one byte over the limit is enough (413)
    return "x" * min(n, BODY_LIMIT + 1)


def _repeat(value, count: int) -> list:
    """[value] * count, fewer when that would be far over the body limit (the limit is what binds then)."""
    return [value] * max(1, min(count, (BODY_LIMIT + 4096) // (len(dump(value)) + 1)))


def edge_values(annotation, metadata=(), top: bool = True) -> st.SearchStrategy:
    """Values at, inside and beyond the bounds a pydantic annotation (+ its metadata) sets, and wrong types.
    Lists as long as their cap (and one more) and strings beyond a large cap only where `top` (a field's own
    value, not an element of one), so that nested caps do not multiply."""
    bounds = _bounds(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return edge_values(args[0], (*metadata, *args[1:]), top)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(edge_values(a, metadata if a is not type(None) else (), top) for a in args))
    if annotation is type(None):
        return st.none()
    if origin is typing.Literal:
        values = list(args)
        odd = [v.upper() for v in values if isinstance(v, str)] + ["tool", "function", "developer", "", " user"]
        return st.sampled_from(values + odd + JUNK[:8])
    if annotation is bool:
        return st.sampled_from([True, False, 0, 1, "true", "yes", None, Raw("tru")])
    if annotation is int:
        lo = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else None)
        hi = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else None)
        near = [v + d for v in (lo, hi) if v is not None for d in (-1, 0, 1)]
        values = sorted(set(near + [0, -1, 1, 2, 16, 17, 20, 21, VOCAB - 1, VOCAB] + BIG_INTS))
        odd = [Raw("9" * 5000), Raw("-" + "9" * 4301), Raw("1.0"), Raw("1e2"), 1.0, 2.5, "3"]
        return st.one_of(st.sampled_from(values + odd), st.integers(lo, hi))
    if annotation is float:
        lo = bounds.get("ge", bounds.get("gt"))
        hi = bounds.get("le", bounds.get("lt"))
        near = [v for b in (lo, hi) if b is not None for v in (b, math.nextafter(b, -math.inf),
                                                                 math.nextafter(b, math.inf))]
        inside = st.floats(lo, hi, exclude_min="gt" in bounds, exclude_max="lt" in bounds, allow_nan=False)
        return st.one_of(st.sampled_from(near + ODD_FLOATS + [1, 0, -1, 2**63, "0.5", None, True]), inside)
    if annotation is str:
        cap = bounds.get("max_len")
        sizes = [] if cap is None or (cap > 4096 and not top) else [_long_string(cap), _long_string(cap + 1)]
        return st.one_of(st.sampled_from(ODD_STRINGS + sizes + [1, None, ["a"], {"text": "a"}]),
                         st.text(max_size=40))
    if origin is list or annotation is list:
        item = edge_values(args[0], top=False) if args else st.sampled_from(JUNK)
        cap = bounds.get("max_len")
        lists = [(3, st.just([])), (6, st.lists(item, max_size=4)), (3, st.sampled_from(JUNK))]
        if cap is not None and top:  # at and one beyond the cap: one element repeated (cheap to draw, rare)
            lists.append((1, st.tuples(item, st.sampled_from([cap, cap + 1])).map(lambda t: _repeat(*t))))
        return _weighted(*lists)
    if origin is dict or annotation is dict:
        return st.one_of(st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), st.sampled_from(JUNK),
                                         max_size=3), st.sampled_from(JUNK))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.one_of(st.fixed_dictionaries({}, optional={n: edge_values(f.annotation, f.metadata, top=False)
                                                            for n, f in annotation.model_fields.items()}),
                         st.sampled_from(JUNK))
    return st.sampled_from(JUNK)


def field_edges(model: type[BaseModel]) -> dict[str, st.SearchStrategy]:
    return {name: edge_values(f.annotation, f.metadata) for name, f in model.model_fields.items()}


COMPLETION_EDGES = field_edges(CompletionRequest)
CHAT_EDGES = field_edges(ChatCompletionRequest)
MESSAGE_EDGES = field_edges(ChatMessage)

# ---- valid bodies (cheap: max_tokens <= 8, prompts well inside the 512-token context) ------------------
# Every strategy is built once, here: building strategies inside a draw costs more than drawing from them.

short_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60)
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=100)


def _in_range(lo: float, hi: float, *extra: float):
    return st.one_of(st.sampled_from([lo, hi, *extra]), st.floats(lo, hi, allow_nan=False))


SAMPLING_FIELDS = {
    "temperature": _in_range(0.0, 2.0, -0.0, 5e-324, 1e-40, 1e-8, 0.7),
    "top_p": _in_range(5e-324, 1.0, 1e-10, 0.5, 0.9),
    "top_k": st.sampled_from([-1, 0, 1, 2, 50, VOCAB - 1, VOCAB, VOCAB + 1, 1 << 20]),
    "n": _weighted((12, st.just(1)), (6, st.integers(2, 4)), (1, st.just(MAX_N))),
    "seed": st.one_of(st.none(), st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)),
    "stop": st.one_of(st.none(), printable, st.lists(st.one_of(printable, short_text), max_size=16),
                      st.sampled_from([["x" * 1024], [" "] * 16, ["</s>", "\n"], ["é", "🦙"], "\ufffd"])),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=8),
                                st.sampled_from([[2], [0, 1, 2], [2**63 - 1], list(range(1024))])),
    "ignore_eos": st.booleans(),
    "presence_penalty": _in_range(-2.0, 2.0, -0.0),
    "frequency_penalty": _in_range(-2.0, 2.0, -0.0),
    "user": st.one_of(st.none(), printable, st.just("u" * 256)),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.builds(lambda b: {"include_usage": b}, st.booleans())),
}
EXTRA_KEYS = st.sampled_from(["best_of", "suffix", "logit_bias", "tools", "response_format", "functions",
                              "x-unknown", "", "🦙", "__proto__", "k" * 300, "min_tokens", "guided_json"])
EXTRA_FIELDS = st.dictionaries(EXTRA_KEYS, st.sampled_from(JUNK + [{"1": 100}, [1] * 50]), max_size=2)
VALID_PROMPT = st.one_of(short_text, token_ids, short_text.map(lambda t: [t]), token_ids.map(lambda t: [t]),
                         st.sampled_from(["</s>", "<s>", "[INST] hi [/INST]", " ", "\n", [1], [2], [0]]),
                         # up to the context's end: 496 + max_tokens 16 (the default) = 512
                         st.tuples(st.integers(0, VOCAB - 1), st.integers(480, 496)).map(lambda t: [t[0]] * t[1]))
CONTENT = st.one_of(short_text, st.none(),
                    st.lists(st.builds(lambda t: {"type": "text", "text": t}, short_text), max_size=3))
MESSAGE = {role: st.fixed_dictionaries({"role": st.just(role), "content": CONTENT}, optional={"name": printable})
           for role in ("system", "user", "assistant")}
# a chat the default template takes: an optional system message, then user/assistant turns from a user
CHAT = st.tuples(st.booleans(), st.integers(1, 5)).flatmap(lambda t: st.tuples(
    *([MESSAGE["system"]] if t[0] else []), *(MESSAGE["user" if i % 2 == 0 else "assistant"] for i in range(t[1]))
).map(list))


VALID_BUDGET = _weighted((4, st.integers(1, 4)), (1, st.integers(5, 8)))


def _model_field(model_name: str):
    return st.one_of(st.none(), st.just(model_name))


def valid_completion(model_name: str):
    optional = {**SAMPLING_FIELDS, "echo": st.booleans(),
                "logprobs": st.one_of(st.none(), st.integers(0, MAX_LOGPROBS)),
                "model": _model_field(model_name)}
    fields = st.fixed_dictionaries({"prompt": VALID_PROMPT, "max_tokens": _weighted((19, VALID_BUDGET),
                                                                                    (1, st.just(None)))},
                                   optional=optional)

    def build(t):
        body, extra = t
        if body["max_tokens"] is None:
            del body["max_tokens"]  # the default, 16
        return {**body, **extra}

    return st.tuples(fields, EXTRA_FIELDS).map(build)


def valid_chat(model_name: str):
    budget = VALID_BUDGET
    optional = {**SAMPLING_FIELDS, "logprobs": st.booleans(),
                "top_logprobs": st.one_of(st.none(), st.integers(0, MAX_LOGPROBS)), "model": _model_field(model_name)}
    budgets = st.one_of(st.fixed_dictionaries({"max_tokens": budget}),
                        st.fixed_dictionaries({"max_completion_tokens": budget}),
                        st.fixed_dictionaries({"max_tokens": budget, "max_completion_tokens": budget}))
    fields = st.fixed_dictionaries({"messages": CHAT}, optional=optional)
    return st.tuples(fields, budgets, EXTRA_FIELDS).map(lambda t: {**t[0], **t[1], **t[2]})


def expect_of(path: str, content: bytes) -> Expect | None:
    chat = path == "/v1/chat/completions"
    try:
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(json.loads(content))
    except (ValueError, TypeError, RecursionError):
        return None
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return Expect(req.stream, req.n, req.requested_max_tokens if chat else req.max_tokens, stop,
                  not chat and req.echo)


def case_of(path: str, content: bytes, kind: str, **kw) -> Case:
    return Case(path, content, kind, expect=expect_of(path, content), **kw)


def valid_case(model_name: str):
    def case(path, body):
        return case_of(path, encode_body(body, ascii_only=True), "valid")

    return st.one_of(valid_completion(model_name).map(lambda b: case("/v1/completions", b)),
                     valid_chat(model_name).map(lambda b: case("/v1/chat/completions", b)))


# ---- mutated bodies -------------------------------------------------------------------------------------

ODD_PROMPTS = st.one_of(
    st.sampled_from(["", [], [[]], [""], ["a", "b"], [[1], [2]], [[[1]]], ["a", 1], [1, "a"], [True, False],
                     [1.0, 2.0], [1.5], [-1], [VOCAB], [VOCAB - 1], [2**63 - 1], [2**63], [-(2**63) - 1],
                     [None], {"text": "a"}, [{}], "\ud800", "a\udc00b", ["\ud800"], " " * 5000, "🦙" * 300,
                     [0] * 600, [1] * 511, [3] * 200, "x" * 100_000, [2] * 100, list(range(259, 759)),
                     [Raw("1.0"), Raw("2e0")], [Raw("-0")], [Raw("NaN")]]),
    st.lists(st.integers(-(2**64), 2**64), min_size=1, max_size=6),
    st.text(max_size=80),  # surrogates and all
    COMPLETION_EDGES["prompt"],
)
ODD_MESSAGE = _weighted(
    (9, st.fixed_dictionaries({}, optional={"role": MESSAGE_EDGES["role"],
                                            "content": st.one_of(MESSAGE_EDGES["content"], st.text(max_size=20)),
                                            "name": st.sampled_from(JUNK), "tool_calls": st.sampled_from(JUNK)})),
    (1, st.sampled_from(JUNK)))
ODD_PART = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "TEXT", "", None, 1]),
                           "text": st.one_of(st.text(max_size=10), st.sampled_from(JUNK))}),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
    st.sampled_from(JUNK))
ODD_PARTS = st.one_of(st.lists(ODD_PART, max_size=4), st.just([{"type": "text", "text": "a"}] * 257))
ODD_MESSAGES = st.sampled_from([[], None, {}, "hi", [[]], [{"role": "user", "content": "a"}] * 1025,
                                [{"role": "system", "content": "a"}], [{"role": "assistant", "content": "a"}],
                                [{"role": "user", "content": "a"}] * 2, [{"role": "system", "content": "a"}] * 2,
                                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]])
BUDGET_EDGES = st.sampled_from([0, -1, 513, 1 << 24, (1 << 24) + 1, 2**31, 2**63, 2**64, -(2**63) - 1,
                                None, 1.0, 1.5, "8", Raw("1e3"), Raw("8.0")])


def _mutations(edges: dict, chat: bool):
    names = sorted(edges)
    set_field = st.one_of(*(st.tuples(st.just("set"), st.just(n), edges[n]) for n in names))
    junk_field = st.tuples(st.just("set"), st.sampled_from(names), st.sampled_from(JUNK))
    drop_field = st.tuples(st.just("drop"), st.sampled_from(names), st.none())
    extra = st.tuples(st.just("set"), EXTRA_KEYS, st.sampled_from(JUNK))
    deep = (st.one_of(st.tuples(st.just("message"), st.integers(0, 5), ODD_MESSAGE),
                      st.tuples(st.just("parts"), st.integers(0, 5), ODD_PARTS),
                      st.tuples(st.just("set"), st.just("messages"), ODD_MESSAGES)) if chat
            else st.tuples(st.just("set"), st.just("prompt"), ODD_PROMPTS))
    budget = st.tuples(st.just("set"), st.sampled_from(["max_tokens", "max_completion_tokens"] if chat else
                                                       ["max_tokens"]), BUDGET_EDGES)
    return st.lists(_weighted((4, set_field), (2, junk_field), (1, drop_field), (1, extra), (3, deep), (1, budget)),
                    min_size=1, max_size=3)


def _apply(body: dict, mutation) -> dict:
    """`body` with one mutation; what it shares with a strategy's constants (sampled lists) is copied, never
    changed in place (a changed constant would make later draws differ from the replay's)."""
    op, key, value = mutation
    if op == "set":
        body[key] = value
    elif op == "drop":
        body.pop(key, None)
    elif isinstance(body.get("messages"), list) and body["messages"]:
        messages = body["messages"] = list(body["messages"])
        i = key % len(messages)
        if op == "message":
            messages[i] = value
        elif isinstance(messages[i], dict):
            messages[i] = {**messages[i], "content": value}
    return body


def mutated_case(model_name: str):
    def build(path: str, t) -> Case:
        body, mutations, ascii_only, chunked, long_ok = t
        for mutation in mutations:
            body = _apply(body, mutation)
        content = encode_body(body, ascii_only)
        expect = expect_of(path, content)
        if expect is not None and expect.long:  # up to ~500 tokens (x n): kept, but rare, and at most 2 choices
            body.pop("max_completion_tokens", None)
            body.update({"max_tokens": 4} if not long_ok else {"n": min(expect.n, 2)})
            content = encode_body(body, ascii_only)
        return case_of(path, content, "mutated", chunked=chunked)

    flags = (st.booleans(), _weighted((19, st.just(False)), (1, st.just(True))),
             _weighted((99, st.just(False)), (1, st.just(True))))
    return st.one_of(
        st.tuples(valid_completion(model_name), _mutations(COMPLETION_EDGES, False), *flags).map(
            lambda t: build("/v1/completions", t)),
        st.tuples(valid_chat(model_name), _mutations(CHAT_EDGES, True), *flags).map(
            lambda t: build("/v1/chat/completions", t)))


# ---- raw, malformed bodies ----------------------------------------------------------------------------

def _nested(depth: int, open_: str, close: str, inner: str = "1") -> bytes:
    return (open_ * depth + inner + close * depth).encode()


_GOOD = encode_body({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, True)
RAW_BODIES = st.one_of(
    st.sampled_from([
        b"", b" ", b"\n", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"true", b"{}", b'{"prompt": }', b"\x00",
        b'{"prompt": "a", "max_tokens": 1,}', b"{'prompt': 'a'}", b'{"prompt": "a" "max_tokens": 1}',
        b'{"prompt": NaN}', b'{"prompt": "a", "max_tokens": Infinity}', b'{"prompt": "a", "temperature": -Infinity}',
        b'{"prompt": "a", "max_tokens": 1e400}', b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",
        b'{"prompt": "a", "max_tokens": 2, "max_tokens": 99999999}',
        b'{"prompt": "a", "prompt": [1, 2], "max_tokens": 1}',
        b'{"prompt": "\\ud800", "max_tokens": 1}', b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}',
        b'{"prompt": "\xff\xfe", "max_tokens": 1}', b'{"prompt": "\xc3", "max_tokens": 1}',
        b'{"prompt": "a\\u0000b", "max_tokens": 1}', b'{"prompt": "\\x41"}', b"\xef\xbb\xbf" + _GOOD,
        _GOOD.decode().encode("utf-16"), _GOOD.decode().encode("utf-16-le"), _GOOD.decode().encode("utf-32"),
        _GOOD + b"garbage", _GOOD + b"\x00", _GOOD * 2, _nested(100_000, "[", "]"), _nested(5_000, "[", "]"),
        _nested(900, "[", "]"), _nested(990, "[", "]"), _nested(2_000, '{"a":', "}"),
        b'{"prompt": ' + _nested(900, "[", "]") + b', "max_tokens": 1}',
        b'{"messages": ' + _nested(900, "[", "]") + b"}",
        b'{"prompt": ' + _nested(50_000, "[", "]") + b"}", b'{"prompt": "' + b"x" * (BODY_LIMIT + 1) + b'"}',
        b'{"prompt": "' + b"x" * (BODY_LIMIT - 40) + b'"}',
    ]),
    st.integers(0, len(_GOOD) - 1).map(lambda i: _GOOD[:i]),  # truncated
    st.binary(max_size=64),
    st.tuples(st.integers(0, len(_GOOD)), st.binary(min_size=1, max_size=4)).map(  # bytes spliced in
        lambda t: _GOOD[:t[0]] + t[1] + _GOOD[t[0]:]),
    st.sampled_from(JUNK).map(lambda v: encode_body(v, True)),  # not an object
)
CONTENT_TYPES = st.sampled_from(["application/json", None, "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                 "application/json; charset=utf-16", "\u00e9/\u00e9"])


def raw_case():
    return st.builds(lambda path, content, content_type, chunked: case_of(path, content, "raw",
                                                                          content_type=content_type, chunked=chunked),
                     st.sampled_from(["/v1/completions", "/v1/chat/completions"]), RAW_BODIES, CONTENT_TYPES,
                     _weighted((4, st.just(False)), (1, st.just(True))))


def wrong_method_case():
    """Wrong methods and unknown paths: a 404/405 with OpenAI's error body."""
    return st.builds(lambda m, p: Case(p, b"", "raw", method=m, content_type=None),
                     st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
                     st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/completion", "/v1/nope",
                                      "/v1/chat/completions/", "/v2/completions"])).filter(
        lambda c: c.method != "POST" or c.path not in ("/v1/completions", "/v1/chat/completions"))


def abandoned_case(model_name: str):
    """Valid requests whose client goes away (the engine must abort them and end idle)."""
    return valid_case(model_name).map(lambda c: dataclasses.replace(c, abandon=True, kind="abandoned"))


def twin_case(model_name: str):
    """A valid seeded request sent whole, then streamed: the texts must be equal choice by choice (a seeded
    request samples the same tokens whatever it is batched with; streaming changes nothing but the framing)."""
    def build(path: str, t) -> Case:
        body, seed_ = t
        body = {**body, "stream": False, "seed": body["seed"] if body.get("seed") is not None else seed_}
        whole = encode_body(body, True)
        streamed = encode_body({**body, "stream": True}, True)
        return Case(path, whole, "twin", expect=expect_of(path, whole), twin=streamed)

    seeds = st.integers(-(2**63), 2**63 - 1)
    return st.one_of(st.tuples(valid_completion(model_name), seeds).map(lambda t: build("/v1/completions", t)),
                     st.tuples(valid_chat(model_name), seeds).map(lambda t: build("/v1/chat/completions", t)))


def any_case(model_name: str):
    # the first branch is the simplest: hypothesis shrinks towards raw cases, the cheapest requests
    return _weighted((4, raw_case()), (10, mutated_case(model_name)), (3, valid_case(model_name)),
                     (1, twin_case(model_name)), (1, abandoned_case(model_name)), (1, wrong_method_case()))


# ---- sending and checking --------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None  # a dropped connection, a protocol error, a timeout
    seconds: float = 0.0
    abandoned: bool = False  # the client went away on purpose (Case.abandon), before or after the status
    twin: "Outcome | None" = None  # the streamed twin's (Case.twin)


def _timeout_s(case: Case) -> float:
    return case.expect.timeout_s() if case.expect is not None else REQUEST_TIMEOUT_S


class Sender:
    """A keep-alive httpx.AsyncClient on an event loop in a background thread: at most CONCURRENCY requests in
    flight, at most BACKLOG submitted and not yet answered (submit blocks beyond that, so drawing keeps pace
    with sending). `on_done(case, outcome)` runs on the loop for each answer."""

    def __init__(self, url: str, concurrency: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-sender", daemon=True)
        self.thread.start()
        self.backlog = threading.BoundedSemaphore(2 * concurrency)
        self.client, self.slots = self.call(self._open(url, concurrency))

    @staticmethod
    async def _open(url: str, concurrency: int):
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits), asyncio.Semaphore(concurrency)

    def call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, case: Case) -> "Outcome":
        return self.call(self._send(case), 2 * _timeout_s(case))

    def submit(self, case: Case, on_done) -> None:
        self.backlog.acquire()

        async def run():
            try:
                on_done(case, await self._send(case))
            finally:
                self.backlog.release()

        asyncio.run_coroutine_threadsafe(run(), self.loop)

    def drain(self, timeout_s: float = 1800.0) -> None:
        """Wait until every submitted request has been answered and checked."""
        for _ in range(self.backlog._initial_value):
            assert self.backlog.acquire(timeout=timeout_s), "requests still unanswered"
        for _ in range(self.backlog._initial_value):
            self.backlog.release()

    async def _send(self, case: Case) -> "Outcome":
        headers = {"content-type": case.content_type.encode("latin-1")} if case.content_type else {}
        content = case.content if case.method != "GET" else None
        if case.chunked and content is not None:
            async def parts(data=case.content):
                for i in range(0, len(data), 4096):
                    yield data[i:i + 4096]
            content = parts()
        async with self.slots:
            began = time.monotonic()
            if case.abandon:
                return await self._abandon(case, content, headers, began)
            out = await self._request(case, content, headers, began)
            if case.twin is not None:
                out.twin = await self._request(case, case.twin, headers, time.monotonic())
            return out

    async def _request(self, case: Case, content, headers: dict, began: float) -> "Outcome":
        try:
            r = await self.client.request(case.method, case.path, content=content, headers=headers,
                                          timeout=_timeout_s(case))
            return Outcome(r.status_code, dict(r.headers), r.content, seconds=time.monotonic() - began)
        except httpx.HTTPError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - began)

    async def _abandon(self, case: Case, content, headers: dict, began: float) -> "Outcome":
        """Send, then go away: a stream after its first bytes, anything else after ABANDON_S."""
        out = Outcome(abandoned=True)
        try:
            async with asyncio.timeout(_timeout_s(case) if case.stream else ABANDON_S):
                async with self.client.stream(case.method, case.path, content=content, headers=headers) as r:
                    out.status, out.headers = r.status_code, dict(r.headers)
                    if r.status_code == 200:
                        async for _ in r.aiter_raw():
                            break  # closes the connection with the stream unread
                    else:
                        out.body = await r.aread()
        except TimeoutError:
            pass
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        out.seconds = time.monotonic() - began
        return out

    def close(self):
        self.call(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _strict_json(data):
    def no_constant(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(data, parse_constant=no_constant)


def _check_error_body(out: Outcome) -> list[str]:
    try:
        err = _strict_json(out.body)["error"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{out.status} without OpenAI's error body ({exc!r}): {out.body[:300]!r}"]
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not err["message"]:
        return [f"{out.status} error without a message: {out.body[:300]!r}"]
    if not isinstance(err.get("type"), str):
        return [f"{out.status} error without a type: {out.body[:300]!r}"]
    return []


@dataclass
class Answer:
    """A 200's content, whole or assembled from its stream: text and finish reason per choice, usage."""

    texts: dict = field(default_factory=dict)
    finish: dict = field(default_factory=dict)
    usage: dict | None = None


def _choice_text(choice, chat: bool, stream: bool):
    if stream:
        return choice.get("delta", {}).get("content", "") if chat else choice.get("text")
    return choice.get("message", {}).get("content") if chat else choice.get("text")


def _fold_choice(answer: Answer, choice, chat: bool, stream: bool) -> list[str]:
    if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
        return [f"bad choice {choice!r:.200}"]
    text = _choice_text(choice, chat, stream)
    if not isinstance(text, str):
        return [f"choice text is not a string: {choice!r:.200}"]
    if chat and not stream and choice.get("message", {}).get("role") != "assistant":
        return [f"chat choice without role assistant: {choice!r:.200}"]
    i = choice["index"]
    answer.texts[i] = answer.texts.get(i, "") + text
    if choice.get("finish_reason") is not None:
        answer.finish[i] = choice["finish_reason"]
    return []


def _parse_completion(out: Outcome, chat: bool) -> tuple[Answer, list[str]]:
    answer = Answer()
    try:
        obj = _strict_json(out.body)
    except ValueError as exc:
        return answer, [f"200 body is not strict JSON ({exc}): {out.body[:300]!r}"]
    want = "chat.completion" if chat else "text_completion"
    if not isinstance(obj, dict) or obj.get("object") != want or not isinstance(obj.get("choices"), list):
        return answer, [f"200 body is not a {want}: {out.body[:300]!r}"]
    problems = [p for c in obj["choices"] for p in _fold_choice(answer, c, chat, stream=False)]
    answer.usage = obj.get("usage")
    return answer, problems


def _parse_stream(out: Outcome, chat: bool) -> tuple[Answer, list[str]]:
    answer = Answer()
    if not out.headers.get("content-type", "").startswith("text/event-stream"):
        return answer, [f"stream answered as {out.headers.get('content-type')!r}: {out.body[:300]!r}"]
    text = out.body.decode("utf-8", "strict")
    events = text[:-2].split("\n\n") if text.endswith("\n\n") else []
    if not events or events[-1] != "data: [DONE]":
        return answer, [f"stream does not end with data: [DONE] and a blank line: {text[-300:]!r}"]
    problems = []
    want = "chat.completion.chunk" if chat else "text_completion"
    for i, event in enumerate(events[:-1]):
        if not event.startswith("data: ") or "\n" in event:
            problems.append(f"event {i} is not one data line: {event[:200]!r}")
            continue
        try:
            obj = _strict_json(event[6:])
        except ValueError as exc:
            problems.append(f"event {i} is not strict JSON ({exc}): {event[:200]!r}")
            continue
        if isinstance(obj, dict) and "error" in obj:
            if i != len(events) - 2:
                problems.append(f"error event {i} is not the last before [DONE]")
            problems += [f"error event: {p}" for p in _check_error_body(Outcome(200, body=event[6:].encode()))]
            if isinstance(obj["error"], dict) and obj["error"].get("type") == "server_error":
                problems.append(f"stream ended with a server error: {event[:300]!r}")
            continue
        if not isinstance(obj, dict) or obj.get("object") != want or not isinstance(obj.get("choices"), list):
            problems.append(f"event {i} is not a {want}: {event[:200]!r}")
            continue
        for c in obj["choices"]:
            problems += _fold_choice(answer, c, chat, stream=True)
        if obj.get("usage") is not None:
            answer.usage = obj["usage"]
    return answer, problems


def _check_answer(answer: Answer, expect: Expect | None) -> list[str]:
    """The answer against what was asked: n choices, each finished by stop or length, no stop string in the
    text (unless echoed), no more tokens than asked for."""
    problems = []
    n = expect.n if expect is not None else None
    if (n is not None and sorted(answer.texts) != list(range(n))) or not answer.texts:
        problems.append(f"choices {sorted(answer.texts)} for n={n}")
    if sorted(answer.finish) != sorted(answer.texts) or set(answer.finish.values()) - {"stop", "length"}:
        problems.append(f"finish reasons {answer.finish}")
    if expect is not None and not expect.echo:
        for i, text in answer.texts.items():
            problems += [f"choice {i} holds stop string {s!r}: {text!r:.200}" for s in expect.stop if s in text]
    usage = answer.usage
    if usage is not None:
        if not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")):
            problems.append(f"bad usage {usage!r}")
        elif expect is not None and expect.max_tokens is not None and \
                usage["completion_tokens"] > expect.n * expect.max_tokens:
            problems.append(f"{usage['completion_tokens']} tokens for n={expect.n} x max_tokens={expect.max_tokens}")
        elif expect is not None and expect.n == 1 and answer.finish.get(0) == "length" and \
                expect.max_tokens is not None and usage["completion_tokens"] != expect.max_tokens:
            problems.append(f"finish_reason length after {usage['completion_tokens']} of {expect.max_tokens} tokens")
    return problems


def _check_response(case: Case, out: Outcome, stream: bool) -> tuple[Answer | None, list[str]]:
    if out.abandoned and out.error is None:  # only what arrived before the client left is checked
        if out.status is None or out.status == 200:
            return None, []
        return None, [f"status {out.status}: {out.body[:400]!r}"] if out.status >= 500 else _check_error_body(out)
    if out.error is not None:
        return None, [f"no response: {out.error}"]
    if out.status >= 500:
        return None, [f"status {out.status}: {out.body[:400]!r}"]
    if 400 <= out.status < 500:
        problems = _check_error_body(out)
        if case.kind in ("valid", "twin"):
            problems.append(f"a valid request got {out.status}: {out.body[:300]!r}")
        return None, problems
    if out.status in (307, 308) and case.kind == "raw" and out.headers.get("location"):
        return None, []  # a trailing slash redirected (FastAPI's redirect_slashes)
    if out.status != 200:
        return None, [f"unexpected status {out.status}"]
    chat = case.path == "/v1/chat/completions"
    try:
        answer, problems = (_parse_stream if stream else _parse_completion)(out, chat)
    except UnicodeDecodeError as exc:
        return None, [f"200 body is not UTF-8: {exc}"]
    return answer, problems or _check_answer(answer, case.expect)


def check(case: Case, out: Outcome) -> list[str]:
    answer, problems = _check_response(case, out, case.stream)
    if case.twin is None or problems:
        return problems
    twin_answer, twin_problems = _check_response(case, out.twin, stream=True)
    if twin_problems:
        return [f"streamed twin: {p}" for p in twin_problems]
    if answer.texts != twin_answer.texts:
        return [f"whole {answer.texts!r:.300} != streamed {twin_answer.texts!r:.300}"]
    return []




def server_log_exceptions() -> Counter:
    """The unhandled exceptions this Ray session's processes logged: "<header> | <exception line>" -> count,
    where the header is the line before the traceback (e.g. uvicorn's "Exception in ASGI application")."""
    from ray._private import worker  # the session's log folder (there is no public accessor)

    logs = pathlib.Path(worker._global_node.get_logs_dir_path())
    found = Counter()
    for path in [*logs.glob("worker-*.err"), *logs.glob("serve/*.log")]:
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last):"):
                continue
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            header = next((lines[k] for k in (i - 1, i - 2) if k >= 0 and not lines[k].startswith("future:")), "")
            exception = _UUID.sub("<id>", lines[j].strip()[:200]) if j < len(lines) else "?"
            found[f"{header.strip()[-80:]} | {exception}"] += 1
    return found


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ---- the server and the run -----------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    replicas: set = field(default_factory=set)
    failures: list = field(default_factory=list)  # (example index, case, problems)
    slowest: float = 0.0
    slowest_case: Case | None = None
    wall_s: float = 0.0

    def record(self, index: int, case: Case, out: Outcome) -> list[str]:
        if out.seconds > self.slowest:
            self.slowest, self.slowest_case = out.seconds, case
        key = str(out.status) if out.error is None else out.error.split(":")[0]
        key = f"abandoned-{out.status or 'early'}" if out.abandoned and out.error is None else key
        self.statuses[key + ("-sse" if out.status == 200 and case.stream else "")] += 1
        if out.twin is not None:
            self.statuses[(str(out.twin.status) if out.twin.error is None else "error") + "-sse"] += 1
        if out.status == 200 and "x-mixserve-replica" in out.headers:
            self.replicas.add(out.headers["x-mixserve-replica"])
        problems = check(case, out)
        if problems:
            self.failures.append((index, case, problems))
        return problems

    def summary(self) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"fuzz: seed {SEED}, {self.sent} requests in {self.wall_s:.1f} s "
                f"({self.sent / max(self.wall_s, 1e-9):.0f}/s, concurrency {CONCURRENCY}); kinds {dict(self.kinds)}; "
                f"statuses {{{hist}}}; failures {len(self.failures)}; "
                f"slowest {self.slowest:.2f} s: {self.slowest_case!r:.300}")


def _replica_actors() -> set[str]:
    import ray

    return {n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
            if n["name"].startswith(f"SERVE_REPLICA::{APP}#")}


def _probe(url: str) -> tuple[str, str, str]:
    """(completion text, chat text, the replica that answered), greedy."""
    a = httpx.post(url + "/v1/completions", json=PROBE, timeout=60)
    b = httpx.post(url + "/v1/chat/completions", json=CHAT_PROBE, timeout=60)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    return a.json()["choices"][0]["text"], b.json()["choices"][0]["message"]["content"], \
        a.headers["x-mixserve-replica"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint):
    url, _ = start(tiny_checkpoint, **({"kv_cache_bytes": KV_CACHE_BYTES} if KV_CACHE_BYTES else {}))
    model_name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    before = {"probe": _probe(url), "replica": llm_stats()["load"].replica, "actors": _replica_actors()}
    assert before["probe"][2] == before["replica"]
    sender = Sender(url, CONCURRENCY)
    yield {"url": url, "model": model_name, "before": before, "sender": sender, "tally": Tally()}
    sender.close()
    stop()


# ---- regressions: what fuzzing found, as fixed cases ------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 5e-324, 1e-300, 9.99e-6])
def test_a_tiny_temperature_samples_as_greedy(temperature):
    """Found by this fuzzer: a temperature of 1e-40 (valid: within [0, 2]) overflowed float32 logits / T to
    inf, the probabilities became NaN and every token was id 0 (<unk>, logprob -45). The API now samples a
    temperature below 1e-5 as greedy (vLLM's rule)."""
    body = CompletionRequest.model_validate({"prompt": "x", "temperature": temperature})
    assert SamplingParams(**body.sampling_kwargs(4)).temperature == 0.0
    just_above = CompletionRequest.model_validate({"prompt": "x", "temperature": 1e-5})
    assert SamplingParams(**just_above.sampling_kwargs(4)).temperature == 1e-5


def test_a_tiny_temperature_gives_the_greedy_text(fuzz_server):
    url, greedy = fuzz_server["url"], fuzz_server["before"]["probe"][0]
    for temperature in (1e-40, 1e-38):
        r = httpx.post(url + "/v1/completions", json={**PROBE, "temperature": temperature, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (temperature, r.text)


class _Enough(unittest.SkipTest):
    """Raised by a pass that has sent all it will: hypothesis re-raises skip exceptions at once (no
    shrinking), and seeded_run takes it as the end of the pass."""


def seeded_run(strategy, on_case, replay: bool = False):
    """The hypothesis test both passes run: the same seed, so the same cases in the same order. The first pass
    never fails (answers are checked as they come); the replay fails on a failing case, and hypothesis then
    shrinks it (report_multiple_bugs off: the first failure is shrunk, not searched past)."""
    @seed(SEED)
    @settings(max_examples=REQUESTS, deadline=None, database=None, print_blob=False,
              phases=(Phase.generate, Phase.shrink) if replay else (Phase.generate,),
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        on_case(case)

    try:
        run()
    except _Enough:
        pass


def test_fuzzed_requests_never_hurt_the_server(fuzz_server):
    sender, tally = fuzz_server["sender"], fuzz_server["tally"]
    strategy = any_case(fuzz_server["model"])
    began = time.monotonic()
    deadline = began + TIME_S
    index = iter(range(1 << 62))
    lock = threading.Lock()

    def record(i, case, out):
        with lock:
            tally.record(i, case, out)

    def first_pass(case):  # pipelined: drawn, submitted, checked on answer
        i = next(index)
        now = time.monotonic()
        if now >= deadline or tally.sent >= REQUESTS:
            raise _Enough()
        if case.expect is not None and case.expect.long and now > began + TIME_S / 2:
            tally.kinds["long, not sent late"] += 1  # the run's end would wait for it
        else:
            tally.sent += 1 if case.twin is None else 2
            tally.kinds[case.kind] += 1
            sender.submit(case, lambda c, out, i=i: record(i, c, out))

    try:
        seeded_run(strategy, first_pass)
        sender.drain()
    finally:
        tally.wall_s = time.monotonic() - began
        print("\n" + tally.summary())
    if tally.failures:
        _replay_failures(sender, strategy, tally.failures)
    assert tally.sent >= min(REQUESTS, max(1, int(MIN_FRACTION * REQUESTS))), \
        f"only {tally.sent} of {REQUESTS} requests were sent within {TIME_S:.0f} s"


def _replay_failures(sender: Sender, strategy, failures: list) -> None:
    """Replay the seeded sequence, sending (one at a time) only the cases that failed; hypothesis shrinks the
    first that fails again. Always raises, naming every failure of the concurrent pass."""
    failures = sorted(failures, key=lambda f: f[0])
    listing = "\n".join(f"#{i} {case!r}\n    -> " + "\n    -> ".join(problems) for i, case, problems in failures[:20])
    report = f"{len(failures)} requests failed in the concurrent pass:\n{listing}"
    wanted = {i: case.content for i, case, _ in failures}
    index = iter(range(1 << 62))
    state = {"shrinking": False, "drifted": []}

    def replay(case):
        i = next(index)
        if not state["shrinking"]:
            if i > max(wanted):
                raise _Enough()
            if i not in wanted:
                return
            if case.content != wanted[i]:
                state["drifted"].append(i)
        problems = check(case, sender.send(case))
        if problems:
            state["shrinking"] = True
            raise AssertionError(f"{case!r}\n    -> " + "\n    -> ".join(problems))

    try:
        seeded_run(strategy, replay, replay=True)
    except Exception as exc:
        raise AssertionError(f"{report}\nShrunk (sent alone): {exc}") from None
    drift = f" (replay drew other cases at {state['drifted']})" if state["drifted"] else ""
    raise AssertionError(f"{report}\nNone failed when sent alone{drift}: a failure under concurrency only")


def test_no_unhandled_exception_in_the_server_logs(fuzz_server):
    """Every exception a request caused was handled: a 500 that no client received (it had gone) is still one.
    Runs after the fuzz test (module order), on this module's own Ray session."""
    found = server_log_exceptions()
    assert not found, f"unhandled exceptions in the server logs: {found}"


def test_the_engine_survived_unchanged(fuzz_server):
    """Runs after the fuzz test (module order): same replica, same actors, same greedy text, engine idle."""
    url, before, tally = fuzz_server["url"], fuzz_server["before"], fuzz_server["tally"]
    load = wait_until_idle()
    assert load.idle, load
    assert tally.replicas <= {before["replica"]}, f"200s came from {tally.replicas}, before: {before['replica']}"
    assert llm_stats()["load"].replica == before["replica"]
    assert _replica_actors() == before["actors"], "a Serve replica was replaced"
    app = serve.status().applications[APP]
    assert app.status == "RUNNING", app
    for name, dep in app.deployments.items():
        assert dep.status == "HEALTHY" and set(dep.replica_states) == {"RUNNING"}, (name, dep)
    assert _probe(url)[:2] == before["probe"][:2]
    load = wait_until_idle()
    assert load.idle, load
    print(f"\nengine after the run: {load.preemptions} preemptions, prefix cache {load.prefix_hits} of "
          f"{load.prefix_queries} prompt tokens hit, replica {load.replica} (before: {before['replica']})")
