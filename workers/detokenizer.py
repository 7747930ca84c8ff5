"""Streaming text for one sequence: token ids in, text that is safe to show out, stop strings checked.

Token -> text uses the prefix/read-offset method of vLLM and HF's TextStreamer: decode a short window
of earlier ids plus the new ones, and emit what the window's text gained beyond the text of its
earlier ids. Decoding a window instead of the new ids alone keeps sentencepiece's "▁" word starts as
spaces (a decoder drops the leading space of what it decodes) and lets a multi-byte character
arrive in several byte-fallback tokens. Text is held back while
- the window's text ends with U+FFFD (an incomplete UTF-8 sequence), or
- the last id is a byte-fallback token: its byte run may go on, and a run that ends invalid is
  decoded as one U+FFFD per byte, retroactively, by the Hugging Face decoder. A special token that
  decoding skips does not end a run (it is dropped before the bytes are joined), so it is passed over.

Stop strings: the text not yet emitted is searched for every stop string after each token; the
match that ends first wins (what a character-by-character stream would see first), and the output
is cut before it (or after it with include_stop_str_in_output). While the end of the pending text
could be the start of a stop string, that tail is held back too. No stop string can start inside
text already emitted: emitted text never ends with a stop string's prefix.

Invariant (tests/workers/test_detokenizer.py): when no stop string matched, the concatenation of
every `append` delta and `flush` equals decode(prompt_ids + output_ids) minus decode(prompt_ids);
for an empty prompt, or one that is a single BOS, that is decode(output_ids).
"""

from collections.abc import Iterable

from .tokenizer import Tokenizer

PREFIX_WINDOW = 5  # prompt ids decoded as context for the first generated token


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Iterable[int],
        *,
        stop_strings: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._byte_ids = tokenizer.byte_token_ids
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids)
        self.stop_strings = tuple(stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        self._include_stop = include_stop_str_in_output
        self._max_stop = max((len(s) for s in self.stop_strings), default=0)

        # ids[prefix:read] decode to text already accounted for; ids[read:] are not yet.
        n = len(self._ids)
        prefix = max(n - PREFIX_WINDOW, 0)
        textless = self._byte_ids | self._skipped_ids
        while prefix > 0 and self._ids[prefix] in textless and self._ids[prefix - 1] in textless:
            prefix -= 1  # start the window where a byte run starts
        if prefix > 0 and not self._decode(prefix, n):
            prefix = 0  # the window holds no text (say, only special tokens): a space would be lost
        self._prefix, self._read = prefix, n

        self._text = ""  # text decoded from the generated ids so far
        self._emitted = 0  # len of the part of _text handed out
        self.stopped_by: str | None = None

    @property
    def output_text(self) -> str:
        """All text emitted so far (after a stop: the final text)."""
        return self._text[: self._emitted]

    @property
    def finished(self) -> bool:
        return self.stopped_by is not None

    def append(self, token_id: int) -> str:
        """Add one generated id; return the text it makes safe to emit (often "", after a stop always "")."""
        if self.stopped_by is not None:
            return ""
        self._ids.append(token_id)
        if token_id not in self._byte_ids and token_id not in self._skipped_ids:
            self._text += self._decode_new(final=False)
        return self._emit(final=False)

    def flush(self) -> str:
        """The sequence ended for another reason than a stop string: return all text held back."""
        if self.stopped_by is not None:
            return ""
        self._text += self._decode_new(final=True)
        return self._emit(final=True)

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def _emit(self, final: bool) -> str:
        start = self._emitted
        end = len(self._text)
        match = self._first_stop(start)
        if match is not None:
            stop, at = match
            self.stopped_by = stop
            end = at + len(stop) if self._include_stop else at
            self._text = self._text[:end]
        elif not final:
            end -= self._partial_stop_len(start)
        self._emitted = max(end, start)
        return self._text[start : self._emitted]

    def _first_stop(self, start: int) -> tuple[str, int] | None:
        best: tuple[str, int] | None = None
        for stop in self.stop_strings:
            at = self._text.find(stop, start)
            if at >= 0 and (best is None or (at + len(stop), at) < (best[1] + len(best[0]), best[1])):
                best = (stop, at)
        return best

    def _partial_stop_len(self, start: int) -> int:
        """Length of the longest tail of _text[start:] that is a proper prefix of a stop string."""
        pending = self._text[start:]
        for k in range(min(self._max_stop - 1, len(pending)), 0, -1):
            tail = pending[-k:]
            if any(stop.startswith(tail) for stop in self.stop_strings):
                return k
        return 0
