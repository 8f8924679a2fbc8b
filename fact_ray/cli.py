"""`fact-ray`: the command line. Wiring only: every command reads settings, calls the stage or farm functions,
and prints. Heavy imports (torch, ray, mlflow) happen inside the commands so `--help` stays fast.

A `UserError` becomes one line on stderr and its exit code (2 by default); a traceback only with --debug.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from fact_ray import config
from fact_ray.errors import UserError, first_line

if TYPE_CHECKING:
    from fact_ray.types import Arch

app = typer.Typer(
    name="fact-ray",
    help="Turn PyTorch modules into verified, faster CUTLASS kernels, tuned on a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
table_app = typer.Typer(help="Read the shared pattern table: list keys, show entries, export rows.",
                        no_args_is_help=True)
app.add_typer(table_app, name="table")

_state: dict[str, Any] = {"debug": False}

MODEL_HELP = ("A KernelBench-format file (defines Model, get_inputs, get_init_inputs) or pkg.module:factory "
              "returning (module, example_inputs).")
POLICY_HELP = "Precision policy: fp32 (fp32-class accuracy), tf32, bf16 or fp16."
ARCH_HELP = "Target architecture: sm80 (A100) or sm90 (H100/H200). Default: the local GPU's, else sm90."
_ADDRESS = typer.Option(None, "--address", help="Ray cluster: ray://host:10001 or auto. Default: a local Ray.")
_TABLE = typer.Option(None, "--table", help="Pattern table URI (path, s3://, gs://, hdfs://).")
_TRACK = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///.fact-ray/mlflow.db).")
_FAMILIES = typer.Option(None, "--families", help="Compose only these pattern families (comma list: gemm for "
                         "every GEMM family, attention, layernorm, rmsnorm; default: all); the rest keep PyTorch.")
_BUDGET = typer.Option(None, "--budget", help="Candidates per pattern (default 16), or seconds of trials per run "
                      "(120s: 64 candidates per pattern tried in rank order until then), or both (256,600s). See "
                      "docs/search.md for the budget curves.")
_SHAPES = typer.Option(None, "--shapes", help="Shape buckets to tune/compose for: per input dims joined by x, "
                       "inputs by ',', buckets by ';' (e.g. \"1x512x1024;8x2048x1024\"). Default for run: the "
                       "model file's get_shapes(), if any. Other shapes run the PyTorch ops.")
_LLM = typer.Option(None, "--llm", help="LLM discovery agent: off (default: the rules rank alone), rank, or propose. "
                    "Needs OPENAI_BASE_URL (and OPENAI_API_KEY) of an OpenAI-compatible server.")
_LLM_MODEL = typer.Option(None, "--llm-model", help="Model name to ask at the OpenAI-compatible endpoint.")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _console():
    import shutil

    from rich.console import Console

    # tables here are wide; when output is piped, rich would assume 80 columns and squash them
    return Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160))


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: a user error is one line and its exit code, never a traceback unless --debug."""
    from fact_ray.redact import redact

    try:
        return fn()
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {redact(' '.join(str(e).split()))}", err=True)  # one line, credentials masked
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _settings(**flags: Any) -> config.Settings:
    return config.load(flags)


def _default_arch(settings: config.Settings) -> "Arch":
    """--arch, else the local GPU's, else sm90: discovery ranks for a target, and runs without a GPU too."""
    from fact_ray.toolchain import detect
    from fact_ray.types import Arch

    return settings.arch or detect(nvcc=None).arch or Arch.SM90


# ---------------------------------------------------------------------------------------------- discover


@app.command()
def discover(
    model: str = typer.Argument(..., help=MODEL_HELP),
    arch: Optional[str] = typer.Option(None, help=ARCH_HELP),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the ranked matches as JSON."),
    profile: bool = typer.Option(False, help="On a GPU, replace estimates by a measured eager profile."),
    llm: Optional[str] = _LLM,
    llm_model: Optional[str] = _LLM_MODEL,
    table: Optional[str] = _TABLE,
) -> None:
    """Capture MODEL's graph and list the patterns worth replacing, ranked by estimated time share.

    Runs on a CPU-only machine: the ranking then comes from a roofline cost model of the target arch.
    """

    def body() -> None:
        s = _settings(arch=arch, policy=policy, llm=llm, llm_model=llm_model, table_uri=table)
        from fact_ray import capture as cap
        from fact_ray import discover as disc

        agent = None
        if s.llm != "off":
            from fact_ray.actors.discovery import make_ranker

            agent = make_ranker(s.llm, s)  # a missing endpoint or model fails here, before any work
        target = _default_arch(s)
        loaded = cap.under_policy(cap.load_model(model), s.policy)
        captured = cap.capture(loaded)
        matches = disc.discover(captured.graph, target, s.policy)
        if profile:
            matches = disc.profile(captured, matches)
        ranked = None
        if agent is not None:
            from fact_ray.actors.discovery import rank_matches

            ranked = rank_matches(agent, captured.graph, matches, target, s.policy, captured.method,
                                  tuple(captured.notes))
            matches = list(ranked.matches)
        if as_json:
            typer.echo(json.dumps({"model": loaded.name, "arch": target.value, "policy": s.policy.value,
                                   "capture": captured.method, "notes": list(captured.notes),
                                   "matches": disc.matches_to_json(matches)}, indent=2))
            return
        con = _console()
        for note in captured.notes:
            con.print(f"[yellow]note:[/] {note}")
        con.print(f"{loaded.name}: {len(captured.graph.nodes)} graph nodes captured with {captured.method}; "
                  f"{len(matches)} matches for {target.value}, policy {s.policy.value}")
        con.print(disc.format_matches(matches))
        if ranked is not None:
            from fact_ray.actors.llm_agent import format_agent_changes

            con.print(format_agent_changes(ranked))

    _guard(body)


# ---------------------------------------------------------------------------------------------- tune


@app.command()
def tune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    pattern: int = typer.Option(1, "--pattern", "-p", help="Which discovered match to tune (its # in `discover`)."),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    arch: Optional[str] = typer.Option(None, help=ARCH_HELP),
    budget: Optional[int] = typer.Option(None, help="Candidates to compile and time (default 16)."),
    jobs: Optional[int] = typer.Option(None, help="Parallel compiles (default: all CPUs)."),
) -> None:
    """Tune one discovered pattern on the local GPU (no Ray) and print the trials table."""

    def body() -> None:
        s = _settings(policy=policy, arch=arch, budget=budget, jobs=jobs)
        from fact_ray import capture as cap
        from fact_ray import discover as disc
        from fact_ray.realize import tune as tn

        target = _default_arch(s)
        captured = cap.capture(cap.under_policy(cap.load_model(model), s.policy))
        matches = disc.discover(captured.graph, target, s.policy)
        if not 1 <= pattern <= len(matches):
            raise UserError(f"--pattern {pattern}: the model has {len(matches)} matches (see `fact-ray discover`)")
        con = _console()

        def show(p: "tn.TuneProgress") -> None:
            if p.stage in ("space", "compile", "done") or p.done == p.total:
                con.print(f"{p.stage}: {p.done}/{p.total} {p.detail}")

        m = matches[pattern - 1]
        con.print(f"tuning #{pattern} {m.rule} ({m.shape_signature}, {m.dtype}) under {s.policy.value}")
        result = tn.tune_match(m, s, progress=show)
        w = result.winner
        con.print(tn.format_trials(result.trials, chosen=w.trial.candidate_name,
                                   title=f"#{pattern} {m.rule} on {result.gpu}: {len(result.trials)} trials"))
        verdict = ("the PyTorch op stays: no verified kernel is faster" if w.config is None else
                   f"winner {w.config.name}: {w.trial.speedup:.2f}x over the PyTorch op")
        con.print(f"{verdict} ({result.libraries_ok}/{result.libraries} libraries built, "
                  f"{result.compile_seconds:.0f} s of compile)")

    _guard(body)


# ---------------------------------------------------------------------------------------------- run / retune


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler, `kill`, `ray job stop`) ends a run as Ctrl-C does: the farm closes its MLflow run as
    KILLED and its workers, instead of the process vanishing with the run left RUNNING. The previous handler
    comes back after the run (the CLI may be called in-process)."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(model: str, address: Optional[str], table: Optional[str], tracking_uri: Optional[str],
         policy: Optional[str], arch: Optional[str], budget: Optional[str], retune: bool,
         llm: Optional[str] = None, llm_model: Optional[str] = None, shapes: Optional[str] = None,
         search: Optional[str] = None, ranker: Optional[str] = None) -> None:
    def body() -> None:
        s = _settings(ray_address=address, table_uri=table, tracking_uri=tracking_uri, policy=policy, arch=arch,
                      budget=budget, llm=llm, llm_model=llm_model, search=search, ranker=ranker)
        from fact_ray import farm
        from fact_ray import shapes as sh
        from fact_ray.progress import ConsoleProgress

        con = _console()
        buckets = sh.model_buckets(model, shapes)
        # Each shape bucket is tuned as a model of its own (its patterns have their own table keys); the last
        # run's summary and exit code stand for the job, every bucket's table is printed.
        for bucket in buckets[:-1]:
            con.print(f"[bold]shapes {bucket.spec}[/]")
            con.print(farm.format_summary(farm.run(sh.shaped_ref(model, bucket), s, [ConsoleProgress()],
                                                   retune=retune)))
        if buckets:
            con.print(f"[bold]shapes {buckets[-1].spec}[/]")
        last = sh.shaped_ref(model, buckets[-1]) if buckets else model
        summary = farm.run(last, s, [ConsoleProgress()], retune=retune)
        con.print(farm.format_summary(summary))
        for note in summary.notes:
            con.print(f"[yellow]note:[/] {note}")
        if summary.phases:
            con.print("[dim]time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.phases) + "[/]")
        if any(p.winner and p.winner != "torch" for p in summary.patterns):
            pol = f"--policy {summary.policy.value}"
            con.print(f"next: [bold]fact-ray compose {model} {pol}[/] saves the composed module as a deployable "
                      f"artifact; [bold]fact-ray bench {model} {pol}[/] compares it with eager and torch.compile")
        if summary.exit_code:
            raise typer.Exit(summary.exit_code)

    with _terminate_as_interrupt():
        _guard(body)


@app.command()
def run(
    model: str = typer.Argument(..., help=MODEL_HELP),
    address: Optional[str] = _ADDRESS,
    table: Optional[str] = _TABLE,
    tracking_uri: Optional[str] = _TRACK,
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    arch: Optional[str] = typer.Option(None, help=ARCH_HELP),
    budget: Optional[str] = _BUDGET,
    retune: bool = typer.Option(False, "--retune", help="Ignore winners already in the table."),
    llm: Optional[str] = _LLM,
    llm_model: Optional[str] = _LLM_MODEL,
    shapes: Optional[str] = _SHAPES,
    search: Optional[str] = typer.Option(None, "--search", help="rank (default: one full trial per candidate) or "
                                         "halving (screen every candidate cheaply, time the best quarter in full)."),
    ranker: Optional[str] = typer.Option(None, "--ranker", help="What orders a GEMM space: auto (default: a model "
                                         "learned from the table's trials, then nvidia-matmul-heuristics where "
                                         "installed, else the analytic prior), heuristic, learned, nvmmh."),
) -> None:
    """The main job: capture, discover, compile and tune every pattern on Ray, record winners and the run.

    Patterns with a valid winner in the table are served from it (no compile, no trial) unless --retune.
    Without a GPU, every CPU step still runs and the summary says which steps need a GPU. With --shapes (or a
    get_shapes() in the model file) every shape bucket is tuned in turn.
    """
    _run(model, address, table, tracking_uri, policy, arch, budget, retune, llm, llm_model, shapes, search, ranker)


@app.command()
def retune(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Not with --fleet."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="A fleet file (TOML: models, policies, budget, time "
                                        "cap, threshold, webhook): re-tune every model of it as one night."),
    out: Optional[str] = typer.Option(None, "--out", help="With --fleet: folder for the night's report (default "
                                      "<home>/nights/<fleet>/<night>)."),
    address: Optional[str] = _ADDRESS,
    table: Optional[str] = _TABLE,
    tracking_uri: Optional[str] = _TRACK,
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    arch: Optional[str] = typer.Option(None, help=ARCH_HELP),
    budget: Optional[str] = _BUDGET,
    llm: Optional[str] = _LLM,
    llm_model: Optional[str] = _LLM_MODEL,
) -> None:
    """Re-tune against the table (the nightly job): one model like `run --retune`, or a whole fleet with --fleet.

    With --fleet: the incumbents are re-measured first, regressions and failed verifications are flagged, the
    report is printed and saved (JSON, HTML, PNG), logged to MLflow and POSTed to the fleet's webhook; the exit code
    is 1 on a regression, an invalidated winner or a model that failed (0 on a clean night).
    """
    if fleet is None and model is not None:
        _run(model, address, table, tracking_uri, policy, arch, budget, True, llm, llm_model)
        return

    def body() -> None:
        if fleet is None:
            raise UserError("give a MODEL or --fleet FILE")
        if model is not None or policy is not None or budget is not None:
            raise UserError("--fleet names the models, policies and budget; do not also give MODEL, --policy or "
                            "--budget")
        from pathlib import Path

        from fact_ray import fleet as fl
        from fact_ray import report_html
        from fact_ray.progress import ConsoleProgress

        f = fl.load_fleet(fleet)
        s = _settings(ray_address=address, table_uri=table, tracking_uri=tracking_uri, arch=arch, llm=llm,
                      llm_model=llm_model)
        con = _console()
        opts = fl.NightOptions(listeners=[ConsoleProgress()], say=lambda line: con.print(line, markup=False))
        report = fl.retune(f, s, opts)
        where = out or Path(s.home) / "nights" / f.name / report.night
        if f.register:
            report = fl.with_notes(report, fl.publish(f, s, report, where))
        files = report_html.write(report, where)
        con.print(report_html.text(report), markup=False)
        con.print(f"report: {files.html} (json {files.json})", markup=False)
        try:
            from fact_ray.night_tracking import log_night

            con.print(f"mlflow night run {log_night(s.resolved_tracking_uri, report, files)}", markup=False)
        except Exception as e:  # noqa: BLE001 -- the night's files are written; a tracking failure is reported
            con.print(f"note: the night was not logged to MLflow: {first_line(e)}", markup=False)
            raise typer.Exit(1) from None
        if f.webhook:
            failed = report_html.post_webhook(f.webhook, report)
            con.print(f"note: {failed}" if failed else f"summary sent to {f.webhook}", markup=False)
        raise typer.Exit(report.exit_code)

    _guard(body)


# ---------------------------------------------------------------------------------------------- compose / bench


@app.command()
def compose(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option("composed", "--out", help="Folder to write the deployable artifact to."),
    load: Optional[str] = typer.Option(None, "--load", help="Restore the composed module from this artifact "
                                       "instead (no nvcc, no tuning, no table) and say what it holds."),
    table: Optional[str] = _TABLE,
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    arch: Optional[str] = typer.Option(None, help=ARCH_HELP),
    families: Optional[str] = _FAMILIES,
    against: Optional[str] = typer.Option(None, "--against", help="Whole-module guarantee: keep a kernel only if "
                                          "the module with it beats the module without it, timed against eager "
                                          "(default), compile (both sides under torch.compile) or none."),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile mode for --against "
                                               "compile: default, max-autotune or reduce-overhead."),
    package: bool = typer.Option(False, "--package", help="Also emit the compiled form: an AOTInductor package "
                                 "(aoti/model.pt2) inside the artifact."),
    shapes: Optional[str] = _SHAPES,
) -> None:
    """Compose MODEL from the table's winners, check it end to end on the local GPU, save an artifact.

    Patterns without a faster verified kernel keep their PyTorch op, and so does every kernel the whole-module
    guarantee drops (the module must be faster with it than without it). A composition that fails the float64
    check, or that could not be checked (no GPU), is never saved.
    """

    def body() -> None:
        s = _settings(table_uri=table, policy=policy, arch=arch)
        from fact_ray import artifact
        from fact_ray.compose import parse_families

        chosen = parse_families(families)
        if load and chosen:  # an artifact holds the families it was composed with; --load cannot choose again
            raise UserError("--families chooses what to compose from the table; --load restores a composition "
                            "as it was saved (compose again with --families to change it)")
        if load:
            artifact.load(load, model)
            typer.echo(artifact.load_report(load))
            return
        from fact_ray.guarantee import parse_against, parse_compile_mode

        base, mode = parse_against(against), parse_compile_mode(compile_mode)
        from fact_ray import shapes as sh

        buckets = sh.model_buckets(model, shapes)
        if buckets:  # one artifact per shape bucket under --out, and dispatch.json with the bucket rule
            path = sh.compose_buckets(model, s, out, buckets, chosen, against=base, compile_mode=mode, say=typer.echo)
        else:
            path = artifact.compose_from_table(model, s, out, chosen, against=base, compile_mode=mode,
                                               say=typer.echo)
        if package:
            from fact_ray.deploy import package_artifact

            typer.echo(f"package    {package_artifact(path, model)}")
        typer.echo(artifact.load_report(path))

    _guard(body)


@app.command()
def bench(
    model: str = typer.Argument(..., help=MODEL_HELP),
    artifact: Optional[str] = typer.Option(None, "--artifact", help="A composed artifact to bench (made under the "
                                           "same policy). Default: compose MODEL from the pattern table."),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    table: Optional[str] = _TABLE,
    tracking_uri: Optional[str] = _TRACK,
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the JSON, PNG and text table "
                                      "(default: bench/ under the fact-ray home, .fact-ray/bench)."),
    reps: int = typer.Option(50, "--reps", help="Timing rounds (each: one synchronised call and one loop of "
                             "back-to-back calls per variant)."),
    warmup: int = typer.Option(10, "--warmup", help="Warm-up calls at least, per variant in its own loop (it goes "
                               "on to 1 s or 200 calls)."),
    calls: int = typer.Option(20, "--calls", help="Back-to-back calls per throughput sample."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma list of eager, compile-default, "
                                           "compile-max-autotune, composed, composed+compile, composed+max-autotune, "
                                           "composed+cudagraphs (default: all; eager is required, max-autotune "
                                           "always added)."),
    families: Optional[str] = _FAMILIES,
) -> None:
    """Compare eager, torch.compile (default, max-autotune), the composed module and the composed module under
    torch.compile (default, max-autotune, reduce-overhead) under one precision policy.

    Same weights, same inputs, side by side in one process on the local GPU: latency of one synchronised call and
    per-call time of back-to-back calls, spread, speedups over eager, errors against float64, the best composed
    variant. Writes JSON, a PNG plot and the table, and logs them to MLflow.
    """

    def body() -> None:
        from pathlib import Path

        s = _settings(policy=policy, table_uri=table, tracking_uri=tracking_uri)
        from fact_ray import bench as bn
        from fact_ray.tracking import check_reachable

        from fact_ray.compose import parse_families

        chosen = bn.parse_variants(variants)
        only = parse_families(families)
        bn.require_gpu()  # before any model loading or compiling
        bn.require_plotting()
        check_reachable(s.resolved_tracking_uri)
        con = _console()
        result = bn.run_bench(model, s, artifact=artifact, variants=chosen, reps=reps, warmup=warmup, calls=calls,
                              families=only, say=lambda line: con.print(line, markup=False))
        outputs = bn.write_outputs(result, out or Path(s.home) / "bench")
        # The table and files come first: a tracking server that fails now costs the MLflow record, not the numbers.
        con.print(bn.format_table(result))
        for note in result.notes:
            con.print(f"note: {note}", markup=False)
        con.print(f"json  {outputs.json}\nplot  {outputs.png}\ntable {outputs.text}", markup=False)
        run_id = bn.log_to_mlflow(result, outputs, s.resolved_tracking_uri)
        con.print(f"mlflow run {run_id} in {s.resolved_tracking_uri}", markup=False)

    _guard(body)


# ---------------------------------------------------------------------------------------------- table


def _store(table: Optional[str]):
    from fact_ray.pattern_table import PatternTable

    return PatternTable(_settings(table_uri=table).resolved_table_uri)


@table_app.command("list")
def table_list(table: Optional[str] = _TABLE) -> None:
    """List the keys in the table with their best entry."""

    def body() -> None:
        from fact_ray.pattern_table import format_rows

        store = _store(table)
        rows = [r for r in (store.best(k) for k in store.keys()) if r is not None]
        _console().print(format_rows(rows, title=f"{len(rows)} keys in {store.uri}"))

    _guard(body)


@table_app.command("show")
def table_show(
    key: str = typer.Argument(..., help="A match key, or a substring of one (e.g. the rule name)."),
    table: Optional[str] = _TABLE,
) -> None:
    """Show the history of every key that contains KEY."""

    def body() -> None:
        from fact_ray.pattern_table import format_rows

        store = _store(table)
        keys = [k for k in store.keys() if key in k.match_key]
        if not keys:
            raise UserError(f"no key in {store.uri} contains {key!r} (see `fact-ray table list`)")
        for k in keys:
            _console().print(format_rows(store.history(k), title=k.match_key))

    _guard(body)


@table_app.command("export")
def table_export(
    out: str = typer.Argument(..., help="Destination file."),
    fmt: str = typer.Option("parquet", "--format", help="parquet, csv or jsonl."),
    table: Optional[str] = _TABLE,
) -> None:
    """Export every row of the table to one file."""

    def body() -> None:
        store = _store(table)
        n = len(store.all_rows())
        dest = store.export(out, format=fmt)
        typer.echo(f"exported {n} rows of {store.uri} to {dest}")

    _guard(body)


@table_app.command("compact")
def table_compact(table: Optional[str] = _TABLE) -> None:
    """Merge each partition's small commit files into one (no row lost; safe to interrupt; one at a time)."""

    def body() -> None:
        from fact_ray.pattern_table.compact import compact

        store = _store(table)
        r = compact(store)
        typer.echo(f"compacted {store.uri}: {r.files_in} files into {r.files_out} ({r.rows} rows, "
                   f"{r.partitions} partitions), {r.deleted} removed, generation {r.generation}")
        for s in r.skipped:
            typer.echo(f"skipped (left as it is): {s}", err=True)

    _guard(body)


# ---------------------------------------------------------------------------------------------- compare


@app.command()
def compare(
    runs: list[str] = typer.Argument(None, help="MLflow run ids to compare (default: the last --last runs)."),
    last: int = typer.Option(2, "--last", help="How many of the latest runs to compare when no ids are given."),
    model: Optional[str] = typer.Option(None, "--model", help="Compare this model's runs only (its name, as runs "
                                        "record it), under --policy."),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP + " With --model (default fp32)."),
    nights: int = typer.Option(2, "--nights", help="With --model: how many of its latest runs."),
    tracking_uri: Optional[str] = _TRACK,
) -> None:
    """Compare tuning runs recorded in MLflow, pattern by pattern (one model's nights with --model)."""

    def body() -> None:
        from rich.table import Table

        from fact_ray.tracking import compare_runs

        s = _settings(tracking_uri=tracking_uri, policy=policy)
        ids = tuple(runs or ())
        if model is not None:
            from fact_ray.night_tracking import model_runs

            if ids:
                raise UserError("give run ids or --model, not both")
            ids = tuple(model_runs(s.resolved_tracking_uri, model, s.policy.value, nights))
            if not ids:
                raise UserError(f"no runs of model {model!r} under policy {s.policy.value} in "
                                f"{s.resolved_tracking_uri}")
        rows = compare_runs(s.resolved_tracking_uri, run_ids=ids, last=last)
        if not rows:
            raise UserError(f"no fact-ray runs in {s.resolved_tracking_uri}")
        # The rows carry every field (for --json later and for tests); a person needs these, grouped by pattern.
        cols = [("run", lambda r: r["run"][:8]), ("started", lambda r: r["started"][:19].replace("T", " ")),
                ("model", lambda r: r["model"]), ("policy", lambda r: r["policy"]), ("gpu", lambda r: r["gpu"]),
                ("pattern", lambda r: r["rule"]), ("winner", lambda r: r["winner"] or "-"),
                ("best ms", lambda r: f"{r['best_ms']:.3g}"), ("PyTorch ms", lambda r: f"{r['baseline_ms']:.3g}"),
                ("speedup", lambda r: f"{r['speedup']:.2f}x"), ("trials", lambda r: str(r["trials"])),
                ("from table", lambda r: "yes" if r["from_table"] else ""),
                ("best so far", lambda r: "*" if r["is_best"] else "")]
        t = Table(title=f"fact-ray runs compared ({len({r['run'] for r in rows})} runs)")
        for name, _ in cols:
            t.add_column(name, overflow="fold")
        for r in rows:
            t.add_row(*(f(r) for _, f in cols))
        _console().print(t)

    _guard(body)


@app.command()
def rollback(
    name: str = typer.Argument(..., help="A registered model (<fleet>.<model>.<policy>)."),
    tracking_uri: Optional[str] = _TRACK,
) -> None:
    """Move the registered model's `production` alias back to the version it named before."""

    def body() -> None:
        from fact_ray.night_tracking import rollback as rb

        s = _settings(tracking_uri=tracking_uri)
        typer.echo(f"{name}@production -> version {rb(s.resolved_tracking_uri, name)}")

    _guard(body)


# ---------------------------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    address: Optional[str] = _ADDRESS,
    table: Optional[str] = _TABLE,
    tracking_uri: Optional[str] = _TRACK,
) -> None:
    """Check this machine and the configured services: each item ok / missing, with the fix."""

    def body() -> None:
        from rich.table import Table

        from fact_ray import doctor as dr

        s = _settings(ray_address=address, table_uri=table, tracking_uri=tracking_uri)
        dr.check_inputs(s)
        checks = dr.run_checks(s)
        t = Table(title="fact-ray doctor")
        for col in ("item", "status", "detail", "fix"):
            t.add_column(col)
        for c in checks:
            t.add_row(c.item, "[green]ok[/]" if c.ok else "[red]missing[/]", c.detail, "" if c.ok else c.fix)
        _console().print(t)
        if not all(c.ok or c.optional for c in checks):
            raise typer.Exit(1)

    _guard(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
