"""One tensor-parallel rank of a replica, run as a Ray actor by workers/ray_executor.py.

It holds only its shard of the weights (read as lazy safetensors slices) and its shard of the KV
cache (its KV heads). Every rank receives the same StepInput and runs the same forward; the
communicator sums partial results twice per layer; only the rank asked to sample returns tokens.
Plain class: `ray.remote` wraps it where the actors are created, so it is testable without Ray.
"""

import torch

from .communicator import CupyNcclCommunicator, GlooCommunicator, free_rendezvous_address
from .config import DTYPES, ModelConfig
from .loader import ShardSpec, WeightFormat
from .model_inputs import build_model_inputs
from .model_runner import CacheShape, ModelRunner
from .model_source import resolve_model
from .network_interface import interface_with_address
from .step_input import StepInput, StepOutput


class RankWorker:
    def __init__(self, rank: int, world_size: int, num_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.communicator = None
        self.runner: ModelRunner | None = None
        if num_threads:
            torch.set_num_threads(num_threads)

    # ---- start-up, in this order ------------------------------------------------------------

    def rendezvous_address(self) -> str:
        """Called on rank 0: a gloo rendezvous address on this node."""
        import ray

        return free_rendezvous_address(ray.util.get_node_ip_address())

    def nccl_unique_id(self) -> tuple:
        """Called on rank 0: the NCCL unique id every rank joins with."""
        return CupyNcclCommunicator.make_unique_id()

    def init_communicator(self, backend: str, rendezvous, timeout_s: float = 60.0) -> None:
        if backend == "gloo":
            import ray

            interface = interface_with_address(ray.util.get_node_ip_address())
            self.communicator = GlooCommunicator(rendezvous, self.rank, self.world_size, timeout_s, interface)
        elif backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes exactly the rank's GPU as device 0
            self.communicator = CupyNcclCommunicator(rendezvous, self.rank, self.world_size, 0)
        else:
            raise ValueError(f"unknown communicator backend {backend!r}")

    def load(self, model_path: str, config: ModelConfig, dtype: str, cache: CacheShape, device: str,
             expert_parallel: bool = False, weights: WeightFormat = WeightFormat()) -> int:
        """Load this rank's shard and allocate its KV cache; returns its weight bytes."""
        all_reduce = self.communicator.all_reduce if self.communicator else (lambda x: x)
        shard = ShardSpec(self.rank, self.world_size, expert_parallel)
        self.runner = ModelRunner(
            resolve_model(model_path), config, DTYPES[dtype], cache, shard, all_reduce,
            device="cuda" if device == "cuda" else "cpu", weights=weights,
        )
        return self.weight_bytes()

    # ---- serving ----------------------------------------------------------------------------

    def execute(self, step: StepInput, sample: bool) -> StepOutput | None:
        return self.runner.execute(step, sample=sample)

    @torch.inference_mode()
    def logits(self, step: StepInput) -> torch.Tensor:
        """The full logits [R, V] this step would sample from (for scoring and tests)."""
        r = self.runner
        inputs = build_model_inputs(step, r.cache.block_size, r.config.sliding_window)
        return r.model.forward(inputs.input_ids, inputs.positions, inputs.meta, r.kv_cache, inputs.logits_indices)

    def local_experts(self) -> list[list[int]]:
        """Per MoE layer, the experts whose weights this rank holds."""
        return [[e for e, w in enumerate(layer.mlp.w13) if w is not None]
                for layer in self.runner.model.layers if hasattr(layer.mlp, "gate")]

    def weight_bytes(self) -> int:
        return self.runner.model.weight_bytes()

    # ---- re-reading the weights, two-phase (workers/ray_executor.py `reload_weights`) ----------

    def stage_weights(self, weights: WeightFormat) -> None:
        """Read this rank's shard again in another format next to the serving one (WeightReloadError
        if that fails: the rank keeps serving its shard)."""
        self.runner.stage_weights(weights)

    def swap_staged(self) -> int:
        """Serve the staged shard; returns its weight bytes."""
        self.runner.swap_staged()
        return self.weight_bytes()

    def discard_staged(self) -> None:
        self.runner.discard_staged()

    def kernel_report(self) -> dict[str, str]:
        return dict(self.runner.model.kernel_report)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        if self.communicator is not None:
            self.communicator.close()
