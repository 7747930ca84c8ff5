import random

import pytest

from mixserve.workers.detokenizer import IncrementalDetokenizer
from mixserve.workers.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces and  double  spaces",
    "line one\nline two\n\n  indented\tthird",
    "digits 0123456789 and 3.14",
    "unicode: naïve café — 日本語 中文 Ελληνικά",
    "emoji: 😀🎉 👍🏽 👨‍👩‍👧, by byte fallback: 🦙🫠🧠 end",
    "😀",
    " ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str]:
    deltas = [detok.append(i) for i in ids]
    return deltas, detok.flush()


def _continuation(tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> str:
    """The text the output adds to the prompt's text."""
    return tokenizer.decode(prompt + output, skip)[len(tokenizer.decode(prompt, skip)) :]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_output(tokenizer, text):
    output = tokenizer.encode(text, add_bos=False)
    for prompt in ([], [tokenizer.bos_id]):
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas, rest = _stream(detok, output)
        assert "".join(deltas) + rest == tokenizer.decode(output) == detok.output_text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_after_a_prompt_continue_its_text(tokenizer, text):
    prompt = tokenizer.encode("The prompt ends here:")
    output = tokenizer.encode(text, add_bos=False)
    deltas, rest = _stream(IncrementalDetokenizer(tokenizer, prompt), output)
    assert "".join(deltas) + rest == _continuation(tokenizer, prompt, output)


def test_first_generated_token_keeps_its_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello")
    world = tokenizer.encode("world", add_bos=False)  # "▁world"
    assert len(world) == 1
    assert IncrementalDetokenizer(tokenizer, prompt).append(world[0]) == " world"


def test_prompt_window_of_only_special_tokens_keeps_the_space(tokenizer):
    prompt = tokenizer.encode("Hi") + [tokenizer.eos_id] * 6
    word = tokenizer.encode("there", add_bos=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.append(i) for i in word) + detok.flush() == _continuation(tokenizer, prompt, word) == " there"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_keep_the_invariant(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    byte_ids = sorted(tokenizer.byte_token_ids)
    for trial in range(150):
        output = [
            rng.choice(byte_ids) if r < 0.3 else rng.randrange(3) if r < 0.35 else rng.randrange(tokenizer.vocab_size)
            for r in (rng.random() for _ in range(rng.randint(1, 40)))
        ]
        prompt = [tokenizer.bos_id] if trial % 2 else tokenizer.encode("Some prompt text")
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        deltas, rest = _stream(detok, output)
        assert "".join(deltas) + rest == _continuation(tokenizer, prompt, output, skip_special_tokens), output


def test_incomplete_utf8_is_held_back_until_the_character_is_whole(tokenizer):
    ids = tokenizer.encode("a🦙!", add_bos=False)  # "▁a", 4 byte tokens, "!"
    assert [i in tokenizer.byte_token_ids for i in ids] == [False, True, True, True, True, False]
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    deltas = [detok.append(i) for i in ids]
    assert deltas == ["a", "", "", "", "", "🦙!"]


def test_flush_returns_a_trailing_character_held_back(tokenizer):
    ids = tokenizer.encode("ok 🦙", add_bos=False)
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    assert "".join(detok.append(i) for i in ids) == "ok "
    assert detok.flush() == "🦙"
    assert detok.output_text == "ok 🦙"


def _stop_stream(tokenizer, text, prompt_text="Q:", **kwargs):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt_text), **kwargs)
    deltas = []
    for i in tokenizer.encode(text, add_bos=False):
        deltas.append(detok.append(i))
        if detok.stopped_by:
            break
    return detok, deltas


def test_stop_string_spanning_tokens_truncates_before_it(tokenizer):
    text = "The answer is 42.\n\nQuestion: next"
    detok, deltas = _stop_stream(tokenizer, text, stop_strings=["\n\nQuestion"])
    assert detok.stopped_by == "\n\nQuestion"
    assert "".join(deltas) == detok.output_text == " The answer is 42."
    assert detok.append(tokenizer.encode("more", add_bos=False)[0]) == "" and detok.flush() == ""


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    detok, deltas = _stop_stream(tokenizer, "say STOP now", stop_strings=["STOP"], include_stop_str_in_output=True)
    assert detok.stopped_by == "STOP"
    assert "".join(deltas) == detok.output_text == " say STOP"


def test_stop_string_inside_one_token_cuts_that_token(tokenizer):
    detok, deltas = _stop_stream(tokenizer, "understanding", stop_strings=["stand"])
    assert detok.stopped_by == "stand" and detok.output_text == " under"


def test_a_possible_stop_string_start_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q:"), stop_strings=["END!"])
    ids = tokenizer.encode("the ENDING", add_bos=False)  # "▁the", "▁END", "ING"
    assert len(ids) == 3
    assert [detok.append(i) for i in ids] == [" the", " ", "ENDING"]  # "END" was held: it might become "END!"
    assert detok.stopped_by is None and detok.output_text == " the ENDING"


def test_held_back_stop_prefix_is_flushed_when_the_sequence_ends(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q:"), stop_strings=["\n\nUser:"])
    emitted = "".join(detok.append(i) for i in tokenizer.encode("done\n\nUse", add_bos=False))
    assert emitted == " done"
    assert detok.flush() == "\n\nUse" and detok.output_text == " done\n\nUse"


def test_the_stop_string_that_ends_first_wins(tokenizer):
    detok, _ = _stop_stream(tokenizer, "abcdef", stop_strings=["cdef", "bcd"])
    assert detok.stopped_by == "bcd" and detok.output_text == " a"


def test_without_a_match_stop_strings_do_not_change_the_text(tokenizer):
    for text in TEXTS:
        output = tokenizer.encode(text, add_bos=False)
        detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id], stop_strings=["zzz", "\n\n\n\n", "😀😀😀"])
        deltas, rest = _stream(detok, output)
        assert "".join(deltas) + rest == tokenizer.decode(output) and detok.stopped_by is None


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tokenizer, [], stop_strings=[""])
