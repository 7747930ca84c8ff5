"""Which linear kernel each weight gets: the rule, applied at load.

Rule:
1. Candidates are the kernels that run correctly for the weight's dtype on its device on this
   machine (kernels/linear.py `linear_kernels_for`, from kernels/capability.py); the reference is
   always one. A single candidate is taken without timing.
2. Otherwise each candidate is timed on the weight's own shape at the row counts of the step it
   serves (`rows`: 1, 8 and 32 by default - one sequence, a decode expert's share, a decode batch):
   after a warm-up, `repeats` interleaved rounds call every candidate at every row count; a
   candidate's time is the sum over row counts of its fastest call (noise from other processes only
   adds time, and interleaving spreads it over all candidates). The fastest wins. A candidate that
   raises is dropped (logged), so a kernel that fails here is never chosen.
3. The choice is remembered per (device, dtype, out, in) for the life of the process: every layer
   of that shape and every engine in the process use the same kernel, so two engines in one
   process compute bit-identical results.
4. `mode` other than "auto" forces a kernel (tests, benchmarks, `--linear-kernel`); a forced kernel
   the machine cannot run falls back to the reference with a warning.
Cost: a few milliseconds per distinct shape (mini: 5 shapes, ~0.1 s).

Weight-only quantized weights (int8/int4) have one more choice, per row count: PyTorch's weight-only
kernel or dequantize + one dense matmul (kernels/linear.py). `int_kernel_max_rows` times both at
INT_ROWS on the weight itself, interleaved as above, and keeps the kernel for every row count up to
the first one at which dequantizing is faster (the kernel's cost grows with rows, dequantizing's
barely does); remembered per (device, scheme, group, activation dtype, out, in). Cost: up to ~2 s per distinct
Mixtral-sized int4 shape (the dequantize side is the slow one).
"""

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

import torch.nn.functional as F

from .linear import LinearWeight, dequantized, linear, linear_kernels_for, pack_weight

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "reference", "onednn")
_CHOSEN: dict[tuple, "Choice"] = {}
INT_ROWS = (1, 8, 32, 128, 512)  # a sequence, an expert's decode share, decode batches, prefill chunks
_INT_MAX_ROWS: dict[tuple, int] = {}


@dataclass(frozen=True, slots=True)
class Choice:
    kernel: str
    timings_ms: dict[str, float]  # candidate -> summed median time at the timed row counts; {} if untimed

    def describe(self) -> str:
        if not self.timings_ms:
            return self.kernel
        others = ", ".join(f"{k} {ms:.2f} ms" for k, ms in self.timings_ms.items())
        return f"{self.kernel} ({others})"


def _interleaved_timings(weight: torch.Tensor, candidates: list[str], rows: tuple[int, ...], repeats: int):
    """Pack `weight` for each candidate (the reference is the weight itself; each other candidate one
    packed copy), then time them in interleaved rounds: round r calls every candidate at every row
    count once. A candidate's figure is the sum over row counts of its fastest call, so a burst of
    load from another process slows one round of every candidate instead of one candidate's calls.
    Returns {kernel: (packed, ms)}."""
    g = torch.Generator(device=weight.device).manual_seed(0)
    inputs = [torch.randn(r, weight.shape[1], generator=g, device=weight.device).to(weight.dtype) for r in rows]
    packed = {}
    for kernel in candidates:
        try:
            packed[kernel] = pack_weight(weight, kernel)
            for x in inputs:  # warm-up, and a kernel that fails here is dropped
                linear(x, packed[kernel])
        except RuntimeError as exc:  # a kernel this machine cannot run after all
            packed.pop(kernel, None)
            log.warning("linear kernel %s fails on %s %s: %s", kernel, tuple(weight.shape), weight.dtype, exc)
    best = {(kernel, i): float("inf") for kernel in packed for i in range(len(inputs))}
    for _ in range(repeats):
        for kernel, w in packed.items():
            for i, x in enumerate(inputs):
                start = time.perf_counter()
                linear(x, w)
                best[kernel, i] = min(best[kernel, i], time.perf_counter() - start)
    return {kernel: (w, 1e3 * sum(best[kernel, i] for i in range(len(inputs)))) for kernel, w in packed.items()}


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
        name = _report_name(weight.shape[0], weight.shape[1], weight.dtype)
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
            timed = _interleaved_timings(weight, candidates, self.rows, self.repeats)
            timings = {kernel: ms for kernel, (_, ms) in timed.items()}
            fastest = min(timings, key=timings.get) if timings else "reference"
            choice = _CHOSEN[key] = Choice(fastest, timings)
            packed = timed[fastest][0] if timed else None
            del timed
        self._report(name, choice.describe())
        return packed if packed is not None else pack_weight(weight, choice.kernel)

    def quantized(self, weight: LinearWeight) -> LinearWeight:
        """An int8/int4 weight with its weight-only kernel's row limit timed (int_kernel_max_rows), reported."""
        max_rows = int_kernel_max_rows(weight)
        group = f"group {weight.group_size}, " if weight.kernel == "int4" else ""
        self._report(_report_name(weight.out_features, weight.in_features, weight.scales.dtype),
                     f"{weight.kernel} ({group}weight-only kernel up to {max_rows} rows)")
        return weight

    def _report(self, name: str, choice: str) -> None:
        if name not in self.report:
            self.report[name] = choice
            log.info("linear %s: %s", name, choice)


def _report_name(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """The report's key for a weight shape: "out x in dtype"."""
    return f"{out_features}x{in_features} {str(dtype).replace('torch.', '')}"


def int_kernel_max_rows(weight: LinearWeight, rows: tuple[int, ...] = INT_ROWS, repeats: int = 3) -> int:
    """The most rows for which `weight`'s weight-only kernel beats dequantize + matmul here (0: never);
    sets weight.kernel_max_rows. Timed once per (device, scheme, group, dtype, shape)."""
    dtype, device = weight.scales.dtype, weight.data.device
    key = (str(device), weight.kernel, weight.group_size, dtype, weight.out_features, weight.in_features)
    if key not in _INT_MAX_ROWS:
        if device.type != "cpu":
            _INT_MAX_ROWS[key] = 0
        else:
            g = torch.Generator().manual_seed(0)
            inputs = [torch.randn(r, weight.in_features, generator=g).to(dtype) for r in rows]
            kernel_only = dataclasses.replace(weight, kernel_max_rows=max(rows))
            ways = {"kernel": lambda x: linear(x, kernel_only),
                    "dequantize": lambda x: F.linear(x, dequantized(weight, dtype))}
            best = {(way, i): float("inf") for way in ways for i in range(len(rows))}
            for _ in range(repeats + 1):  # the first round warms up and is timed too (min keeps the best)
                for way, run in ways.items():
                    for i, x in enumerate(inputs):
                        start = time.perf_counter()
                        run(x)
                        best[way, i] = min(best[way, i], time.perf_counter() - start)
            max_rows = 0
            for i, r in enumerate(rows):
                if best["kernel", i] > best["dequantize", i]:
                    break
                max_rows = r
            _INT_MAX_ROWS[key] = max_rows
            log.info("%s %dx%d %s: weight-only kernel up to %d rows (kernel %s ms, dequantize %s ms at rows %s)",
                     weight.kernel, weight.out_features, weight.in_features, dtype, max_rows,
                     [round(best["kernel", i] * 1e3, 3) for i in range(len(rows))],
                     [round(best["dequantize", i] * 1e3, 3) for i in range(len(rows))], list(rows))
    weight.kernel_max_rows = _INT_MAX_ROWS[key]
    return weight.kernel_max_rows
