"""Timing, side by side (measuring.md, "Timing").

`time_interleaved` runs warm-up calls of every function, then `reps` rounds in which each function runs once,
in the same order (A B C, A B C, ...), so that clock changes, other tenants and thermal drift touch every
candidate alike and every result is a ratio measured in one process. By default each call is timed with CUDA
events on the current stream, with the L2 cache flushed (a buffer larger than L2 is overwritten) before it, so
that repeated calls do not measure a warm cache. A `timer` (a callable that runs one call and returns its time
in ms) replaces the CUDA path, which makes the selection logic testable on a CPU.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from fact_ray.toolchain import BENCH_METHOD_VERSION  # noqa: F401  (bump it there when a timing here changes)
from fact_ray.types import TimeStats

Timer = Callable[[Callable[[], None]], float]

_FLUSH_BUFFERS: dict[torch.device, torch.Tensor] = {}


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> TimeStats:
    xs = sorted(float(x) for x in samples_ms)
    return TimeStats(median_ms=quantile(xs, 0.5), p10_ms=quantile(xs, 0.1), p90_ms=quantile(xs, 0.9),
                     reps=len(xs))


def l2_flusher(device: torch.device | str | None = None) -> Callable[[], None]:
    """A function that overwrites a buffer of twice the device's L2 size (so no line of earlier data survives)."""
    device = torch.device(device if device is not None else "cuda")
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    buf = _FLUSH_BUFFERS.get(device)
    if buf is None:
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 64 * 2**20
        buf = _FLUSH_BUFFERS[device] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return buf.zero_


def time_interleaved(fns: Mapping[str, Callable[[], None]], *, warmup: int = 10, reps: int = 50,
                     flush_l2: bool = True, timer: Optional[Timer] = None) -> dict[str, TimeStats]:
    """Median, p10 and p90 (ms) of each function, timed in interleaved rounds; see the module docstring.

    `flush_l2` applies to the CUDA-event path; an injected `timer` decides for itself what one call costs.
    """
    if reps < 1:
        raise ValueError("reps must be at least 1")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    if timer is not None:
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(reps):
            for n in names:
                samples[n].append(float(timer(fns[n])))
        return {n: summarize(samples[n]) for n in names}
    return _time_cuda_events(fns, names, reps, flush_l2)


def _time_cuda_events(fns: Mapping[str, Callable[[], None]], names: list[str], reps: int,
                      flush_l2: bool) -> dict[str, TimeStats]:
    if not torch.cuda.is_available():
        raise RuntimeError("time_interleaved needs CUDA for its default timer; pass timer= to time elsewhere")
    flush = l2_flusher() if flush_l2 else None
    torch.cuda.synchronize()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in names]
              for _ in range(reps)]
    # All events are recorded first and read after one synchronisation: no host sync inside the loop, so the
    # host stays ahead of the GPU and launch overhead is hidden as it would be in a model.
    for r in range(reps):
        for i, n in enumerate(names):
            if flush is not None:
                flush()
            start, end = events[r][i]
            start.record()
            fns[n]()
            end.record()
    torch.cuda.synchronize()
    return {n: summarize([events[r][i][0].elapsed_time(events[r][i][1]) for r in range(reps)])
            for i, n in enumerate(names)}


def clearly_faster(time: TimeStats, baseline: TimeStats) -> bool:
    """True when `time` beats `baseline` by more than the timing noise (half the wider p10-p90 spread):
    a difference smaller than the spread is noise (measuring.md)."""
    noise = max(time.p90_ms - time.p10_ms, baseline.p90_ms - baseline.p10_ms) / 2
    return time.median_ms + noise < baseline.median_ms


# --------------------------------------------------------------------------------------------- serving


def time_serving(fns: Mapping[str, Callable[[], None]], *, rounds: int = 20, calls: int = 20, warmup: int = 10,
                 warmup_s: float = 1.0, max_warmup: int = 200, flush_l2: bool = True,
                 timer: Optional[Timer] = None) -> tuple[dict[str, TimeStats], dict[str, TimeStats]]:
    """What a serving system sees of each function: (latency, throughput), both in ms per call.

    Latency: one call from an idle GPU and an empty queue (L2 flushed, host synchronised before and after),
    CUDA events around it; launch overhead counts in full, as for a request that arrives alone. Throughput: `calls`
    back-to-back calls between two events (no sync, no flush between them), per call; launch overhead hides
    behind GPU work where there is any, as under load. Each function first warms up in its own loop (at least
    `warmup` calls, then on until `warmup_s` seconds or `max_warmup` calls: clocks, autotuning, CUDA-graph
    recording and allocator growth out of the numbers), then `rounds` rounds visit every function in turn, each
    doing its throughput loop and its latency call, so drift touches all alike. See docs/bench.md for why this
    replaced one interleaved, unsynchronised event pair per call. An injected `timer` (ms of one call of its
    argument) replaces CUDA: latency is one timed call, throughput one timed loop divided by `calls`.
    """
    if rounds < 1 or calls < 1:
        raise ValueError("rounds and calls must be at least 1")
    names = list(fns)
    lat: dict[str, list[float]] = {n: [] for n in names}
    thr: dict[str, list[float]] = {n: [] for n in names}
    if timer is not None:
        for n in names:
            for _ in range(warmup):
                fns[n]()
        for _ in range(rounds):
            for n in names:
                fn = fns[n]
                thr[n].append(float(timer(lambda fn=fn: [fn() for _ in range(calls)])) / calls)
                lat[n].append(float(timer(fn)))
        return {n: summarize(lat[n]) for n in names}, {n: summarize(thr[n]) for n in names}
    if not torch.cuda.is_available():
        raise RuntimeError("time_serving needs CUDA for its default timer; pass timer= to time elsewhere")
    import time as _time

    for n in names:
        _warm_up(fns[n], warmup, warmup_s, max_warmup, _time.perf_counter)
    flush = l2_flusher() if flush_l2 else None
    pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    for _ in range(rounds):
        for n in names:
            fn = fns[n]
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            pending.append((n, start, end))
            if flush is not None:
                flush()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            lat[n].append(s.elapsed_time(e))
    for n, start, end in pending:
        thr[n].append(start.elapsed_time(end) / calls)
    return {n: summarize(lat[n]) for n in names}, {n: summarize(thr[n]) for n in names}


def _warm_up(fn: Callable[[], None], at_least: int, seconds: float, at_most: int, clock: Callable[[], float]) -> int:
    """Call `fn` at least `at_least` times, then on until `seconds` have passed or `at_most` calls; returns the
    count. Synchronises every few calls so the clock measures GPU work, not a queue filling up."""
    t0 = clock()
    k = 0
    while k < at_least or (k < at_most and clock() - t0 < seconds):
        fn()
        k += 1
        if k % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return k
