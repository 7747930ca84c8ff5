"""Sum tensors across the tensor-parallel ranks of one replica.

One small interface, two backends, chosen by the device the model runs on:
- `GlooCommunicator`: torch.distributed's gloo backend for CPU tensors. The engine picks the
  rendezvous address (rank 0's node IP and a free port) and hands it to every rank explicitly; each
  rank's gloo talks over the interface that holds its own node IP (workers/network_interface.py).
- `CupyNcclCommunicator`: NCCL through cupy for CUDA tensors. Rank 0 makes the unique id, the
  engine passes it to every rank, and each rank builds its communicator eagerly (the engine waits
  on all of them under a timeout); all-reduces are issued on torch's current CUDA stream.
The model calls `all_reduce` exactly twice per layer (workers/model.py); the step code is the same
for both backends.
"""

import os
from datetime import timedelta
from typing import Protocol

import torch

from .ports import free_port


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place; returns it."""

    def close(self) -> None: ...


def free_rendezvous_address(host: str) -> str:
    """host:port with a port that was free a moment ago (for gloo's TCP rendezvous)."""
    return f"{host}:{free_port(host)}"


class GlooCommunicator:
    def __init__(self, address: str, rank: int, world_size: int, timeout_s: float = 60.0,
                 interface: str | None = None):
        """`interface`: the network interface gloo uses (GLOO_SOCKET_IFNAME, unless already set)."""
        import torch.distributed as dist

        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        self._dist = dist
        self.rank, self.world_size = rank, world_size
        dist.init_process_group(
            "gloo", init_method=f"tcp://{address}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _nccl_dtype(nccl, dtype: torch.dtype) -> int:
    codes = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16}
    if hasattr(nccl, "NCCL_BFLOAT16"):
        codes[torch.bfloat16] = nccl.NCCL_BFLOAT16
    if dtype not in codes:
        raise TypeError(f"NCCL all-reduce of {dtype} is not supported by this cupy build")
    return codes[dtype]


class CupyNcclCommunicator:
    def __init__(self, unique_id: tuple, rank: int, world_size: int, device_index: int = 0):
        import cupy
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank, self.world_size = rank, world_size
        with cupy.cuda.Device(device_index):
            self._comm = nccl.NcclCommunicator(world_size, unique_id, rank)

    @staticmethod
    def make_unique_id() -> tuple:
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.is_cuda and tensor.is_contiguous()
        stream = torch.cuda.current_stream(tensor.device).cuda_stream
        self._comm.allReduce(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), _nccl_dtype(self._nccl, tensor.dtype),
            self._nccl.NCCL_SUM, stream,
        )
        return tensor

    def close(self) -> None:
        self._comm = None
