"""workers/sampling_params.py: validation raises ValueError naming the bad field."""

import pytest

from mixserve.workers.sampling_params import (
    MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOKENS, MAX_TOP_K,
    SamplingParams,
)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n", 0, "n must be at least 1, got 0"),
        ("n", 1.5, "n must be at least 1, got 1.5"),
        ("max_tokens", 0, "max_tokens must be at least 1, got 0"),
        ("max_tokens", 2.0, "max_tokens must be at least 1, got 2.0"),
        ("temperature", -0.1, "temperature must be >= 0, got -0.1"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("top_p", 1.01, "top_p must be in (0, 1], got 1.01"),
        ("top_k", -2, "top_k must be -1 (off) or >= 1, got -2"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", -2.01, "frequency_penalty must be in [-2, 2], got -2.01"),
        ("logprobs", MAX_LOGPROBS + 1, f"logprobs must be in [0, {MAX_LOGPROBS}], got {MAX_LOGPROBS + 1}"),
        ("logprobs", -1, f"logprobs must be in [0, {MAX_LOGPROBS}], got -1"),
        ("prompt_logprobs", 21, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got 21"),
        ("stop", ["ok", ""], "stop strings must not be empty"),
        ("stop", "", "stop strings must not be empty"),
        ("n", MAX_N + 1, f"n must be at most {MAX_N}, got {MAX_N + 1}"),
        ("max_tokens", MAX_TOKENS + 1, f"max_tokens must be at most {MAX_TOKENS}, got {MAX_TOKENS + 1}"),
        ("temperature", float("nan"), "temperature must be a finite number, got nan"),
        ("temperature", float("inf"), "temperature must be a finite number, got inf"),
        ("top_p", float("nan"), "top_p must be in (0, 1], got nan"),
        ("top_k", 2**63, f"top_k must be at most {MAX_TOP_K}, got {2**63}"),
        ("top_k", 1.5, "top_k must be -1 (off) or >= 1, got 1.5"),
        ("seed", 2**63, f"seed must be an integer in [-2^63, 2^63), got {2**63}"),
        ("seed", "7", "seed must be an integer in [-2^63, 2^63), got 7"),
        ("presence_penalty", float("nan"), "presence_penalty must be in [-2, 2], got nan"),
        ("stop", ["s"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS} stop strings, got 17"),
        ("stop", ["s" * (MAX_STOP_STRING_CHARS + 1)], f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters"),
        ("stop_token_ids", [1] * (MAX_STOP_TOKEN_IDS + 1), f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got 1025"),
        ("stop_token_ids", [-1], "stop_token_ids must be integers in [0, 2^63)"),
        ("stop_token_ids", [2**63], "stop_token_ids must be integers in [0, 2^63)"),
    ],
)
def test_invalid_values_raise_a_message_naming_the_field(field, value, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**{field: value})
    assert str(excinfo.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {"top_p": 1.0, "top_k": -1},
        {"top_k": 0},  # off, like -1
        {"top_k": 1, "top_p": 1e-9},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"logprobs": 0, "prompt_logprobs": MAX_LOGPROBS},
        {"max_tokens": None},
        {"n": 4, "seed": 7},
        {"n": MAX_N, "max_tokens": MAX_TOKENS, "top_k": MAX_TOP_K, "seed": -(2**63)},
        {"seed": 2**63 - 1, "stop": ["s" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS},
        {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == frozenset()
    assert SamplingParams(stop_token_ids=[7, 2, 7]).stop_token_ids == {2, 7}  # checked per token by membership


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties


def test_stop_lists_are_not_shared_between_instances():
    stops = ["a"]
    params = SamplingParams(stop=stops)
    params.stop.append("b")
    assert stops == ["a"] and SamplingParams().stop == []
