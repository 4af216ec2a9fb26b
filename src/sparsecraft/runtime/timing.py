"""Measuring: kernels side by side, prefill latency and decode speed of causal LMs.

``interleaved_medians`` is the planner's default timer. It times the candidates in turns
(dense, csr, ..., dense, csr, ...) rather than one after the other, so a burst of load from
another process hits all of them alike, and reports the median of ``repeats`` samples;
each sample loops a kernel long enough (``min_seconds``) for the clock to resolve it.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from typing import Callable

import torch

__all__ = ["interleaved_medians", "interleaved_samples", "prefill_seconds", "greedy_decode", "DecodeResult"]

log = logging.getLogger(__name__)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    min_seconds: float = 1e-3,
    device: torch.device | None = None,
    shuffle_seed: int | None = None,
    **_context,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, taken in turns.

    Each round times every function once (a sample loops it for at least ``min_seconds``);
    with ``shuffle_seed`` the order inside a round is shuffled (seeded), so no function always
    runs right after the same neighbour (whose cache footprint or thread wake-ups it would
    inherit). Sample ``i`` of every function comes from round ``i``: ratios of same-round
    samples are paired measurements.
    """
    import random

    loops: dict[str, int] = {}
    for name, fn in fns.items():  # warm up and size each sample
        fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-7)
        loops[name] = max(1, min(10_000, round(min_seconds / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(shuffle_seed)
    for _ in range(repeats):
        if shuffle_seed is not None:
            rng.shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / loops[name])
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    min_seconds: float = 1e-3,
    device: torch.device | None = None,
    **_context,
) -> dict[str, float]:
    """Median seconds per call of each function, sampled in turns (:func:`interleaved_samples`).

    Extra keyword arguments (the planner passes ``layer`` and ``rows``) are accepted so
    that this function and injected test timers share one signature.
    """
    samples = interleaved_samples(fns, repeats=repeats, min_seconds=min_seconds, device=device)
    return {name: statistics.median(s) for name, s in samples.items()}


def _forward_kwargs(model) -> dict:
    """Ask for the last position's logits only when the model can (as ``generate`` does)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median latency of one forward pass over the prompt ``ids`` ([batch, length])."""
    kwargs = _forward_kwargs(model)
    device = ids.device
    model(ids, use_cache=False, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(ids, use_cache=False, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class DecodeResult:
    """Tokens produced by greedy decoding; the time of the prefill and of the decode steps."""

    def __init__(self, tokens: list[int], prefill_seconds: float, decode_seconds: float):
        self.tokens = tokens
        self.prefill_seconds = prefill_seconds
        self.decode_seconds = decode_seconds

    @property
    def decode_steps(self) -> int:
        return len(self.tokens) - 1  # the first token comes from the prefill

    @property
    def tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds


@torch.inference_mode()
def greedy_decode(model, ids: torch.Tensor, new_tokens: int) -> DecodeResult:
    """``new_tokens`` greedy tokens after the prompt ``ids`` ([1, length]), as
    ``generate(max_new_tokens=new_tokens, do_sample=False)`` makes them: the first from the
    prefill (which fills the KV cache), each further one from a one-token decode step.
    ``decode_seconds`` covers the ``new_tokens - 1`` decode steps only."""
    if new_tokens < 2:
        raise ValueError("greedy_decode needs new_tokens >= 2 (one prefill token, one decode step)")
    kwargs = _forward_kwargs(model)
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, **kwargs)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    cache, produced = out.past_key_values, [int(nxt)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(nxt, past_key_values=cache, use_cache=True, **kwargs)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(int(nxt))
    _sync(device)
    return DecodeResult(produced, prefill, time.perf_counter() - start)
