"""The whole-module guarantee: a replacement stays only if the module with it is faster than the module without it.

Per-pattern wins do not add up on their own: each kernel call has a dispatch cost, the glue around a replaced
subgraph stays unfused, and at inference sizes those costs can outweigh what the kernel saves (issue 18). So the
composed module itself is timed against the original, on the same inputs, under the same policy, side by side
and as `fact-ray bench` reports it (`realize.bench.time_serving`: each module warmed up in its own loop, then
rounds of one synchronised call per module; the medians of those latencies decide). Its timer can be injected
so the selection runs on a CPU in tests.

Method: greedy backward elimination (an ablation). Start from every replacement that won its trial. Each round
times, in the same interleaved rounds, the baseline, the module with the current set S, and for every r in S the
module with S - {r} (leave one out). If the fastest leave-one-out module is no slower than the module with S (a
tie goes to PyTorch), that r is dropped, with the two times as its reason, and a new round starts; otherwise
every remaining replacement makes the module faster than it is without it, and the search stops. Dropping one
at a time (not every loser of one round at once) matters because replacements interact: two kernels that each
lose a little may make a third one's glue free. Then the module with what remains is compared with the baseline
from the same rounds: if it is not faster, everything is dropped and the composition says that it cannot beat
the baseline and holds no replacement. The result is never slower than the baseline by the medians measured.

At most n + 1 rounds of n + 2 modules for n replacements; modules are built once per set and reused across
rounds. The baseline is the eager original (`against="eager"`) or the original under `torch.compile` in the same
mode as the composed modules (`against="compile"`: a kernel stays only if the compiled module with it beats the
compiled module without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from fact_ray.errors import NotAvailable, UserError

EAGER, COMPILE = "eager", "compile"
AGAINST = (EAGER, COMPILE)
FASTER, CANNOT_BEAT, NOTHING = "faster", "cannot-beat", "nothing-to-replace"

GUARANTEE_ATTR = "fact_ray_guarantee"

# Names of the timed variants inside one round; match keys never look like these.
_BASE, _WITH = "<baseline>", "<with>"

Say = Callable[[str], None]


@dataclass(frozen=True)
class Dropped:
    """A replacement the guarantee took out, and why (one line with the times it was judged on)."""

    match_key: str
    rule: str
    anchor: str
    reason: str
    with_ms: float  # the module with the set it was judged in
    without_ms: float  # the same set without it


@dataclass(frozen=True)
class Guarantee:
    """What the composition was kept for, end to end."""

    against: str  # eager | compile
    compile_mode: Optional[str]  # torch.compile mode of both sides under against="compile" (None: default)
    verdict: str  # faster | cannot-beat | nothing-to-replace
    baseline_ms: float  # median of the baseline in the last round (nan when nothing was timed)
    composed_ms: float  # median of the module with what was kept (nan when nothing was kept)
    ratio: float  # baseline_ms / composed_ms: the end-to-end speedup it was kept for (nan when nothing was kept)
    kept: tuple[str, ...]  # match keys
    dropped: tuple[Dropped, ...]
    rounds: int
    reps: int
    method: str = "greedy backward elimination (leave one out per round), median latency of one synchronised call"

    @property
    def summary(self) -> str:
        """One line for a person."""
        base = "eager" if self.against == EAGER else f"torch.compile ({self.compile_mode or 'default'})"
        if self.verdict == NOTHING:
            return "no pattern had a winning kernel: the composition holds no replacement"
        if self.verdict == CANNOT_BEAT:
            return (f"the composed module cannot beat {base} here ({len(self.dropped)} replacement(s) dropped); "
                    "it holds no replacement and runs the PyTorch ops")
        return (f"{self.ratio:.2f}x over {base} end to end ({self.composed_ms:.4g} ms vs {self.baseline_ms:.4g} "
                f"ms), {len(self.kept)} replacement(s) kept, {len(self.dropped)} dropped")


def parse_against(text: str | None) -> Optional[str]:
    """`--against eager|compile|none` (none: no guarantee, every trial winner is composed)."""
    if text is None or text == "":
        return EAGER
    t = text.strip().lower()
    if t == "none":
        return None
    if t not in AGAINST:
        raise UserError(f"--against {text!r}: choose eager, compile or none")
    return t


def select(candidates: Sequence[str], build: Callable[[frozenset[str]], Callable[[], Any]],
           baseline: Callable[[], Any], *, describe: Mapping[str, tuple[str, str]] | None = None,
           against: str = EAGER, compile_mode: Optional[str] = None, warmup: int = 10, reps: int = 30,
           timer: Any = None, say: Say = lambda _: None) -> Guarantee:
    """Choose which of `candidates` (match keys) to keep; see the module docstring.

    `build(keys)` returns a zero-argument callable that runs the module with exactly those replacements on the
    timing inputs (it is called once per set and cached); `baseline()` runs the baseline. `describe` maps a key to
    (rule, anchor) for the report. `timer` is `time_interleaved`'s: None times with CUDA events.
    """
    from fact_ray.realize.bench import time_serving

    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    describe = dict(describe or {})
    current = list(dict.fromkeys(candidates))
    if not current:
        return Guarantee(against, compile_mode, NOTHING, math.nan, math.nan, math.nan, (), (), 0, reps)
    if timer is None:
        _require_cuda()
    built: dict[frozenset[str], Callable[[], Any]] = {}

    def module(keys: frozenset[str]) -> Callable[[], Any]:
        if keys not in built:
            built[keys] = build(keys)
        return built[keys]

    dropped: list[Dropped] = []
    rounds = 0
    while True:
        rounds += 1
        have = frozenset(current)
        fns: dict[str, Callable[[], Any]] = {_BASE: baseline, _WITH: module(have)}
        if len(current) > 1 or against == COMPILE:
            # With one replacement left its leave-one-out module is the baseline itself under against=eager (the
            # rewrite with nothing replaced runs the original's ops), so it is only timed against compile, where
            # the compiled rewrite may differ from the compiled original.
            fns.update({k: module(have - {k}) for k in current})
        say(f"guarantee round {rounds}: the module with {len(current)} replacement(s) against {len(fns) - 2} "
            f"leave-one-out module(s) and the baseline, {reps} interleaved rounds")
        # Latency, not the old interleaved event pairs: at inference sizes modules are launch-bound, and calls of
        # different modules interleaved without a sync time a host that keeps switching programs (docs/bench.md).
        times, _ = time_serving(fns, rounds=reps, calls=1, warmup=warmup, warmup_s=0.2, max_warmup=50, timer=timer)
        with_ms = times[_WITH].median_ms
        base_ms = times[_BASE].median_ms
        without = {k: (times[k].median_ms if k in times else base_ms) for k in current}
        worst = min(current, key=lambda k: without[k])
        if without[worst] <= with_ms:  # the module is no slower without it: a tie goes to PyTorch
            rule, anchor = describe.get(worst, ("", ""))
            dropped.append(Dropped(worst, rule, anchor, with_ms=with_ms, without_ms=without[worst], reason=(
                f"the module ran {with_ms:.4g} ms with it and {without[worst]:.4g} ms without it "
                f"(round {rounds}, {len(current)} replacement(s))")))
            current.remove(worst)
            if not current:
                return Guarantee(against, compile_mode, CANNOT_BEAT, base_ms, math.nan, math.nan, (),
                                 tuple(dropped), rounds, reps)
            continue
        if with_ms < base_ms:
            return Guarantee(against, compile_mode, FASTER, base_ms, with_ms, base_ms / with_ms, tuple(current),
                             tuple(dropped), rounds, reps)
        # Every remaining replacement helps the rewrite, yet the rewrite loses to the baseline (under compile: the
        # original compiles into something faster than the rewrite does): nothing is kept.
        for k in current:
            rule, anchor = describe.get(k, ("", ""))
            dropped.append(Dropped(k, rule, anchor, with_ms=with_ms, without_ms=base_ms, reason=(
                f"the module with the {len(current)} remaining replacement(s) ran {with_ms:.4g} ms, the baseline "
                f"{base_ms:.4g} ms")))
        return Guarantee(against, compile_mode, CANNOT_BEAT, base_ms, math.nan, math.nan, (), tuple(dropped),
                         rounds, reps)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NotAvailable("no CUDA GPU: the whole-module guarantee times the composed module on a GPU")


def compiled(module: Any, mode: Optional[str]) -> Any:
    """`torch.compile(module, mode=mode)`; mode None is the default mode."""
    import torch

    return torch.compile(module, mode=mode)


def guarded_compose(captured: Any, matches: Sequence[Any], winners: Mapping[str, Any], policy: Any, *,
                    original: Any, inputs: Sequence[Any], arch: Any = None, digests: Mapping[str, str] | None = None,
                    against: str = EAGER, compile_mode: Optional[str] = None, device: Any = "cuda",
                    warmup: int = 10, reps: int = 30, timer: Any = None, say: Say = lambda _: None) -> Any:
    """`compose.compose` under the whole-module guarantee: the composed module of the winners `select` keeps,
    with the `Guarantee` attached as `module.fact_ray_guarantee` (the artifact's manifest records it).

    `original` and `inputs` must be on `device` in the policy's dtype; every module is built on `device`.
    """
    import torch

    from fact_ray.compose import compose
    from fact_ray.realize.verify import precision_mode

    digests = dict(digests or {})
    keys = [m.key for m in matches if m.key in winners]
    describe = {m.key: (m.rule, m.anchor) for m in matches}
    wrap = (lambda m: compiled(m, compile_mode)) if against == COMPILE else (lambda m: m)
    inputs = tuple(inputs)

    def runner(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), precision_mode(policy):
                return fn(*inputs)

        return run

    def build(chosen: frozenset[str]) -> Callable[[], Any]:
        module = compose(captured, matches, {k: winners[k] for k in chosen}, policy, arch=arch, digests=digests)
        return runner(wrap(module.to(device)))

    report = select(keys, build, runner(wrap(original)), describe=describe, against=against,
                    compile_mode=compile_mode, warmup=warmup, reps=reps, timer=timer, say=say)
    final = compose(captured, matches, {k: winners[k] for k in report.kept}, policy, arch=arch,
                    digests=digests).to(device)
    setattr(final, GUARANTEE_ATTR, report)
    say(f"guarantee: {report.summary}")
    return final


def guarantee_of(module: Any) -> Optional[Guarantee]:
    return getattr(module, GUARANTEE_ATTR, None)


COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def parse_compile_mode(text: str | None) -> Optional[str]:
    """A torch.compile mode name; "default" (or nothing) is None, torch's default mode."""
    if text is None or text == "" or text == "default":
        return None
    if text not in COMPILE_MODES:
        raise UserError(f"--compile-mode {text!r}: choose {', '.join(COMPILE_MODES)}")
    return text
