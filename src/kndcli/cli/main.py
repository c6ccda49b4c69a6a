"""The `knd` entry point: one Typer app with a sub-app or command per DESIGN.md group."""

from __future__ import annotations

import inspect
import sys
import traceback
from typing import Annotated

import typer

# Typer vendors click: its usage errors are typer._click's classes, not click's.
from typer._click.exceptions import ClickException

from kndcli import __version__
from kndcli.cli import (
    cloud,
    config_cmd,
    data,
    demo,
    drift,
    export,
    predict,
    profile,
    serve,
    stream,
    train,
)
from kndcli.errors import EXIT_RUNTIME, EXIT_USAGE, KndError

app = typer.Typer(
    name="knd",
    help="Speech emotion recognition: from raw audio to a monitored cloud service.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"knd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Speech emotion recognition: from raw audio to a monitored cloud service."""


app.add_typer(data.app, name="data")
app.command("train")(train.train)
app.command("evaluate")(train.evaluate)
app.command("predict")(predict.predict)
app.command("export")(export.export)
app.command("serve")(serve.serve)
app.command("stream")(stream.stream)
app.add_typer(profile.app, name="profile")
app.add_typer(drift.app, name="drift")
app.add_typer(cloud.app, name="cloud")
app.add_typer(config_cmd.app, name="config")
app.command("demo")(demo.demo)


def _one_line_paragraphs(group: typer.Typer) -> None:
    """Give every command a help text whose paragraphs are single lines.

    In rich markup mode Typer joins the wrapped lines of a docstring's first paragraph
    only; later paragraphs kept the source's line breaks and printed them mid-sentence.
    Joined here, every paragraph is wrapped to the terminal like the first.
    """
    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            paragraphs = inspect.cleandoc(doc).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _one_line_paragraphs(sub.typer_instance)


_one_line_paragraphs(app)


def main() -> None:
    """Run the app; every failure becomes its exit code (errors.py) and a short message."""
    try:
        result = app(standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except KndError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ClickException as exc:
        _usage_error(exc)
        sys.exit(EXIT_USAGE)
    except Exception:  # a bug in knd: the traceback is what a report needs
        traceback.print_exc()
        print("error: knd failed unexpectedly (a bug: please report it)", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)


def _usage_error(exc: ClickException) -> None:
    """One line for the problem, one with the command's usage and where help is."""
    message = exc.format_message()
    if not message:  # a group run alone: its help is already printed
        return
    if "unexpected extra argument" in message and "=" in message:
        message += "; config overrides are given as --set KEY=VALUE"
    ctx = getattr(exc, "ctx", None)
    print(f"error: {message}", file=sys.stderr)
    if ctx is not None:
        usage = ctx.get_usage().replace("Usage: ", "").strip()
        print(f"usage: {usage}  (see: {ctx.command_path} --help)", file=sys.stderr)
