"""Turn a StepInput into the flat tensors one forward pass needs.

Token order in the flat batch: all single-token chunks (decodes) first, then multi-token chunks
(prefills). Cache slot of position p of a sequence = block_table[p // block_size] * block_size
+ p % block_size. A query at position p attends to keys at positions max(0, p-W+1) .. p.

Shape legend: T = tokens in the step, R = rows whose logits are computed (sampled rows and
prompt-logprob rows), Bd = decode sequences (single-token chunks), NB = the longest block table
among them (blocks), L = keys attended to (the longest decode context, or a prefill chunk's keys),
n = tokens of one chunk.
"""

from dataclasses import dataclass

import torch

from ..kernels.attention import AttentionMetadata, PrefillChunk
from .step_input import SeqChunk, StepInput


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R] flat token rows whose logits are computed
    chunks: list[SeqChunk]  # in flat order
    logit_rows: list[tuple[int, int]]  # per chunk: (first logits row, number of rows)


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[positions // block_size] * block_size + positions % block_size


def _decode_metadata(chunks: list[SeqChunk], block_size: int, window: int | None):
    """Padded key slots [Bd, L] and mask [Bd, L] for single-token chunks."""
    context = torch.tensor([c.start + 1 for c in chunks])  # [Bd]
    first = (context - window).clamp(min=0) if window else torch.zeros_like(context)
    span = int((context - first).max())
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = torch.tensor([c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks])  # [Bd, NB]
    pos = first[:, None] + torch.arange(span)[None, :]  # [Bd, L]
    mask = pos < context[:, None]
    pos = torch.where(mask, pos, 0)
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size  # [Bd, L]
    return torch.where(mask, slots, 0), mask


def build_model_inputs(step: StepInput, block_size: int, window: int | None) -> ModelInputs:
    chunks = sorted(step.chunks, key=lambda c: len(c.token_ids) > 1)
    decodes = [c for c in chunks if len(c.token_ids) == 1]
    ids, positions, slot_mapping = [], [], []
    prefills: list[PrefillChunk] = []
    logits_indices, logit_rows = [], []
    offset = 0
    for c in chunks:
        n = len(c.token_ids)
        pos = torch.arange(c.start, c.start + n)  # [n]
        table = torch.tensor(c.block_table)
        slots = _slots(table, pos, block_size)
        slot_mapping.append(torch.where(pos < c.no_write_before, -1, slots))
        ids.extend(c.token_ids)
        positions.append(pos)
        if n > 1:
            key_first = max(0, c.start - window + 1) if window else 0
            key_pos = torch.arange(key_first, c.start + n)  # [L]
            causal = key_pos[None, :] <= pos[:, None]  # [n, L]
            if window:
                causal &= pos[:, None] - key_pos[None, :] < window
            prefills.append(PrefillChunk(offset, n, _slots(table, key_pos, block_size), causal))
        rows = list(range(offset, offset + n)) if c.prompt_logprob_targets is not None else []
        if c.sample is not None and (not rows or rows[-1] != offset + n - 1):
            rows.append(offset + n - 1)
        logit_rows.append((len(logits_indices), len(rows)))
        logits_indices.extend(rows)
        offset += n
    decode_slots = decode_mask = None
    if decodes:
        decode_slots, decode_mask = _decode_metadata(decodes, block_size, window)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping),
        num_decode=len(decodes),
        decode_key_slots=decode_slots,
        decode_mask=decode_mask,
        prefills=prefills,
    )
    return ModelInputs(
        input_ids=torch.tensor(ids),
        positions=torch.cat(positions),
        meta=meta,
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
        chunks=chunks,
        logit_rows=logit_rows,
    )
