"""Token sampling from logits: penalties, temperature, top-k, top-p, and seeded draws.

Rows with temperature 0 are greedy (argmax of the penalised logits). Other rows are scaled by
1/temperature, truncated to their top-k and then to the smallest set whose probability reaches
top-p, and sampled with the exponential race `argmax(p / q)`, q ~ Exp(1) (equivalent to drawing
from p). Each row's noise comes from its own generator, so a seeded row gets the same token
whatever else is in the batch.
"""

import torch


def apply_penalties(
    logits: torch.Tensor, output_counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens.

    logits: [B, V] float32; output_counts: [B, V] (times each token was generated); presence,
    frequency: [B] -> [B, V].
    """
    counts = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k / top-p set with -inf. logits: [B, V]; top_k: [B]
    (>= V means off); top_p: [B] (1.0 means off) -> [B, V]."""
    vocab = logits.shape[-1]
    if bool((top_k >= vocab).all()) and bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    drop = ranks >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V], probability of strictly better tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """logits: [B, V] float32 (penalties applied); temperature, top_k, top_p: [B];
    generators: one per row (used only by rows with temperature > 0) -> tokens [B] int64."""
    tokens = logits.argmax(dim=-1)  # [B]
    random_rows = (temperature > 0).nonzero().flatten().tolist()
    if not random_rows:
        return tokens
    rows = torch.tensor(random_rows, device=logits.device)
    scaled = logits[rows] / temperature[rows, None]  # [R, V]
    probs = torch.softmax(_truncate(scaled, top_k[rows], top_p[rows]), dim=-1)  # [R, V]
    noise = torch.empty_like(probs)
    for i, row in enumerate(random_rows):
        noise[i].exponential_(generator=generators[row])
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw model distribution.

    logits: [B, V]; chosen: [B] -> (chosen logprob [B], top-n logprobs [B, n], top-n ids [B, n]).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    top_lp, top_ids = logprobs.topk(n, dim=-1) if n > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_lp, top_ids
