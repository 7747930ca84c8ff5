"""What this machine can run: probed once per process, read by the kernel choices.

Rule: a fast path is used only where the probe says the processor (and the torch build) runs it;
everything else falls back to the PyTorch reference, so no CPU without AVX-512 or AMX ever crashes.

The vector ISA is torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`), which
honours torch's switch `ATEN_CPU_CAPABILITY=avx2|default`: with it set, an AVX-512 machine also
reports its AVX-512 features as absent, so the whole engine takes the AVX2 machine's choices (set
`ONEDNN_MAX_CPU_ISA=AVX2` as well to keep oneDNN's own JIT kernels at AVX2). Nothing else is read
from the environment.

Facts and what follows from them:
- oneDNN bf16 weight packing (`mkldnn._reorder_linear_weight` on bfloat16) needs avx512bw+vl+dq or
  avx_ne_convert (torch refuses it otherwise: "bf16 path needs the cpu support ...");
- native bf16 math (a bf16 matmul faster than float32) needs avx512_bf16, AMX-BF16 or
  avx_ne_convert; without it bf16 is converted in software and runs at a fraction of float32;
- oneDNN float32 packing runs on every x86 CPU oneDNN supports.
"""

import functools
import platform
from dataclasses import asdict, dataclass

import torch

_REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "avx_ne_convert")


@dataclass(frozen=True, slots=True)
class CpuCapability:
    model_name: str
    isa: str  # torch's dispatch level: "DEFAULT", "AVX2", "AVX512", "SVE256", ...
    flags: frozenset[str]  # the processor's features that matter here, capped by `isa`
    onednn: bool  # torch was built with oneDNN (mkldnn) and it is usable

    @property
    def onednn_bf16_packing(self) -> bool:
        """oneDNN will pack (and run) bfloat16 linear weights."""
        avx512 = {"avx512bw", "avx512vl", "avx512dq"} <= self.flags
        return self.onednn and (avx512 or "avx_ne_convert" in self.flags)

    @property
    def onednn_float32_packing(self) -> bool:
        return self.onednn and self.isa != "DEFAULT"

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (so bf16 is the faster dtype, not only the smaller)."""
        return bool({"avx512_bf16", "amx_bf16", "avx_ne_convert"} & self.flags)

    def summary(self) -> dict:
        """For logs and benchmark JSON: model, ISA and each reported flag as a bool."""
        out = asdict(self)
        out["flags"] = {name: name in self.flags for name in _REPORTED_FLAGS}
        out["native_bf16"] = self.native_bf16
        return out

    def line(self) -> str:
        present = [name for name in _REPORTED_FLAGS if name in self.flags]
        return f"{self.model_name} | torch ISA {self.isa} | {' '.join(present) or 'no vector flags'}"


def _cpuinfo() -> tuple[str, set[str]]:
    """Model name and flag words of the first processor in /proc/cpuinfo (empty off Linux)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def _cap_by_isa(flags: set[str], isa: str) -> set[str]:
    """Drop the features above torch's dispatch level (ATEN_CPU_CAPABILITY lowers it)."""
    if isa == "AVX512":
        return flags
    flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    if isa != "AVX2":
        flags -= {"avx2", "avx_ne_convert", "avx_vnni"}
    return flags


@functools.cache
def cpu_capability() -> CpuCapability:
    name, flags = _cpuinfo()
    isa = torch.backends.cpu.get_cpu_capability()
    if not flags:  # no /proc/cpuinfo: ask torch's cpuinfo instead
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        flags = {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}
        if "avx512f" in flags:
            flags |= {"avx512bw", "avx512vl", "avx512dq"}
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    return CpuCapability(name, isa, frozenset(_cap_by_isa(flags, isa) & set(_REPORTED_FLAGS)), onednn)
