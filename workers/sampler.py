"""Pick next tokens and gather logprobs for a step's sequences (the policy is kernels/sampling.py).

Isolation rule: the rows are sampled as one batch; if that raises, each row is sampled again on
its own, and a row that still raises gets `SeqResult.error` instead of a token. One request's
parameters can fail only that request, never the step (the engine fails the request alone).

Seeding rule: the noise for token i of a sequence comes from a generator seeded with a mix of
(sequence seed, i). That makes a seeded request reproducible whatever it is batched with, and
survives preemption (recompute never redraws a token) and tensor parallelism (no hidden state).
"""

import torch

from ..kernels.sampling import apply_penalties, sample, top_logprobs
from .model_inputs import ModelInputs
from .step_input import SeqResult, StepOutput, TokenLogprobs

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + step * 0x632BE59BD9B4E019 + 1) % (1 << 63))


def _logprob_entries(chosen_lp, top_lp, top_ids, chosen) -> list[TokenLogprobs]:
    chosen, chosen_lp = chosen.tolist(), chosen_lp.tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(chosen[i], chosen_lp[i], list(zip(top_ids[i], top_lp[i]))) for i in range(len(chosen))
    ]


def sample_step(logits: torch.Tensor, inputs: ModelInputs) -> StepOutput:
    """logits: [R, V] float32 for inputs.logits_indices -> a result per sequence that sampled
    or asked for prompt logprobs."""
    results: dict[int, SeqResult] = {}
    sample_rows, rows_params = [], []
    for chunk, (first, count) in zip(inputs.chunks, inputs.logit_rows):
        if chunk.prompt_logprob_targets is not None:
            try:
                results[chunk.seq_id] = _prompt_logprobs(logits, first, chunk)
            except Exception as exc:
                results[chunk.seq_id] = SeqResult(error=_describe(exc, "prompt logprobs"))
                continue
        if chunk.sample is not None:
            sample_rows.append(first + count - 1)
            rows_params.append((chunk.seq_id, chunk.sample))
    if not sample_rows:
        return StepOutput(results)
    raw = logits[torch.tensor(sample_rows)]  # [B, V]
    params = [p for _, p in rows_params]
    try:
        picked = _sample_rows(raw, params)
    except Exception:  # one row's parameters broke the batch: find it, row by row
        picked = []
        for i, p in enumerate(params):
            try:
                picked += _sample_rows(raw[i : i + 1], [p])
            except Exception as exc:
                picked.append(_describe(exc, "sampling"))
    for (seq_id, p), outcome in zip(rows_params, picked):
        result = results.setdefault(seq_id, SeqResult())
        if isinstance(outcome, str):
            result.error = outcome
        else:
            result.token_id, result.logprobs = outcome
    return StepOutput(results)


def _describe(exc: Exception, stage: str) -> str:
    return f"{stage} failed: {type(exc).__name__}: {exc}"


def _prompt_logprobs(logits: torch.Tensor, first: int, chunk) -> SeqResult:
    targets = torch.tensor(chunk.prompt_logprob_targets)
    rows = logits[first : first + len(targets)]
    chosen_lp, top_lp, top_ids = top_logprobs(rows, targets, chunk.num_prompt_logprobs)
    return SeqResult(prompt_logprobs=_logprob_entries(chosen_lp, top_lp, top_ids, targets))


def _sample_rows(raw: torch.Tensor, params: list) -> list[tuple[int, TokenLogprobs | None]]:
    """raw: [B, V] logits of the rows to sample, params: their SamplingRows -> (token, logprobs or
    None) per row."""
    vocab = raw.shape[-1]
    penalised = raw
    if any(p.output_token_ids for p in params):
        counts = torch.zeros_like(raw)
        for i, p in enumerate(params):
            if p.output_token_ids:
                counts[i] = torch.bincount(torch.tensor(p.output_token_ids), minlength=vocab)[:vocab].float()
        penalised = apply_penalties(
            raw,
            counts,
            torch.tensor([p.presence_penalty for p in params]),
            torch.tensor([p.frequency_penalty for p in params]),
        )
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    generators = [_generator(p.seed, p.step) if p.temperature > 0 else None for p in params]
    tokens = sample(penalised, temperature, top_k, top_p, generators)  # [B]
    want = max((p.num_logprobs for p in params if p.num_logprobs is not None), default=None)
    entries = _logprob_entries(*top_logprobs(raw, tokens, want), tokens) if want is not None else None
    picked = []
    for i, p in enumerate(params):
        logprobs = None
        if p.num_logprobs is not None:
            logprobs = entries[i]
            logprobs.top = logprobs.top[: p.num_logprobs]
        picked.append((int(tokens[i]), logprobs))
    return picked
