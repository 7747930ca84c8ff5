"""Small helpers shared by the engine tests."""

import torch

from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams


def make_engine(path, **overrides) -> LLMEngine:
    settings = dict(model=str(path), dtype="float32", num_blocks=256, block_size=16)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def random_prompts(lengths, seed=0, vocab=32000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def greedy(max_tokens=24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def output_ids(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]
