"""Calibration for activation-aware quantization: the text, and the pass that observes the model on it.

Rule. The text is "builtin" (the English docstrings of ten standard-library modules: os, re,
functools, itertools, typing, dataclasses, asyncio, socket, shutil and csv, longer than 200
characters each; the same on every rank and node running the same Python) or the path of a UTF-8
text file (it must exist on every node). Its first CALIBRATION_TOKENS tokens run through the
model as independent prefills of up to CHUNK_TOKENS tokens, each from position 0, with every
linear layer's input observed (kernels/linear.py `observing_inputs`): per weight, sums of |x| and
x^2 per input channel (kernels/activation_aware.py). Every tensor-parallel rank runs the same
prefills in step (their all-reduces pair up) and observes its own shard's inputs.
The forwards write into a scratch KV cache of their own (workers/model_runner.py), never the serving
one: a re-quantization that fails leaves the prefix cache valid.
"""

import importlib
import inspect
from pathlib import Path

from ..kernels.activation_aware import ChannelStats, StatsCollector
from ..kernels.linear import observing_inputs
from .step_input import SeqChunk, StepInput
from .tokenizer import Tokenizer

CALIBRATION_TOKENS = 2048
CHUNK_TOKENS = 512
BUILTIN_MODULES = ("os", "re", "functools", "itertools", "typing", "dataclasses", "asyncio", "socket", "shutil", "csv")


def module_docstrings(name: str) -> list[str]:
    """English prose from a standard-library module: its docstring, then its public members' in name
    order, those over 200 characters."""
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module)] + [inspect.getdoc(getattr(module, n)) for n in sorted(dir(module))
                                       if not n.startswith("_")]
    return [d for d in docs if d and len(d) > 200]


def builtin_text() -> str:
    return "\n\n".join(doc for name in BUILTIN_MODULES for doc in module_docstrings(name))


def check_calibration_source(source: str) -> None:
    """ValueError unless `source` is "none", "builtin" or the path of an existing file."""
    if source not in ("none", "builtin") and not Path(source).is_file():
        raise ValueError(f"quantization calibration must be 'none', 'builtin' or the path of a text file; "
                         f"{source!r} is not a file here")


def calibration_text(source: str) -> str:
    check_calibration_source(source)
    return builtin_text() if source == "builtin" else Path(source).read_text(encoding="utf-8")


def calibration_chunks(source: str, tokenizer: Tokenizer, max_chunk: int) -> list[list[int]]:
    """The calibration token ids, CALIBRATION_TOKENS at most, in chunks of at most min(CHUNK_TOKENS, max_chunk)."""
    ids = tokenizer.encode(calibration_text(source), add_bos=False)[:CALIBRATION_TOKENS]
    if len(ids) < 2:
        raise ValueError(f"the calibration text {source!r} has fewer than 2 tokens")
    size = min(CHUNK_TOKENS, max_chunk)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def observe_linear_inputs(run_step, chunks: list[list[int]], block_size: int) -> dict[str, ChannelStats]:
    """Run each chunk as one prefill through `run_step(StepInput)` (a rank's forward, no sampling) and
    return every linear weight's input statistics by weight name. Logits are asked for every position,
    so the LM head's input is observed too."""
    collector = StatsCollector()
    with observing_inputs(collector.observe):
        for chunk in chunks:
            blocks = list(range(-(-len(chunk) // block_size)))
            seq = SeqChunk(seq_id=0, token_ids=chunk, start=0, block_table=blocks, no_write_before=0, sample=None,
                           prompt_logprob_targets=chunk[1:] + chunk[:1])
            run_step(StepInput([seq]))
    return collector.stats
