"""The cupy/NCCL communicator: runs where cupy and at least two GPUs exist, skips elsewhere.
The CPU path (gloo) goes through the same RankWorker/RayExecutor code in test_tensor_parallel.py."""

import threading

import pytest
import torch

cupy = pytest.importorskip("cupy")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

from mixserve.workers.communicator import CupyNcclCommunicator  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_reduce_sums_across_two_gpus(dtype):
    uid = CupyNcclCommunicator.make_unique_id()
    results = {}

    def rank(r):
        torch.cuda.set_device(r)
        comm = CupyNcclCommunicator(uid, r, 2, device_index=r)
        t = torch.full((1024,), float(r + 1), device=f"cuda:{r}", dtype=dtype)
        comm.all_reduce(t)
        torch.cuda.synchronize(r)
        results[r] = t.float().cpu()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert torch.equal(results[0], torch.full((1024,), 3.0)) and torch.equal(results[1], results[0])
