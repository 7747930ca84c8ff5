"""kernels/activation_aware.py + the input scales of kernels/linear.py: on activations whose channels
differ in size (as real models' do), scaling input channels before rounding lowers the error of the
layer's output; the choice never does worse than plain rounding on its own estimate; the layer
computes x diag(input_scale) W'^T with W' what is stored; and `observing_inputs` sees every input."""

import pytest
import torch

from mixserve.kernels.activation_aware import ALPHAS, ChannelStats, StatsCollector, input_channel_scales
from mixserve.kernels.linear import dequantized, linear, observing_inputs, pack_weight
from mixserve.kernels.quantize import round_trip


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _activations(rows: int, k: int, seed: int, outliers: int = 8, size: float = 30.0) -> torch.Tensor:
    """[rows, k] activations, `outliers` channels `size` times larger than the rest."""
    x = _randn(rows, k, seed=seed)
    x[:, :outliers] *= size
    return x


def _stats(x: torch.Tensor) -> ChannelStats:
    stats = ChannelStats()
    for part in x.split(100):  # accumulated over several calls, as over calibration chunks
        stats.add(part)
    return stats


def _estimate(weight, stats, scheme, s):
    """The objective: sum_j E[x_j^2] ||W_:j - Q(W s)_:j / s_j||^2."""
    error = ((weight - round_trip(weight * s, scheme, 64) / s) ** 2).sum(dim=0).double()
    return (error * stats.square_sum / stats.rows).sum().item()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_scaled_rounding_lowers_the_output_error_on_uneven_activations(scheme):
    """A [512, 1024] weight, activations with 8 channels 30x the others: calibrated on one sample,
    measured on another, the layer's output error falls by a quarter or more (measured: int8 0.65x, int4 0.66x)."""
    weight = _randn(512, 1024, seed=1) * 1024**-0.5
    calibration, held_out = _activations(800, 1024, seed=2), _activations(300, 1024, seed=3)
    scale, alpha = input_channel_scales(weight, _stats(calibration), lambda w: round_trip(w, scheme, 64))
    assert alpha > 0 and scale[:8].min() > 1.5 * scale[8:].max()  # the large channels get the fine grid
    plain, aware = pack_weight(weight, scheme, 64), pack_weight(weight, scheme, 64, channel_scale=scale)
    assert aware.input_scale.shape == (1024,) and plain.input_scale is None
    exact = held_out @ weight.T  # [300, 512]
    plain_error = (linear(held_out, plain) - exact).norm() / exact.norm()
    aware_error = (linear(held_out, aware) - exact).norm() / exact.norm()
    print(f"\n{scheme}: relative output error plain {plain_error:.5f}, activation-aware {aware_error:.5f} "
          f"(alpha {alpha})")
    assert aware_error < 0.75 * plain_error, (plain_error, aware_error)


def test_the_choice_is_never_worse_than_plain_rounding_on_its_estimate():
    """alpha = 0 is plain rounding, so the chosen scales' estimated error is at most plain rounding's,
    for even activations too (where scaling has little to gain)."""
    weight = _randn(256, 512, seed=4) * 512**-0.5
    for x in (_activations(400, 512, seed=5), _randn(400, 512, seed=6)):
        stats = _stats(x)
        for scheme in ("int8", "int4"):
            scale, alpha = input_channel_scales(weight, stats, lambda w, s=scheme: round_trip(w, s, 64))
            assert alpha in ALPHAS
            assert _estimate(weight, stats, scheme, scale) <= _estimate(weight, stats, scheme, torch.ones(512))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_the_layer_multiplies_its_input_by_the_input_scale(dtype, rows):
    """linear(x, w) = (x * input_scale) @ dequantized(w)^T, through the weight-only kernel (1 row in
    bfloat16) and through dequantize + matmul alike, with the input scale in the activations' dtype."""
    weight = (_randn(128, 256, seed=7) * 256**-0.5).to(dtype)
    scale = torch.rand(256, generator=torch.Generator().manual_seed(8)) * 4 + 0.25
    x = _randn(rows, 256, seed=9).to(dtype)
    for scheme in ("int8", "int4"):
        packed = pack_weight(weight, scheme, 64, channel_scale=scale)
        assert packed.input_scale.dtype == dtype
        expected = (x * packed.input_scale).float() @ dequantized(packed, torch.float32).T
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(linear(x, packed).float(), expected, rtol=tolerance, atol=tolerance)
        # the stored weight times the input scale stands for the original weight
        effective = dequantized(packed, torch.float32) * packed.input_scale.float()
        error = ((effective - weight.float()).norm() / weight.float().norm()).item()
        assert error < (0.05 if scheme == "int8" else 0.3), error  # a scale range of 17x widens the grid


def test_channel_scales_are_for_quantized_weights_only():
    with pytest.raises(ValueError, match="int8/int4"):
        pack_weight(_randn(64, 64, seed=10), "reference", channel_scale=torch.ones(64))


def test_observing_inputs_sees_every_named_input_and_ends_with_the_block():
    weight = pack_weight(_randn(64, 32, seed=11), "int8")
    weight.name = "layers.0.qkv"
    unnamed = pack_weight(_randn(64, 32, seed=12), "int8")
    collector = StatsCollector()
    with observing_inputs(collector.observe):
        with pytest.raises(RuntimeError, match="already"):
            with observing_inputs(collector.observe):
                pass
        linear(_randn(5, 32, seed=13), weight)
        linear(_randn(3, 32, seed=14), weight)
        linear(_randn(4, 32, seed=15), unnamed)
    linear(_randn(2, 32, seed=16), weight)  # after the block: not observed
    assert list(collector.stats) == ["layers.0.qkv"]
    stats = collector.stats["layers.0.qkv"]
    x = torch.cat([_randn(5, 32, seed=13), _randn(3, 32, seed=14)]).double()
    assert stats.rows == 8
    torch.testing.assert_close(stats.abs_sum, x.abs().sum(0))
    torch.testing.assert_close(stats.square_sum, (x * x).sum(0))
    with pytest.raises(ZeroDivisionError):  # an observer that fails ends the block too
        with observing_inputs(lambda name, x: 1 / 0):
            linear(_randn(1, 32, seed=17), weight)
    with observing_inputs(collector.observe):  # free again
        pass
