"""`knd drift`: compare logged requests or a folder of audio with the training reference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kndcli.cli import options as opt
from kndcli.cli.options import console

if TYPE_CHECKING:
    from kndcli.monitoring.drift import DriftResult

app = typer.Typer(
    help="Data and prediction drift against the bundle's reference.", no_args_is_help=True
)

LogOpt = Annotated[
    str | None,
    opt.keyed(
        "serve.log_sink", "--log-sink", help="Prediction log: SQLite path or gs://bucket/prefix."
    ),
]
AudioOpt = Annotated[
    Path | None,
    typer.Option("--audio", help="Score this folder of audio instead of reading a log."),
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="Log window start: ISO time or an age like 24h, 30m, 7d."),
]
LastOpt = Annotated[int | None, typer.Option("--last", help="Only the newest N log records.")]


def _analyze(ctx: typer.Context, audio: Path | None, since: str | None, last: int | None):
    from kndcli.inference.bundle import resolve_model
    from kndcli.monitoring.drift import run_drift

    cfg = opt.load(ctx)
    bundle = resolve_model(cfg.inference.model)
    log = ctx.params.get("log_sink") if audio else cfg.serve.log_sink  # both: refused below
    return run_drift(bundle, cfg, log=log, audio=audio, since=since, last=last), cfg


def _print(result: DriftResult, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich import box
    from rich.table import Table

    out = console()
    if result.columns:
        # Six columns that fit 80: the numbers never wrap, and the summaries are cut to
        # their medians (the ranges and the distance are in --json and the HTML report).
        table = Table(
            title=f"drift: {result.source}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        table.add_column("column", no_wrap=True)
        table.add_column("test", no_wrap=True)
        table.add_column("stat", justify="right", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True)
        table.add_column("reference -> current", overflow="fold")
        table.add_column("drift", no_wrap=True)
        for c in result.columns:
            mark = "[red]severe[/]" if c.severe else "[red]yes[/]" if c.drifted else "no"
            table.add_row(
                c.column,
                c.test,
                "" if c.statistic is None else f"{c.statistic:.3f}",
                "" if c.p_value is None else f"{c.p_value:.2g}",
                f"{_median(c.reference_summary)} -> {_median(c.current_summary)}",
                mark if c.tested else f"[dim]{c.note}[/]",
            )
        out.print(table)
    colour = {"ok": "green", "drift": "red", "cannot-judge": "yellow"}[result.verdict]
    out.print(f"[bold {colour}]{result.verdict}[/]: {result.reason}")


@app.command("report")
def report(
    ctx: typer.Context,
    model: opt.Model = None,
    log_sink: LogOpt = None,
    audio: AudioOpt = None,
    out: Annotated[Path, opt.out_option("HTML report; the JSON summary goes beside it.")] = Path(
        "drift_report.html"
    ),
    since: SinceOpt = None,
    last: LastOpt = None,
    json_out: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Write an HTML drift report (Evidently) and a JSON summary, and print the table."""
    from kndcli.monitoring.drift import write_report

    result, cfg = _analyze(ctx, audio, since, last)
    written = write_report(result, out, out.with_suffix(".json"), cfg)  # type: ignore[arg-type]
    _print(result, json_out)
    if not json_out:
        console().print(f"report: {written['html']}  summary: {written['json']}")


@app.command("check")
def check(
    ctx: typer.Context,
    model: opt.Model = None,
    log_sink: LogOpt = None,
    audio: AudioOpt = None,
    since: SinceOpt = None,
    last: LastOpt = None,
    json_out: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Exit 0 without drift, 1 with drift, 4 when there is too little data to judge.

    A wrong bundle, log path or option is 2 and an unreachable log 3, so a cron job's
    `|| alert` can tell drift from a typo.
    """
    result, _ = _analyze(ctx, audio, since, last)
    _print(result, json_out)
    raise typer.Exit(result.exit_code)


def _median(summary: str) -> str:
    """'3.67 [3.24, 4.31]' -> '3.67': the centre of a summary, for the narrow table."""
    return summary.split(" [")[0]
