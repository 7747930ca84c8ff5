"""kernels/sampling.py: greedy rows, top-k / top-p truncation, seeded draws, penalties, logprobs."""

import torch

from mixserve.kernels.sampling import apply_penalties, sample, top_logprobs

V = 50


def _logits(rows, seed=0, vocab=V):
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _sample(logits, temperature, top_k=None, top_p=None, seeds=None):
    b, vocab = logits.shape
    full = lambda v, dt: torch.full((b,), v, dtype=dt)  # noqa: E731
    return sample(
        logits,
        full(temperature, torch.float32) if not torch.is_tensor(temperature) else temperature,
        full(top_k if top_k is not None else vocab, torch.int64),
        full(top_p if top_p is not None else 1.0, torch.float32),
        _gens(seeds if seeds is not None else range(b)),
    )


def test_temperature_zero_rows_are_greedy():
    logits = _logits(6)
    assert torch.equal(_sample(logits, 0.0), logits.argmax(-1))


def test_greedy_rows_stay_greedy_next_to_random_rows_and_leave_their_generator_unused():
    logits = _logits(4, seed=1)
    temperature = torch.tensor([0.0, 1.5, 0.0, 2.0])
    gens = _gens(range(4))
    before = [g.get_state().clone() for g in gens]
    tokens = sample(logits, temperature, torch.full((4,), V), torch.ones(4), gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.equal(gens[0].get_state(), before[0]) and torch.equal(gens[2].get_state(), before[2])
    assert not torch.equal(gens[1].get_state(), before[1])


def test_greedy_rows_accept_none_as_their_generator():
    logits = _logits(2, seed=2)
    tokens = sample(logits, torch.zeros(2), torch.full((2,), V), torch.ones(2), [None, None])
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_one_equals_greedy():
    logits = _logits(32, seed=3)
    assert torch.equal(_sample(logits, 5.0, top_k=1), logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_argmax():
    logits = _logits(32, seed=4)
    assert torch.equal(_sample(logits, 5.0, top_p=1e-6), logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    logits = _logits(1, seed=5).expand(400, V).contiguous()
    tokens = _sample(logits, 10.0, top_k=3)
    best3 = set(logits[0].topk(3).indices.tolist())
    assert set(tokens.tolist()) == best3  # all three appear in 400 hot draws, nothing else


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(400, 4).contiguous()
    tokens = _sample(logits, 1.0, top_p=0.75)
    assert set(tokens.tolist()) == {0, 1}
    assert set(_sample(logits, 1.0, top_p=0.81).tolist()) == {0, 1, 2}


def test_draws_follow_the_softmax_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 4000
    tokens = _sample(probs.log().expand(n, 4).contiguous(), 1.0)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.03)


def test_temperature_flattens_the_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 4000
    tokens = _sample(probs.log().expand(n, 4).contiguous(), 2.0)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(probs.log() / 2, -1), rtol=0, atol=0.03)


def test_same_generator_seed_gives_the_same_token_whatever_the_batch():
    logits = _logits(8, seed=6)
    alone = _sample(logits[3:4], 1.0, seeds=[1234])
    for others in ([1, 2, 3], [99, 98, 97]):
        batch = _sample(logits[[0, 1, 3, 2]], 1.0, seeds=[others[0], others[1], 1234, others[2]])
        assert batch[2] == alone[0]
    assert torch.equal(_sample(logits, 1.0, seeds=range(8)), _sample(logits, 1.0, seeds=range(8)))


def test_different_seeds_give_different_draws():
    logits = torch.zeros(1, 1000)  # uniform over 1000 tokens
    tokens = {int(_sample(logits, 1.0, seeds=[s])[0]) for s in range(20)}
    assert len(tokens) > 10


def test_penalties_subtract_frequency_times_count_and_presence_once():
    logits = torch.zeros(2, 5)
    counts = torch.tensor([[0, 1, 3, 0, 0], [2, 0, 0, 0, 1]])
    out = apply_penalties(logits, counts, presence=torch.tensor([0.5, -1.0]), frequency=torch.tensor([0.25, 0.0]))
    expected = torch.tensor([[0.0, -0.75, -1.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
    assert torch.equal(out, expected)


def test_zero_penalties_leave_logits_unchanged():
    logits = _logits(3, seed=7)
    counts = torch.randint(0, 4, (3, V), generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_penalties(logits, counts, torch.zeros(3), torch.zeros(3)), logits)


def test_top_logprobs_are_log_softmax_values_in_descending_order():
    logits = _logits(3, seed=8)
    chosen = torch.tensor([4, 0, 49])
    chosen_lp, top_lp, top_ids = top_logprobs(logits, chosen, 5)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(chosen_lp, ref.gather(-1, chosen[:, None]).squeeze(-1))
    assert top_lp.shape == top_ids.shape == (3, 5)
    assert torch.equal(top_lp, ref.gather(-1, top_ids))
    assert torch.equal(top_ids[:, 0], logits.argmax(-1))
    assert (top_lp[:, :-1] >= top_lp[:, 1:]).all()
    # nothing outside the top-n beats the n-th
    rest = ref.scatter(-1, top_ids, float("-inf"))
    assert (rest.max(-1).values <= top_lp[:, -1]).all()
    torch.testing.assert_close(ref.exp().sum(-1), torch.ones(3))


def test_top_logprobs_of_bfloat16_logits_are_float32():
    chosen_lp, top_lp, _ = top_logprobs(_logits(2, seed=9).bfloat16(), torch.tensor([1, 2]), 2)
    assert chosen_lp.dtype == top_lp.dtype == torch.float32


def test_zero_top_logprobs_gives_empty_tensors():
    chosen_lp, top_lp, top_ids = top_logprobs(_logits(2, seed=10), torch.tensor([3, 7]), 0)
    assert chosen_lp.shape == (2,)
    assert top_lp.shape == (2, 0) and top_ids.shape == (2, 0)
