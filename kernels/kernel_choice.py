"""Which linear kernel each weight gets: the rule, applied at load.

Rule:
1. Candidates are the kernels that run correctly for the weight's dtype on its device on this
   machine (kernels/linear.py `linear_kernels_for`, from kernels/capability.py); the reference is
   always one. A single candidate is taken without timing.
2. Otherwise each candidate is timed on the weight's own shape at the row counts of the step it
   serves (`rows`: 1, 8 and 32 by default - one sequence, a decode expert's share, a decode batch),
   median of `repeats` calls after a warm-up, summed over the row counts; the fastest wins. A
   candidate that raises is dropped (logged), so a kernel that fails here is never chosen.
3. The choice is remembered per (device, dtype, out, in) for the life of the process: every layer
   of that shape and every engine in the process use the same kernel, so two engines in one
   process compute bit-identical results.
4. `mode` other than "auto" forces a kernel (tests, benchmarks, `--linear-kernel`); a forced kernel
   the machine cannot run falls back to the reference with a warning.
Cost: a few milliseconds per distinct shape (mini: 5 shapes, ~0.1 s).
"""

import logging
import time
from dataclasses import dataclass, field

import torch

from .linear import LinearWeight, linear, linear_kernels_for, pack_weight

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "reference", "onednn")
_CHOSEN: dict[tuple, "Choice"] = {}


@dataclass(frozen=True, slots=True)
class Choice:
    kernel: str
    timings_ms: dict[str, float]  # candidate -> summed median time at the timed row counts; {} if untimed

    def describe(self) -> str:
        if not self.timings_ms:
            return self.kernel
        others = ", ".join(f"{k} {ms:.2f} ms" for k, ms in self.timings_ms.items())
        return f"{self.kernel} ({others})"


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _timed_packs(weight: torch.Tensor, candidates: list[str], rows: tuple[int, ...], repeats: int):
    """Pack `weight` for each candidate in turn and time it; yields (kernel, packed, ms). Only one
    packed copy exists at a time beside the weight (the caller keeps the fastest)."""
    g = torch.Generator(device=weight.device).manual_seed(0)
    inputs = [torch.randn(r, weight.shape[1], generator=g, device=weight.device).to(weight.dtype) for r in rows]
    for kernel in candidates:
        try:
            packed = pack_weight(weight, kernel)
            yield kernel, packed, sum(_median_ms(lambda x=x: linear(x, packed), repeats) for x in inputs)
        except RuntimeError as exc:  # a kernel this machine cannot run after all
            log.warning("linear kernel %s fails on %s %s: %s", kernel, tuple(weight.shape), weight.dtype, exc)


@dataclass
class LinearKernelChooser:
    """Packs a model's linear weights with the chosen kernel and keeps a report of the choices."""

    mode: str = "auto"
    rows: tuple[int, ...] = (1, 8, 32)
    repeats: int = 5
    report: dict[str, str] = field(default_factory=dict)  # "out x in dtype" -> choice

    def __post_init__(self):
        if self.mode not in KERNEL_MODES:
            raise ValueError(f"linear kernel must be one of {', '.join(KERNEL_MODES)}; got {self.mode!r}")

    def pack(self, weight: torch.Tensor) -> LinearWeight:
        """weight: [out, in] -> LinearWeight with the kernel for weights of its shape, dtype and device."""
        name = f"{weight.shape[0]}x{weight.shape[1]} {str(weight.dtype).replace('torch.', '')}"
        candidates = linear_kernels_for(weight.dtype, weight.device)
        key = (str(weight.device), weight.dtype, *weight.shape)
        packed = None
        if self.mode != "auto":
            choice = Choice(self.mode if self.mode in candidates else "reference", {})
            if choice.kernel != self.mode:
                log.warning("linear kernel %s cannot run %s here; using the reference", self.mode, weight.dtype)
        elif key in _CHOSEN or len(candidates) == 1:
            choice = _CHOSEN.setdefault(key, Choice(candidates[0], {}))
        else:
            timings, best = {}, None
            for kernel, candidate, ms in _timed_packs(weight, candidates, self.rows, self.repeats):
                timings[kernel] = ms
                if best is None or ms < timings[best[0]]:
                    best = (kernel, candidate)
                del candidate
            choice = _CHOSEN[key] = Choice(best[0] if best else "reference", timings)
            packed = best[1] if best else None
        if name not in self.report:
            self.report[name] = choice.describe()
            log.info("linear %s: %s", name, self.report[name])
        return packed if packed is not None else pack_weight(weight, choice.kernel)
