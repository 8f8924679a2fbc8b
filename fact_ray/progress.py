"""The console view of a farm run: a listener of farm events that draws rich progress bars.

Bars: compiles done/total, trials done/total, and a line with the best speedup so far. Per pattern, one line
is printed above the bars when it finishes (winner, from the table, or why nothing was selected).

Totals are not in the event stream (events say what happened, not what is planned), so the farm calls the
optional `on_plan(compiles=, trials=)` hook on listeners that have one, before the work starts. Without it the
bars count up with no total.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fact_ray.types import TrialStatus
from fact_ray.events import (
    CompileFinished,
    PatternFinished,
    PatternStarted,
    RunFinished,
    RunStarted,
    TrialFinished,
)


class ConsoleProgress:
    name = "console"

    def __init__(self, console: Console | None = None, *, transient: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"), console=self.console, transient=transient,
        )
        self._compiles = self._progress.add_task("compiles", total=None, note="", start=False)
        self._trials = self._progress.add_task("trials", total=None, note="", start=False)
        self._rules: dict[str, str] = {}
        self._best: tuple[float, str] = (math.nan, "")
        self._compile_failures = 0
        self._sources: set[str] = set()
        self._trial_failures = 0
        self._started = False

    # ------------------------------------------------------------------ hooks

    def on_plan(self, *, compiles: int, trials: int) -> None:
        self._progress.update(self._compiles, total=compiles)
        # No trials planned (no GPU, or everything came from the table): no empty bar.
        self._progress.update(self._trials, total=trials, visible=trials > 0)
        if compiles:
            self._progress.start_task(self._compiles)

    def on_event(self, event: Any) -> None:
        if isinstance(event, RunStarted):
            self._start()
            gpu = event.gpu or "no GPU"
            self.console.print(f"[bold]{event.model_name}[/] {event.policy.value} {event.arch.value} on {gpu}, "
                               f"budget {event.budget}")
        elif isinstance(event, PatternStarted):
            self._rules[event.match.key] = f"#{event.index + 1} {event.match.rule}"
        elif isinstance(event, CompileFinished):
            # A translation unit shared by several patterns is reported once per pattern; count it once.
            if event.source_name in self._sources:
                return
            self._sources.add(event.source_name)
            self._compile_failures += not event.ok
            note = f"[red]{self._compile_failures} failed[/]" if self._compile_failures else ""
            self._progress.start_task(self._compiles)
            self._progress.update(self._compiles, advance=1, note=note)
        elif isinstance(event, TrialFinished):
            self._trial(event)
        elif isinstance(event, PatternFinished):
            self._pattern(event)
        elif isinstance(event, RunFinished):
            self._stop()
            colour = "green" if event.status == "ok" else "red"
            tail = f": {event.error}" if event.error else ""
            self.console.print(f"run [{colour}]{event.status}[/] in {event.seconds:.1f} s{tail}")

    # ------------------------------------------------------------------ parts

    def _start(self) -> None:
        if not self._started:
            self._progress.start()
            self._started = True

    def _stop(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def _trial(self, event: TrialFinished) -> None:
        t = event.trial
        if t.candidate_name == "torch":
            return  # the baseline is measured, not a candidate: it does not count as a trial
        self._trial_failures += not t.status.correct
        sp = t.speedup
        if t.status == TrialStatus.OK and not math.isnan(sp) and (math.isnan(self._best[0]) or sp > self._best[0]):
            self._best = (sp, f"{self._rules.get(event.match_key, '')} {t.candidate_name}")
        parts = []
        if not math.isnan(self._best[0]):
            parts.append(f"best {self._best[0]:.2f}x ({self._best[1]})")
        if self._trial_failures:
            parts.append(f"[red]{self._trial_failures} failed[/]")
        self._progress.start_task(self._trials)
        self._progress.update(self._trials, advance=1, note=", ".join(parts))

    def _pattern(self, event: PatternFinished) -> None:
        label = self._rules.get(event.match_key, event.match_key)
        w = event.winner
        if w is None:
            self._progress.console.print(f"{label}: [yellow]{event.reason or 'no winner'}[/]")
            return
        name = w.config.name if w.config is not None else "torch (PyTorch op kept)"
        sp = w.trial.speedup
        speed = f" {sp:.2f}x" if not math.isnan(sp) else ""
        src = " [dim](from table)[/]" if event.from_table else ""
        self._progress.console.print(f"{label}: [green]{name}[/]{speed}{src}")


def plain_text(table: Any, lines: Any = (), width: int = 160) -> str:
    """A rich table and lines under it as plain text, for files and MLflow artifacts (no colour, fixed width)."""
    import io

    buf = io.StringIO()
    con = Console(file=buf, width=width, no_color=True)
    con.print(table)
    for line in lines:
        con.print(line, markup=False)
    return buf.getvalue()
