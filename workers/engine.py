"""The engine of one replica: requests in, tokens out, one step at a time.

`add_request` validates and queues; `step` schedules a batch (workers/scheduler.py), runs it on
the executor, appends sampled tokens, applies stop conditions, hands the step back to the
scheduler (`postprocess`: computed tokens, prefix cache, finished sequences) and reports every
request that moved; `abort_request` drops a request and frees its blocks.

Failure rule: a failure of the step itself (the executor raised: the model, a rank) propagates
and the engine is done. A failure that belongs to one request (its sampling, reported per row by
the sampler; its stop check or detokenization here) finishes that request alone, every sequence
of it with finish_reason "error" and the message in RequestOutput.error; the step and every other
request go on. `generate` is the
blocking convenience over those three. Not thread-safe: one thread drives an engine
(workers/async_engine.py does so for asyncio callers).
"""

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from itertools import count

from ..kernels.capability import cpu_capability
from .config import load_model_config
from .dtype_choice import choose_dtype
from .engine_config import EngineConfig
from .executor import Executor, make_executor
from .kv_cache_manager import KVCacheManager
from .loader import WeightFormat, check_shardable
from .model_runner import CacheShape, kv_bytes_per_block
from .model_source import resolve_model
from .outputs import CompletionOutput, EngineLoad, RequestOutput, RequestTimes
from .request_checks import completion_budget, max_model_len, prompt_token_ids
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence
from .step_input import SamplingRow, SeqChunk, SeqResult, StepInput, TokenLogprobs
from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineBusyError(RuntimeError):
    """The engine has requests in flight and cannot do what was asked until it is idle."""


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of accepted requests
    prompt_tokens_computed: int = 0  # prompt positions actually run through the model
    generation_tokens: int = 0
    finished_requests: int = 0


@dataclass(slots=True)
class _Request:
    prompt: str | None  # as given, when it was text
    seqs: list[Sequence]  # one per choice (n)
    times: RequestTimes


def describe_kernels(report: dict) -> str:
    """One line of LLMEngine.kernel_report(): CPU, dtype and why, kernel per linear shape."""
    cpu = report["cpu"]
    flags = " ".join(name for name, present in cpu["flags"].items() if present) or "no vector flags"
    linear = ", ".join(f"{shape}: {kernel.split(' (')[0]}" for shape, kernel in report["linear_kernels"].items())
    return (f"{cpu['model_name']} (torch ISA {cpu['isa']}; {flags}) | dtype {report['dtype']}: "
            f"{report['dtype_reason']} | linear {linear or '-'}")


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.model_path = resolve_model(config.model, config.show_progress)  # a folder, .gguf file or hub id
        self.model_config = mc = load_model_config(self.model_path)
        check_shardable(mc, config.tensor_parallel_size, config.expert_parallel)
        self.dtype_choice = choose_dtype(config.dtype, mc, config.device, config.tensor_parallel_size,
                                         config.kv_cache_bytes)
        self.dtype = self.dtype_choice.dtype
        log.info("dtype %s: %s", self.dtype_choice.name, self.dtype_choice.reason)
        self.tokenizer = Tokenizer.from_dir(self.model_path)
        self.max_model_len = max_model_len(config.max_model_len, mc.max_position_embeddings)
        per_block = kv_bytes_per_block(mc, config.block_size, self.dtype, config.tensor_parallel_size)
        num_blocks = config.num_blocks or config.kv_cache_bytes // per_block
        self.cache_shape = CacheShape(num_blocks, config.block_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, mc.sliding_window, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.executor = executor or make_executor(config, mc, self.dtype, self.cache_shape, self.model_path)
        self.weight_format = config.weight_format()
        self._weight_bytes = self.executor.weight_bytes()
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self._step_s = 0.0
        self._seq_ids = count()
        self._seed_rng = random.Random(config.seed)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it cannot be served."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids(self.tokenizer, prompt, self.model_config.vocab_size)
        max_tokens = completion_budget(len(ids), params.max_tokens, self.max_model_len)
        if not self.kv.can_ever_fit(len(ids) + max_tokens, self.config.max_num_batched_tokens):
            raise ValueError(
                f"the KV cache ({self.cache_shape.num_blocks} blocks of {self.cache_shape.block_size} tokens) "
                f"cannot hold a sequence of {len(ids) + max_tokens} tokens"
            )
        seqs = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._seed_rng.getrandbits(62)
            seq = Sequence(next(self._seq_ids), request_id, index, ids, params, seed, max_tokens=max_tokens)
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, ids, stop_strings=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            )
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
        self._requests[request_id] = _Request(prompt if isinstance(prompt, str) else None, seqs,
                                              RequestTimes(time.monotonic()))
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats.prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final report (None if unknown)."""
        if request_id not in self._requests:
            return None
        for seq in self._requests[request_id].seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._report(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- weights --------------------------------------------------------------------------

    def requantize(self, quantization: str, group_size: int | None = None, calibration: str | None = None
                   ) -> WeightFormat:
        """Re-read the weights from the checkpoint with another weight-only quantization (none, int8,
        int4 in groups of `group_size`; mistral.rs's re-ISQ), activation-aware when `calibration` (default:
        the current one) is a source (workers/calibration.py). ValueError for an unknown format;
        EngineBusyError while any request is in flight (drain first); WeightReloadError if reading
        the new weights fails on any rank (workers/model_runner.py: the old ones stay until the new
        ones are in, so memory peaks at two models). In all three cases nothing changes: same weights,
        format, outputs and prefix cache. After a swap the prefix cache is forgotten: its KV was
        computed with the old weights. Returns the new format."""
        weights = dataclasses.replace(self.weight_format, quantization=quantization,
                                      group_size=group_size or self.weight_format.group_size,
                                      calibration=calibration or self.weight_format.calibration)
        if self.has_unfinished_requests():
            raise EngineBusyError(f"{self.num_unfinished_requests} request(s) in flight; re-quantizing needs an "
                                  "idle engine: drain the replica and retry")
        self.executor.reload_weights(weights)
        self.kv.pool.reset_prefix_cache()
        self.weight_format = weights
        self._weight_bytes = self.executor.weight_bytes()
        log.info("weights re-read as %s: %.2f GiB per rank", weights, self._weight_bytes / 2**30)
        return weights

    # ---- stepping -------------------------------------------------------------------------

    def _chunk_input(self, chunk: ScheduledChunk) -> SeqChunk:
        seq, n = chunk.seq, chunk.num_tokens
        start = seq.num_computed_tokens
        p = seq.params
        sample = None
        if chunk.completes_sequence:
            sample = SamplingRow(
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seq.seed,
                step=seq.num_output_tokens, presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                output_token_ids=seq.output_token_ids if p.has_penalties else None,
                num_logprobs=p.logprobs,
            )
        targets = None
        if p.prompt_logprobs is not None and start + 1 < seq.num_prompt_tokens:
            targets = seq.token_ids[start + 1 : min(start + n, seq.num_prompt_tokens - 1) + 1]
        return SeqChunk(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start : start + n], start=start,
            block_table=list(seq.block_table), no_write_before=seq.num_prefix_hit_tokens, sample=sample,
            prompt_logprob_targets=targets, num_prompt_logprobs=p.prompt_logprobs or 0,
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; report every request that produced tokens or finished."""
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return []
        started = time.monotonic()
        for chunk in scheduled.chunks:
            times = self._requests[chunk.seq.request_id].times
            if times.first_scheduled is None:
                times.first_scheduled = started
        result = self.executor.execute(StepInput([self._chunk_input(c) for c in scheduled.chunks]))
        touched: dict[str, None] = {}
        failed: dict[str, str] = {}
        for chunk in scheduled.chunks:
            seq = chunk.seq
            if seq.request_id in failed:
                continue
            try:
                moved = self._take_result(seq, result.results.get(seq.seq_id))
            except Exception as exc:  # this request's own stop check or detokenization
                moved, failed[seq.request_id] = True, f"detokenizing failed: {type(exc).__name__}: {exc}"
            if moved:
                touched[seq.request_id] = None
            if seq.request_id not in failed and seq.error is not None:
                failed[seq.request_id] = seq.error
        for request_id, message in failed.items():
            self._fail_request(request_id, message, scheduled.chunks)
        self.stats.steps += 1
        self.stats.prompt_tokens_computed += self.scheduler.postprocess(scheduled)
        now = time.monotonic()
        for request_id in touched:
            times = self._requests[request_id].times
            if times.first_token is None:
                times.first_token = now
        step_s = now - started
        self._step_s = step_s if self._step_s == 0 else 0.8 * self._step_s + 0.2 * step_s
        return [self._report(rid) for rid in touched]

    def reset_counters(self) -> None:
        """Start the cumulative counters (stats, prefix-cache queries and hits, preemptions) from 0."""
        self.stats = EngineStats()
        self.scheduler.prefix_queries = self.scheduler.prefix_hits = self.scheduler.num_preemptions = 0

    def load(self) -> EngineLoad:
        """The engine's state now (cheap: one pass over the queued sequences)."""
        sched = self.scheduler
        pending = sum(max(0, s.num_prompt_tokens - s.num_computed_tokens) for s in sched.running)
        pending += sum(s.num_prompt_tokens - s.num_cached_prompt_tokens for s in sched.waiting)
        return EngineLoad(num_running=len(sched.running), num_waiting=len(sched.waiting), kv_usage=self.kv.usage,
                          pending_prefill_tokens=pending, prefix_queries=sched.prefix_queries,
                          prefix_hits=sched.prefix_hits, preemptions=sched.num_preemptions, step_s=self._step_s)

    def _fail_request(self, request_id: str, message: str, chunks: list[ScheduledChunk]) -> None:
        """Finish every sequence of a request whose own processing raised (the failure rule): the
        ones in this step are retired by `postprocess`, the others (its other choices) now."""
        in_step = {c.seq for c in chunks}
        for seq in self._requests[request_id].seqs:
            seq.error = seq.error or message
            if not seq.is_finished:
                seq.finish_reason = "error"
                if seq not in in_step:
                    self.scheduler.finish(seq)
        log.warning("request %s failed alone: %s", request_id, message)

    def _take_result(self, seq: Sequence, out: SeqResult | None) -> bool:
        """Record a sequence's prompt logprobs and sampled token (before `postprocess` advances
        it); True if a token was sampled or the sequence's own sampling failed."""
        if out is None:
            return False
        if out.error is not None:
            seq.error = out.error
            return True
        if out.prompt_logprobs:
            start = seq.num_computed_tokens
            for offset, entry in enumerate(out.prompt_logprobs):
                if start + 1 + offset == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append(entry)
        if out.token_id is None:
            return False
        self._append_token(seq, out.token_id, out.logprobs)
        return True

    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        seq.delta_token_ids.append(token)
        self.stats.generation_tokens += 1
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        p, detok = seq.params, seq.detokenizer
        if token == self.model_config.eos_token_id and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            seq.delta_text += detok.append(token)
            if detok.stopped_by is not None:
                seq.finish_reason, seq.stop_reason = "stop", detok.stopped_by
        if seq.finish_reason is None and (
            seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and detok.stopped_by is None:
            seq.delta_text += detok.flush()

    def _report(self, request_id: str) -> RequestOutput:
        request = self._requests[request_id]
        seqs, times = request.seqs, request.times
        outputs = []
        for seq in seqs:
            outputs.append(
                CompletionOutput(
                    index=seq.index, text=seq.detokenizer.output_text, token_ids=seq.output_token_ids,
                    delta_text=seq.delta_text, delta_token_ids=seq.delta_token_ids,
                    logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                )
            )
            seq.delta_text, seq.delta_token_ids = "", []
        finished = all(s.is_finished for s in seqs)
        if finished:
            del self._requests[request_id]
            self.stats.finished_requests += 1
            times.finished = time.monotonic()
        first = seqs[0]
        return RequestOutput(
            request_id=request_id, prompt=request.prompt, prompt_token_ids=first.prompt_token_ids, outputs=outputs,
            finished=finished, num_cached_tokens=first.num_cached_prompt_tokens,
            prompt_logprobs=list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
            error=next((s.error for s in seqs if s.error is not None), None),
            times=dataclasses.replace(times),
        )

    # ---- convenience ----------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; results in the order given."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"generate-{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def kernel_report(self) -> dict:
        """What this engine runs on and with: the CPU, the dtype and why, each linear shape's kernel."""
        cpu = cpu_capability()
        return {"cpu": cpu.summary(), "dtype": self.dtype_choice.name, "dtype_reason": self.dtype_choice.reason,
                "linear_kernels": self.executor.kernel_report()}

    def weight_bytes(self) -> int:
        """Bytes of the weights one rank holds (quantized codes and scales included)."""
        return self._weight_bytes

    def shutdown(self) -> None:
        self.executor.shutdown()
