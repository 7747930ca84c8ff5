import random
import shutil

import pytest

from mixserve.random_models.random_checkpoint import mistral_tokenizer_model
from mixserve.workers.tokenizer import MISTRAL_INSTRUCT_CHAT_TEMPLATE, Tokenizer

TEXTS = [
    "Hello world",
    " Hello",
    "  two leading spaces",
    "a  b   c    d",
    "trailing space ",
    "   ",
    "",
    "line1\nline2\n\n",
    "\n starts with a newline",
    "tab\tand\r\nwindows line end",
    "def f(x):\n    return x ** 2\n",
    "123456 3.14159 1,000,000",
    "héllo wörld — naïve café ñ",
    "日本語のテキスト 中文 한국어",
    "Ελληνικά русский العربية",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "🤖\n\n🤖",
    "zero\u200bwidth and\u00a0nbsp",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "[INST] looks like a tag [/INST]",
    " " * 20 + "many spaces" + " " * 33 + "end",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", " cat", "  ", "\n", "ing", "über", "😀", "123", "x", "[", "]", " ", "Hello", ".", ",", "    ", "日本"]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(n)]
    ranges = [(32, 126), (0xA0, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    texts += ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 20))) for _ in range(n)]
    return texts


CHATS = {
    "user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system+user": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}],
    "multi-turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke 😀\nwith two lines"},
    ],
    "no system, ends with assistant": [
        {"role": "user", "content": " leading space"},
        {"role": "assistant", "content": "ok", "name": None},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def sentencepiece_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm-only")
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def mistral_common_spm():
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer(str(mistral_tokenizer_model()))


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)
    assert tokenizer.byte_token_ids == frozenset(range(3, 259))


def test_encode_equals_mistral_common_sentencepiece(tokenizer, mistral_common_spm):
    for text in TEXTS + _random_texts(1000, seed=0):
        assert tokenizer.encode(text) == mistral_common_spm.encode(text, bos=True, eos=False), repr(text)
        assert tokenizer.encode(text, add_bos=False) == mistral_common_spm.encode(text, bos=False, eos=False)


def test_encode_and_decode_equal_transformers(tokenizer, hf_tokenizer):
    for text in TEXTS + _random_texts(200, seed=1) + ["special tokens </s> in <s> text"]:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), repr(text)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)


def test_decode_inverts_encode(tokenizer, mistral_common_spm):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text == mistral_common_spm.decode(tokenizer.encode(text))


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_chat_template_text_and_ids_equal_transformers(tokenizer, hf_tokenizer, chat):
    text = tokenizer.apply_chat_template(chat)
    assert text == hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected_ids = hf_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    if hasattr(expected_ids, "keys"):  # transformers 5 returns a BatchEncoding, 4.x a list
        expected_ids = expected_ids["input_ids"]
    assert tokenizer.encode_chat(chat) == list(expected_ids)
    assert tokenizer.encode_chat(chat)[:2] == [1, 733]  # one BOS, then "▁["


def test_chat_template_renders_mistral_instruct_v1(tokenizer):
    assert tokenizer.apply_chat_template(CHATS["multi-turn"]) == (
        "<s>[INST] Be kind.\n\nHello! [/INST] Hi, how can I help?</s>[INST] Tell me a joke 😀\nwith two lines [/INST]"
    )


@pytest.mark.parametrize("name", ["user", "system+user", "multi-turn"])
def test_chat_ids_equal_mistral_common_v1_instruct(tokenizer, name):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in CHATS[name]])
    assert tokenizer.encode_chat(CHATS[name]) == MistralTokenizer.v1().encode_chat_completion(request).tokens


@pytest.mark.parametrize(
    "chat, message",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "tool", "content": "a"}], 'role "tool"'),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], 'role "system"'),
        ([], "at least one message"),
        ([{"content": "no role"}], "role"),
    ],
)
def test_bad_chats_raise_value_error(tokenizer, sentencepiece_only, chat, message):
    for tok in (tokenizer, sentencepiece_only):
        with pytest.raises(ValueError, match=message):
            tok.encode_chat(chat)


def test_sentencepiece_fallback_gives_the_same_ids_and_text(tokenizer, sentencepiece_only):
    assert sentencepiece_only.chat_template == MISTRAL_INSTRUCT_CHAT_TEMPLATE
    assert (sentencepiece_only.bos_id, sentencepiece_only.eos_id, sentencepiece_only.vocab_size) == (1, 2, 32000)
    assert sentencepiece_only.byte_token_ids == tokenizer.byte_token_ids
    for text in TEXTS + _random_texts(100, seed=2) + ["a</s>b<s>c<unk>"]:
        ids = tokenizer.encode(text)
        assert sentencepiece_only.encode(text) == ids, repr(text)
        for skip in (True, False):
            assert sentencepiece_only.decode(ids, skip) == tokenizer.decode(ids, skip)
    for chat in CHATS.values():
        assert sentencepiece_only.encode_chat(chat) == tokenizer.encode_chat(chat)


def test_sentencepiece_decode_matches_hf_on_random_ids(tokenizer, sentencepiece_only):
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(0, 300), rng.randrange(32000)]) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert sentencepiece_only.decode(ids, skip) == tokenizer.decode(ids, skip), ids


def test_mistral_layout_folder_tokenizes_like_the_hf_folder(tokenizer, tiny_mistral_layout_checkpoint):
    mistral = Tokenizer.from_dir(tiny_mistral_layout_checkpoint)
    for text in TEXTS:
        assert mistral.encode(text) == tokenizer.encode(text)
    assert mistral.encode_chat(CHATS["multi-turn"]) == tokenizer.encode_chat(CHATS["multi-turn"])


def test_folder_without_a_tokenizer_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
