"""`knd drift`: compare logged requests or a folder of audio with the training reference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kndcli.cli.common import ConfigOpt, JsonOpt, ModelOpt, OverridesArg, build_config, console

if TYPE_CHECKING:
    from kndcli.monitoring.drift import DriftResult

app = typer.Typer(
    help="Data and prediction drift against the bundle's reference.", no_args_is_help=True
)

LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log", help="Prediction log: SQLite path or gs://bucket/prefix (default: serve.log_sink)."
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


def _analyze(
    model: Path | None,
    log: str | None,
    audio: Path | None,
    since: str | None,
    last: int | None,
    config: list[Path] | None,
    overrides: list[str] | None,
) -> tuple[DriftResult, object]:
    from kndcli.inference.bundle import resolve_model
    from kndcli.monitoring.drift import run_drift

    cfg = build_config(config, overrides)
    bundle = resolve_model(model, cfg.inference.model)
    return run_drift(bundle, cfg, log=log, audio=audio, since=since, last=last), cfg


def _print(result: DriftResult, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    out = console()
    if result.columns:
        table = Table(title=f"drift: {result.source}", title_justify="left")
        for name, justify in (
            ("column", "left"),
            ("test", "left"),
            ("statistic", "right"),
            ("p-value", "right"),
            ("distance", "right"),
            ("reference", "left"),
            ("current", "left"),
            ("drifted", "left"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for c in result.columns:
            mark = "[red]yes (severe)[/]" if c.severe else "[red]yes[/]" if c.drifted else "no"
            table.add_row(
                c.column,
                c.test,
                "" if c.statistic is None else f"{c.statistic:.3f}",
                "" if c.p_value is None else f"{c.p_value:.2g}",
                "" if c.distance is None else f"{c.distance:.2f}",
                c.reference_summary,
                c.current_summary,
                mark if c.tested else f"[dim]{c.note}[/]",
            )
        out.print(table)
    colour = {"ok": "green", "drift": "red", "cannot-judge": "yellow"}[result.verdict]
    out.print(f"[bold {colour}]{result.verdict}[/]: {result.reason}")


@app.command("report")
def report(
    model: ModelOpt = None,
    log: LogOpt = None,
    audio: AudioOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="HTML report; the JSON summary goes beside it.")
    ] = Path("drift_report.html"),
    since: SinceOpt = None,
    last: LastOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Write an HTML drift report (Evidently) and a JSON summary, and print the table."""
    from kndcli.monitoring.drift import write_report

    result, cfg = _analyze(model, log, audio, since, last, config, overrides)
    written = write_report(result, out, out.with_suffix(".json"), cfg)  # type: ignore[arg-type]
    _print(result, as_json)
    if not as_json:
        console().print(f"report: {written['html']}  summary: {written['json']}")


@app.command("check")
def check(
    model: ModelOpt = None,
    log: LogOpt = None,
    audio: AudioOpt = None,
    since: SinceOpt = None,
    last: LastOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Exit 0 without drift, 1 with drift, 2 when it cannot judge (for cron and CI)."""
    result, _ = _analyze(model, log, audio, since, last, config, overrides)
    _print(result, as_json)
    raise typer.Exit(result.exit_code)
