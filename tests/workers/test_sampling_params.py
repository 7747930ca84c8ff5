"""workers/sampling_params.py: validation raises ValueError naming the bad field."""

import pytest

from mixserve.workers.sampling_params import MAX_LOGPROBS, SamplingParams


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
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


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
