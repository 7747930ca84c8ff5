"""Build OpenAI response objects (completions, chat) from the replicas' GenerateChunks."""

import time

from ..workers.tokenizer import Tokenizer
from .engine_api import GenerateChunk, TokenLogprob


class ChoiceState:
    """What has been produced so far for one choice."""

    __slots__ = ("index", "text", "token_ids", "logprobs", "finish_reason", "sent_role", "first_text")

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.sent_role = False
        self.first_text = True


class ResponseBuilder:
    """Accumulates chunks of one request and renders OpenAI objects (whole or as stream deltas)."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer: Tokenizer, n: int, chat: bool,
                 strip_leading_space: bool = False):
        self.kind, self.id, self.model, self.tok, self.chat = kind, request_id, model, tokenizer, chat
        self.created = int(time.time())
        self.choices = [ChoiceState(i) for i in range(n)]
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.strip_leading_space = strip_leading_space

    # ---- accumulation -------------------------------------------------------------------------

    def add(self, chunk: GenerateChunk) -> list[tuple[ChoiceState, str, list[TokenLogprob]]]:
        """Fold a chunk in; returns (choice, new text, new logprobs) per choice that moved."""
        self.prompt_tokens = chunk.num_prompt_tokens
        self.cached_tokens = chunk.num_cached_tokens
        moved = []
        for delta in chunk.choices:
            state = self.choices[delta.index]
            text = delta.delta_text
            if self.strip_leading_space and state.first_text and text:
                text = text[1:] if text.startswith(" ") else text
                state.first_text = False
            state.text += text
            state.token_ids += delta.delta_token_ids
            new_lp = delta.logprobs or []
            state.logprobs += new_lp
            if delta.finish_reason is not None:
                state.finish_reason = delta.finish_reason
            if text or delta.delta_token_ids or delta.finish_reason:
                moved.append((state, text, new_lp))
        return moved

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    # ---- logprobs -------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict:
        tokens = [self._token(e.token_id) for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id, logprob):
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    # ---- whole responses ------------------------------------------------------------------------

    def completion(self, echo_text: str = "", want_logprobs: bool = False, prompt_logprobs=None) -> dict:
        choices = []
        for c in self.choices:
            logprobs = None
            if want_logprobs:
                entries = ([e for e in (prompt_logprobs or []) if e is not None] if echo_text else []) + c.logprobs
                logprobs = self.completion_logprobs(entries)
            choices.append({"index": c.index, "text": echo_text + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chat_completion(self, want_logprobs: bool = False) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.chat_logprobs(c.logprobs) if want_logprobs else None,
                    "finish_reason": c.finish_reason} for c in self.choices]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    # ---- stream chunks --------------------------------------------------------------------------

    def completion_chunk(self, state: ChoiceState, text: str, logprobs) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": state.index, "text": text, "logprobs": logprobs,
                             "finish_reason": state.finish_reason}]}

    def chat_chunk(self, state: ChoiceState, text: str | None, logprobs, finish: bool) -> dict:
        delta: dict = {}
        if not state.sent_role:
            delta["role"] = "assistant"
            state.sent_role = True
        if text is not None:
            delta["content"] = text
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": state.index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": state.finish_reason if finish else None}]}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
