"""Mixed-avatar batches: both strategies give every row what its own model gives it alone
(half width, tiny batches, eval mode), inputs are checked, the CPU computes in fp32, and
``compare_strategies`` reports both timings. CUDA precision cases run where CUDA is."""

from __future__ import annotations

import math

import pytest
import torch

from stages.lipsync.batching import (
    DEFAULT_STRATEGY,
    GROUPED,
    STACKED,
    STRATEGIES,
    compare_strategies,
    infer,
)
from stages.lipsync.unet import LipSyncUNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def calibrated(model: LipSyncUNet, seed: int) -> LipSyncUNet:
    """Eval mode with BatchNorm statistics from one random batch, so each random model's
    output depends strongly on its weights and inputs (default statistics flatten it)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(1, 6, 320, 320, generator=generator), torch.randn(1, 32, 16, 16, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> list[LipSyncUNet]:
    result = []
    for seed in range(2):
        torch.manual_seed(seed)
        result.append(calibrated(LipSyncUNet(width=0.5), seed))
    return result


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(3, 6, 320, 320, generator=generator), torch.randn(3, 32, 16, 16, generator=generator)


@pytest.fixture(scope="module")
def rows_alone(models, inputs) -> tuple[list[LipSyncUNet], torch.Tensor]:
    """Rows 0..2 of models 0, 1, 0 (model 0 twice, not side by side), each run alone."""
    x, audio = inputs
    per_row = [models[0], models[1], models[0]]
    with torch.no_grad():
        alone = torch.cat([per_row[b](x[b:b + 1], audio[b:b + 1]) for b in range(len(per_row))])
    return per_row, alone


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_row_gets_its_own_models_output(strategy, inputs, rows_alone, models):
    x, audio = inputs
    per_row, alone = rows_alone
    out = infer(per_row, x, audio, strategy=strategy)
    assert out.shape == (3, 3, 320, 320) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)
    # Rows already in model order (nothing to permute) as well.
    torch.testing.assert_close(infer(per_row[:2], x[:2], audio[:2], strategy=strategy), alone[:2],
                               atol=1e-5, rtol=1e-4)
    # The models really differ: a row run through another model would be far off.
    with torch.no_grad():
        other = models[0](x[1:2], audio[1:2])
    assert (other - alone[1:2]).abs().max() > 0.05


def test_one_model_for_every_row_is_a_plain_forward(models, inputs):
    x, audio = inputs
    with torch.no_grad():
        expected = models[1](x[:2], audio[:2])
    for strategy in STRATEGIES:
        torch.testing.assert_close(infer([models[1]] * 2, x[:2], audio[:2], strategy=strategy), expected)


def test_the_cpu_computes_in_fp32_and_answers_in_the_inputs_dtype(models, inputs):
    x, audio = (t[:1].to(torch.bfloat16) for t in inputs)
    with torch.no_grad():
        expected = models[0](x.float(), audio.float())
    out = infer([models[0]], x, audio)
    assert out.dtype == torch.bfloat16
    # Only the output's rounding to bf16 differs: half a step of 2**-8 at most in 0.5..1.
    assert (out.float() - expected).abs().max() <= 2**-9
    with pytest.raises(ValueError, match="on the CPU the U-Net runs in float32"):
        infer([LipSyncUNet(width=0.5).to(torch.bfloat16).eval()], x[:1], audio[:1])


def test_inputs_are_checked(models, inputs):
    x, audio = inputs
    with pytest.raises(ValueError, match="one per row, got 2 for 3 rows"):
        infer(models, x, audio)
    with pytest.raises(ValueError, match=r"audio must be \[3, 32, 16, 16\]"):
        infer([models[0]] * 3, x, audio[:, :16])
    with pytest.raises(ValueError, match=r"x must be \[B, 6, 320, 320\] with B >= 1"):
        infer([], x[:0], audio[:0])
    with pytest.raises(TypeError, match="floating point"):
        infer([models[0]], (x[:1] * 255).to(torch.uint8), audio[:1])
    with pytest.raises(ValueError, match="strategy 'fastest'"):
        infer([models[0]], x[:1], audio[:1], strategy="fastest")
    training = LipSyncUNet(width=0.5)
    with pytest.raises(ValueError, match=r"rows \[1\] are in training mode"):
        infer([models[0], training], x[:2], audio[:2])
    assert training.training


def test_compare_strategies_times_both_strategies():
    (row,) = compare_strategies(rows=2, model_counts=(2,), repeats=1, warmup=0)
    assert (row["rows"], row["models"]) == (2, 2)
    for strategy in STRATEGIES:
        assert math.isfinite(row[f"{strategy}_ms"]) and row[f"{strategy}_ms"] > 0
    assert row["faster"] == min(STRATEGIES, key=lambda s: row[f"{s}_ms"])
    assert DEFAULT_STRATEGY == GROUPED  # the CPU measurement's winner (module docstring)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", ["same", "float32"])
def test_cuda_half_precision_matches_each_row_alone(models, inputs, dtype, model_dtype):
    device = torch.device("cuda")
    x, audio = inputs
    x, audio = x.to(device, dtype), audio.to(device, dtype)
    on_gpu = [LipSyncUNet(width=0.5).to(device) for _ in range(2)]
    for model, source in zip(on_gpu, models):
        model.load_state_dict(source.state_dict())
        model.to(dtype if model_dtype == "same" else torch.float32).eval()  # fp32 model: autocast
    per_row = [on_gpu[0], on_gpu[1], on_gpu[0]]
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=model_dtype == "float32"):
        alone = torch.cat([per_row[b](x[b:b + 1], audio[b:b + 1]) for b in range(3)])
    for strategy in (GROUPED, STACKED):
        out = infer(per_row, x, audio, strategy=strategy)
        assert out.dtype == dtype and out.device.type == "cuda"
        torch.testing.assert_close(out.float(), alone.float(), atol=0.02, rtol=0)
