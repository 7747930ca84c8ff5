"""Activation-aware weight quantization: scale each input channel before rounding (AWQ's idea).

Rule. A linear layer computes W x = (W diag(s)) (x / s) for any positive s [K]. Rounding W diag(s)
instead of W gives the input channels with a large s a finer grid relative to their weights, so
the channels that carry large activations lose less. For each weight:
- s = m^a / sqrt(max(m^a) min(m^a)), where m_j = mean |x_j| over calibration text (the observed
  inputs of that very weight) and a is picked from 0, 0.1, ..., 1;
- a minimises the output error estimated from the same text, sum_j E[x_j^2] ||W_:j - Q(W s)_:j / s_j||^2:
  llama.cpp's importance-matrix objective, the expected squared output error when rounding errors of
  different columns are uncorrelated (true of round-to-nearest). a = 0 is plain rounding (s = 1), so
  the choice is never worse than plain rounding on that estimate. Rows round independently under
  both schemes (per-row int8 scales, per-row int4 groups), so the estimate is taken over at most
  SEARCH_ROWS evenly spaced rows: the search costs the same for a Mixtral expert as for a small model.
The layer then multiplies its input by 1/s (`LinearWeight.input_scale`) before the weight-only
kernel: one elementwise product of the [T, K] activations.

`ChannelStats` accumulates m and E[x^2] per weight; `observing_inputs` (kernels/linear.py) feeds it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ALPHAS = tuple(a / 10 for a in range(11))
SEARCH_ROWS = 512


@dataclass(slots=True)
class ChannelStats:
    """Per input channel sums over the rows a weight saw: |x| and x^2 (float64, [K]), and the row count."""

    abs_sum: torch.Tensor | None = None
    square_sum: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [n, K] inputs of the weight."""
        x = x.detach().double()
        abs_sum, square_sum = x.abs().sum(dim=0), (x * x).sum(dim=0)  # [K]
        if self.abs_sum is None:
            self.abs_sum, self.square_sum = abs_sum, square_sum
        else:
            self.abs_sum += abs_sum
            self.square_sum += square_sum
        self.rows += x.shape[0]


@dataclass(slots=True)
class StatsCollector:
    """Collects ChannelStats by weight name; `observe` is the callback `observing_inputs` takes."""

    stats: dict[str, ChannelStats] = field(default_factory=dict)

    def observe(self, name: str, x: torch.Tensor) -> None:
        if name and x.shape[0]:
            self.stats.setdefault(name, ChannelStats()).add(x)


def input_channel_scales(
    weight: torch.Tensor,
    stats: ChannelStats,
    round_trip: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """weight: [N, K]; `round_trip(w)` quantizes and dequantizes w ([N, K] float32) under the scheme
    the weight will get. -> (s float32 [K], the chosen a)."""
    w = weight[:: max(1, weight.shape[0] // SEARCH_ROWS)].float()  # [<= ~2 SEARCH_ROWS, K]
    mean_abs = (stats.abs_sum / stats.rows).float().clamp(min=1e-6)  # [K]
    importance = (stats.square_sum / stats.rows)  # [K] float64: E[x_j^2]
    best: tuple[float, torch.Tensor, float] | None = None
    for alpha in ALPHAS:
        s = mean_abs**alpha
        s = s / (s.max() * s.min()).sqrt()  # [K], geometric middle at 1
        error = ((w - round_trip(w * s) / s) ** 2).sum(dim=0).double()  # [K]
        cost = (error * importance).sum().item()
        if best is None or cost < best[0]:
            best = (cost, s, alpha)
    return best[1], best[2]
