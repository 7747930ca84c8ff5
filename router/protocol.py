"""OpenAI-compatible request models (pydantic) and the error shape.

Requests are validated here, so every client mistake becomes a 400 with a message naming the
field. Fields beyond OpenAI's that vLLM users rely on are accepted too: top_k, ignore_eos,
stop_token_ids, min_tokens is not supported. Unknown fields are ignored, as OpenAI does.

Bounds rule: every field has an explicit range (the sampling ranges are the engine's own,
workers/sampling_params.py), floats must be finite, and every list and string has a length cap, so
nothing out of range gets past this boundary; gRPC requests are parsed by the same models.
"""

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..workers.sampling_params import (
    INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
    MAX_TOKENS, MAX_TOP_K,
)

MAX_PROMPT_CHARS = 1 << 22  # a text prompt; the body size limit and the context length bind first
MAX_PROMPT_TOKENS = 1 << 20  # a token-id prompt
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_NAME_CHARS = 256  # model, user, role-like names
_LIMITS = ConfigDict(extra="ignore", allow_inf_nan=False, hide_input_in_errors=True)

StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
PromptIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]


class StreamOptions(BaseModel):
    model_config = _LIMITS

    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = _LIMITS

    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def sampling_kwargs(self, max_tokens: int | None) -> dict:
        """Keyword arguments of workers.sampling_params.SamplingParams."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else -1, seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
        )


class CompletionRequest(_SamplingFields):
    prompt: PromptText | PromptIds | list[PromptText] | list[PromptIds]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            return value[0]
        return value


class ChatMessage(BaseModel):
    model_config = _LIMITS

    role: Literal["system", "user", "assistant"]
    content: PromptText | Annotated[list[dict], Field(max_length=MAX_CONTENT_PARTS)] | None = None

    def text(self) -> str:
        """The message text; content parts must be text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ReIsqRequest(BaseModel):
    """POST /v1/re_isq (mistral.rs's name): re-quantize the replica's weights from its checkpoint."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    quantization: Literal["none", "int8", "int4"]
    group_size: Literal[32, 64, 128, 256] | None = None  # int4; default: the replica's current one
    # activation-aware calibration (workers/calibration.py); default: the replica's current one. A text
    # file can only be named in the server's own settings, never by a client.
    calibration: Literal["none", "builtin"] | None = None


def error_body(message: str, type_: str = "invalid_request_error", code: str | int | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_WRONG_TYPE = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type",
               "model_attributes_type", "none_required", "int_from_float"}
_UNION_TAG = re.compile(r"^(constrained-)?(str|int|float|bool|list|dict|none)(\[.*\])?$|\[|-")


def describe_validation_error(exc) -> str:
    """One readable line from a pydantic ValidationError, without the input's values. For a field
    that may take several shapes (a string or a list), a wrong-shape complaint is dropped when the
    shape that matched has its own complaint, and pydantic's shape tags leave the field path."""
    errors = exc.errors(include_input=False, include_url=False)
    fields = {}
    for err in errors:
        loc = tuple(p for p in err.get("loc", ()) if p != "body")
        fields.setdefault(loc[:1], []).append(err)
    parts = []
    for group in fields.values():
        if len(group) > 1 and any(e["type"] not in _WRONG_TYPE for e in group):
            group = [e for e in group if e["type"] not in _WRONG_TYPE]
        for err in group:
            where = ".".join(str(p) for p in err.get("loc", ())
                             if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p)))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(dict.fromkeys(parts))
