"""The sizes of one comparison (compare.py's flags) and what follows from them: the KV cache a
replica gets and the dtype an engine computes in.

A replica's KV cache: for the random workload, room for every request in flight twice over (at least
16 MiB); for the shared-prefix and multi-turn workloads (the prefix stage), room for half the groups'
prefixes plus the own blocks (suffix and output) of every request in flight, so less than all the
prefixes: only a router that keeps each group on one replica keeps its hits.
"""

from dataclasses import dataclass

from mixserve.bench.offline import OfflineWorkload

_RANDOM = OfflineWorkload()  # the random workload's sizes, which the fields below reuse


@dataclass(slots=True)
class CompareSizes:
    num_prompts: int = _RANDOM.num_prompts
    input_len: int = _RANDOM.input_len
    output_len: int = _RANDOM.output_len
    concurrency: int = 32
    groups: int = 8
    users_per_group: int = 8
    prefix_len: int = 1024
    suffix_len: int = 32
    prefix_output_len: int = 16
    prefix_concurrency: int = 4
    conversations: int = 8  # multi-turn (prefix stage): conversations, each `turns` chat turns
    turns: int = 4
    user_len: int = 64
    turn_output_len: int = 32
    max_model_len: int = 2048
    dtype: str = "auto"  # served stages and transformers; resolved by workers/dtype_choice.py
    offline_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # offline stages of mixserve and vLLM
    one_at_a_time: int = 4  # prompts generated alone, one after another, per offline run (0: none)
    quantizations: tuple[str, ...] = ("int8", "int4")  # quantized stage: mixserve offline in the served dtype
    # runs of each throughput the targets compare (offline batches, vLLM's client runs), median reported
    repeats: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> "CompareSizes":
        """The smoke-test sizes for the tiny model: seconds per stage."""
        return cls(num_prompts=4, input_len=32, output_len=8, concurrency=4, groups=4, users_per_group=2,
                   prefix_len=768, suffix_len=16, prefix_output_len=4, prefix_concurrency=2, conversations=2, turns=2,
                   user_len=16, turn_output_len=4, max_model_len=1024, dtype="float32", one_at_a_time=2,
                   repeats=1)

    @classmethod
    def from_json(cls, saved: dict) -> "CompareSizes":
        """The sizes a compare.json recorded (`sizes`); a field it predates keeps its default."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})

    def ideal_prefix_hit_rate(self) -> float:
        """The shared-prefix workload's: every request but the first of its group hits its prefix
        (workloads.py `Workload.ideal_prefix_hit_rate`; its prompts have these exact lengths)."""
        users = self.users_per_group
        return (users - 1) * self.prefix_len / (users * (self.prefix_len + self.suffix_len))


def random_kv_bytes(sizes: CompareSizes, per_token: int) -> int:
    return max(16 << 20, 2 * sizes.num_prompts * (sizes.input_len + sizes.output_len + 32) * per_token)


def prefix_kv_bytes(sizes: CompareSizes, per_token: int, block_size: int = 16) -> int:
    """Half the groups' prefixes plus the own blocks of every request in flight."""
    blocks = -(-sizes.prefix_len // block_size)
    tail = -(-(sizes.suffix_len + sizes.prefix_output_len) // block_size) + 1
    total = -(-sizes.groups // 2) * blocks + sizes.prefix_concurrency * tail
    return max(1 << 20, total * block_size * per_token)  # ServeSettings' floor: 1 MiB


def kv_bytes_per_token(model: str, dtype: str) -> int:
    from mixserve.workers.config import DTYPES, load_model_config
    from mixserve.workers.model_runner import kv_bytes_per_block

    return kv_bytes_per_block(load_model_config(model), 1, DTYPES[concrete_dtype(model, dtype)])


def concrete_dtype(model: str, dtype: str, kv_cache_bytes: int = 0) -> str:
    """The dtype an engine computes in when asked for `dtype` (auto resolved as the engine does)."""
    from mixserve.workers.config import load_model_config
    from mixserve.workers.dtype_choice import choose_dtype

    return choose_dtype(dtype, load_model_config(model), "cpu", 1, kv_cache_bytes).name
