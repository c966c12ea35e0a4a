"""One U-Net call for a batch whose rows belong to different avatars' models.

A lip-sync server batches the frames of many sessions; each session talks through its
own avatar, and each avatar may have its own trained U-Net (same architecture, its own
weights). ``infer(models, x, audio)`` runs row ``b`` through ``models[b]``. Two ways:

- ``grouped``: the rows of each distinct model are gathered and that model runs once on
  them; the outputs are scattered back. Cost: one ordinary forward per distinct model.
- ``stacked``: the distinct models' weights are stacked (``torch.func.stack_module_state``)
  and one ``vmap``'d ``functional_call`` runs every model on its own group at once (groups
  padded to the largest with copies of their first row). Each conv becomes one grouped
  conv over all models, so the number of kernel launches no longer grows with the number
  of models; the price is copying every model's weights into the stack on each call, the
  padding rows, and grouped convs that are slower per FLOP than plain ones.

Measured with ``compare_strategies`` (CPU, 2 threads, half width, fp32, 8 rows spread
over 4 / 8 models, best of 5 interleaved calls): grouped 1.29 / 2.49 s per batch, stacked
2.66 / 2.97 s (with 1 model both are the same plain forward, 1.39-1.44 s). The machine
was shared (load average 3-6 on 2 cores), so the absolute figures are inflated, but the
order held in 7 of the 8 multi-model comparisons made while writing this, by 1.2-3.3x
(a grouped conv over all models does the same arithmetic as the separate convs, and stacking
adds the weight copies, the padding rows and vmap's reshapes on top). ``grouped`` is
therefore the default. On a GPU the balance may change (a small forward is bound by
kernel launches there, and stacking shares them among the models), so the GPU benchmark
(``runtime/bench/lipsync_gpu.py``) measures both with 10 and 100 avatars and runs this
comparison on the GPU; switch ``DEFAULT_STRATEGY`` if its figures say so.

Precision: on CUDA, fp16/bf16 inputs run either directly (models already converted to
that dtype: fastest, half the memory) or under autocast (fp32 models); the output has the
input's dtype. On the CPU everything runs in fp32, whatever the input dtype.

Both strategies need eval mode: a BatchNorm in training mode would normalise with the
batch's statistics, mixing rows (and models) into each other.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from stages.lipsync.unet import (
    AUDIO_CHANNELS,
    AUDIO_SIZE,
    IMAGE_CHANNELS,
    SIZE,
    LipSyncUNet,
)

GROUPED, STACKED = "grouped", "stacked"
STRATEGIES = (GROUPED, STACKED)
DEFAULT_STRATEGY = GROUPED
"""The faster on the CPU (see the module docstring); the GPU benchmark measures both."""
HALF_DTYPES = (torch.float16, torch.bfloat16)


def infer(models: Sequence[LipSyncUNet], x: torch.Tensor, audio: torch.Tensor, *,
          strategy: str = DEFAULT_STRATEGY) -> torch.Tensor:
    """``out[b] = models[b](x[b], audio[b])`` for every row, as one batch.

    ``x [B, 6, 320, 320]``, ``audio [B, 32, 16, 16]`` on the models' device; ``models``
    may repeat (rows of one avatar share its model) and must be in eval mode. Returns
    ``[B, 3, 320, 320]`` in ``x``'s dtype, without gradients.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: allowed {', '.join(STRATEGIES)}")
    _check_inputs(models, x, audio)
    distinct = _distinct(models)
    _check_models(distinct, x.device)
    out_dtype = x.dtype
    with torch.no_grad(), _precision(distinct[0], x, audio) as (xs, audios):
        if strategy == STACKED and len(distinct) > 1:
            out = _infer_stacked(models, distinct, xs, audios)
        else:  # one model: stacking adds nothing but the copy
            out = _infer_grouped(models, distinct, xs, audios)
    return out.to(out_dtype)


def _infer_grouped(models: Sequence[nn.Module], distinct: list[nn.Module], x: torch.Tensor,
                   audio: torch.Tensor) -> torch.Tensor:
    if len(distinct) == 1:
        return distinct[0](x, audio)
    rows = _rows_by_model(models, distinct)
    order = [b for group in rows for b in group]
    # One gather puts each model's rows side by side (one index copy to the device, not
    # one per model), each model runs on its slice, one scatter restores the row order.
    permuted = order != list(range(len(order)))
    if permuted:
        perm = torch.as_tensor(order, device=x.device)
        x, audio = x.index_select(0, perm), audio.index_select(0, perm)
    outputs, start = [], 0
    for model, group in zip(distinct, rows):
        outputs.append(model(x[start:start + len(group)], audio[start:start + len(group)]))
        start += len(group)
    y = torch.cat(outputs)
    if not permuted:
        return y
    return torch.empty_like(y).index_copy_(0, perm, y)  # out[order[i]] = y[i]


def _infer_stacked(models: Sequence[nn.Module], distinct: list[nn.Module], x: torch.Tensor,
                   audio: torch.Tensor) -> torch.Tensor:
    kinds = {(type(m), getattr(m, "width", None), getattr(m, "audio_mode", None)) for m in distinct}
    if len(kinds) > 1:  # weights of different shapes cannot be stacked
        return _infer_grouped(models, distinct, x, audio)
    rows = _rows_by_model(models, distinct)
    group = max(len(r) for r in rows)
    # [M, G] row numbers: each group padded with its own first row (a real input, so the
    # padding computes nothing odd; its outputs are dropped).
    padded = torch.as_tensor([r + r[:1] * (group - len(r)) for r in rows], device=x.device)
    params, buffers = stack_module_state(list(distinct))
    skeleton = _skeleton(distinct[0])

    def one_model(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xs: torch.Tensor,
                  auds: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, (p, b), (xs, auds))

    ys = torch.vmap(one_model)(params, buffers, x[padded], audio[padded])  # [M, G, 3, H, W]
    where = [0] * x.shape[0]  # row b's place in the flattened [M * G] outputs
    for m, r in enumerate(rows):
        for j, b in enumerate(r):
            where[b] = m * group + j
    return ys.flatten(0, 1).index_select(0, torch.as_tensor(where, device=x.device))


_local = threading.local()


def _skeleton(model: nn.Module) -> nn.Module:
    """A weightless (meta-device) copy of ``model``'s structure for ``functional_call``,
    one per thread and structure: functional_call swaps tensors into the module while it
    runs, so two threads must not share one (nor may it be a live model)."""
    cache: dict[Any, nn.Module] = _local.__dict__.setdefault("skeletons", {})
    key = (type(model), getattr(model, "width", None), getattr(model, "audio_mode", None))
    if key not in cache:
        cache[key] = copy.deepcopy(model).to("meta").eval()
    return cache[key]


def _distinct(models: Sequence[nn.Module]) -> list[nn.Module]:
    """The models in order of first appearance, each once (by identity)."""
    seen: dict[int, nn.Module] = {}
    for model in models:
        seen.setdefault(id(model), model)
    return list(seen.values())


def _rows_by_model(models: Sequence[nn.Module], distinct: list[nn.Module]) -> list[list[int]]:
    """Row numbers of each distinct model, in ``distinct``'s order."""
    position = {id(m): i for i, m in enumerate(distinct)}
    rows: list[list[int]] = [[] for _ in distinct]
    for b, model in enumerate(models):
        rows[position[id(model)]].append(b)
    return rows


def _check_inputs(models: Sequence[nn.Module], x: torch.Tensor, audio: torch.Tensor) -> None:
    batch = x.shape[0] if x.dim() else 0
    if x.shape != (batch, IMAGE_CHANNELS, SIZE, SIZE) or batch == 0:
        raise ValueError(f"x must be [B, {IMAGE_CHANNELS}, {SIZE}, {SIZE}] with B >= 1, got {tuple(x.shape)}")
    if audio.shape != (batch, AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE):
        raise ValueError(f"audio must be [{batch}, {AUDIO_CHANNELS}, {AUDIO_SIZE}, {AUDIO_SIZE}], "
                         f"got {tuple(audio.shape)}")
    if len(models) != batch:
        raise ValueError(f"models: one per row, got {len(models)} for {batch} rows")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point (0..1), got {x.dtype}")
    training = [i for i, m in enumerate(models) if m.training]
    if training:
        raise ValueError(f"models of rows {training[:5]} are in training mode; batching needs eval mode "
                         "(training-mode BatchNorm mixes rows)")


@contextlib.contextmanager
def _precision(model: nn.Module, x: torch.Tensor, audio: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, audio)`` in the dtype ``model`` computes in. CPU: fp32 only. CUDA: the
    model's dtype, except half inputs to an fp32 model, which run as they are under
    autocast to the inputs' dtype (the block runs inside it)."""
    model_dtype = _model_dtype(model)
    if x.device.type != "cuda":
        if model_dtype != torch.float32:
            raise ValueError(f"on the CPU the U-Net runs in float32; the model is {model_dtype}")
        yield x.float(), audio.float()
    elif x.dtype in HALF_DTYPES and model_dtype == torch.float32:
        with torch.autocast("cuda", dtype=x.dtype):
            yield x, audio.to(x.dtype)
    else:
        yield x.to(model_dtype), audio.to(model_dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _check_models(distinct: list[nn.Module], device: torch.device) -> None:
    """Every model on the inputs' device and in one dtype (one batch, one precision)."""
    placed = {(next(m.parameters()).device, _model_dtype(m)) for m in distinct}
    if len(placed) > 1:
        raise ValueError(f"models: all must share one device and dtype, got {sorted(map(str, placed))}")
    model_device = next(iter(placed))[0]
    if model_device != device:
        raise ValueError(f"models are on {model_device}, the inputs on {device}")


def compare_strategies(*, width: float = 0.5, rows: int = 8, model_counts: Sequence[int] = (1, 4, 8),
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 3,
                       warmup: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Best-of-``repeats`` ms per ``infer`` call for each strategy: ``rows`` rows spread
    round-robin over each of ``model_counts`` distinct random-weight models (timing only;
    ``warmup`` untimed calls per case first). One dict per model count:
    ``{"rows", "models", "grouped_ms", "stacked_ms", "faster"}``."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, IMAGE_CHANNELS, SIZE, SIZE, generator=generator).to(device, dtype)
    audio = torch.randn(rows, AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE, generator=generator).to(device, dtype)
    model_dtype = dtype if device.type == "cuda" else torch.float32
    results = []
    for count in model_counts:
        torch.manual_seed(seed)
        with torch.device(device):  # initialised where they run: fast on a GPU, no copies
            models = [LipSyncUNet(width=width).to(model_dtype).eval() for _ in range(count)]
        per_row = [models[b % count] for b in range(rows)]
        row: dict[str, Any] = {"rows": rows, "models": count}
        samples: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
        for strategy in STRATEGIES:
            for _ in range(warmup):  # allocator, kernel selection
                infer(per_row, x, audio, strategy=strategy)
        for _ in range(repeats):  # interleaved, so a change in the machine's load hits both alike
            for strategy in STRATEGIES:
                _sync(device)
                started = time.perf_counter()
                infer(per_row, x, audio, strategy=strategy)
                _sync(device)
                samples[strategy].append((time.perf_counter() - started) * 1000.0)
        for strategy in STRATEGIES:
            row[f"{strategy}_ms"] = min(samples[strategy])
        row["faster"] = min(STRATEGIES, key=lambda s: row[f"{s}_ms"])
        results.append(row)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
