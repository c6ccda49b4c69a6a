"""Every option the commands share, declared once, and the one way a command gets its config.

A flag that sets configuration names its key (`--port` sets `serve.port`): `FLAG_KEYS`
holds the mapping, the help text shows it, and `load(ctx)` turns the flags the user gave
into values merged after config files, the environment and `--set`. So `--port 9000`,
`--set serve.port=9000` and `serve: {port: 9000}` in a file are the same thing, checked by
the same schema, and `--print-config` shows what the command would run with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from kndcli.config import KndConfig

# Long flag -> config key. A flag means the same key in every command that has it.
FLAG_KEYS: dict[str, str] = {}


def keyed(key: str, *names: str, help: str, **kwargs: Any) -> Any:
    """A typer Option that sets config `key`; its default is the config's (None here)."""
    FLAG_KEYS[names[0].split("/")[0]] = key  # click names "--spot/--no-spot" "--spot"
    return typer.Option(*names, help=f"{help} (sets {key})", show_default=False, **kwargs)


# --------------------------------------------------------------- configuration, everywhere
ConfigFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--config", "-c", help="Config file (repeatable; later files win).", show_default=False
    ),
]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Set a config key, e.g. --set train.trainer.max_epochs=5 (repeatable).",
        show_default=False,
    ),
]
PrintConfig = Annotated[
    bool,
    typer.Option(
        "--print-config", help="Print the configuration this command would run with; exit."
    ),
]

# ------------------------------------------------------------------------- the concepts
Model = Annotated[  # a string: a gs:// URL must not be normalised into a path
    str | None,
    keyed("inference.model", "--model", "-m", help="Model bundle directory."),
]
Prepared = Annotated[
    str | None,
    keyed("data.prepared", "--prepared", help="Prepared set: a directory or gs:// URL."),
]
Backend = Annotated[
    str | None,
    keyed("inference.backend", "--backend", help="onnx or torch."),
]
Split = Annotated[
    Literal["train", "val", "test"],
    typer.Option(
        "--split",
        help="Split of the prepared set: val or test (train only of a set the model never saw).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
Jsonl = Annotated[bool, typer.Option("--jsonl", help="One JSON object per line, as they come.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the exact requests as JSON; call nothing.")
]
Paths = Annotated[
    list[str],
    typer.Argument(
        help="Audio files, directories (searched recursively) or globs.", show_default=False
    ),
]


def out_option(what: str) -> Any:
    """`--out/-o`: where this command writes what it makes."""
    return typer.Option("--out", "-o", help=what, show_default=False)


def load(
    ctx: typer.Context,
    files: list[Path] | None = None,
    values: dict[str, Any] | None = None,
) -> KndConfig:
    """The command's configuration: files, environment, --set, then its keyed flags.

    `files` stand in for --config (a resumed run's own config) and `values` are merged
    before the flags. With --print-config, print it as YAML and exit 0 instead.
    """
    from kndcli.config import load_config

    params = ctx.params
    flags = {
        FLAG_KEYS[p.opts[0]]: params[p.name]
        for p in ctx.command.params
        if p.opts and p.opts[0] in FLAG_KEYS and params.get(p.name) is not None
    }
    cfg = load_config(
        files if files is not None else params.get("config"),
        params.get("sets"),
        {**(values or {}), **flags},
    )
    _check_perturbations(cfg)
    if params.get("print_config"):
        from kndcli.config import to_yaml

        typer.echo(to_yaml(cfg), nl=False)
        raise typer.Exit(0)
    return cfg


def _check_perturbations(cfg: KndConfig) -> None:
    """The degradation ranges, checked by the layer that knows them (perturb imports config,
    not the other way round) so that every command and --print-config refuse a bad one
    before any work starts. Defaults are valid, so unchanged sections cost `knd predict`
    no import."""
    from kndcli.config import ConditionsConfig, RobustnessConfig

    if cfg.train.augment.conditions != ConditionsConfig():
        from kndcli.perturb.multicondition import check_conditions

        check_conditions(cfg.train.augment.conditions)
    if cfg.robustness != RobustnessConfig():
        from kndcli.perturb.suite import check_robustness

        check_robustness(cfg.robustness)


def chosen_prepared(ctx: typer.Context, cfg: KndConfig) -> str | None:
    """`data.prepared` when the user chose it (--prepared, --set or a file), else None:
    commands that read a bundle then use the set the bundle records instead."""
    from kndcli.config import DataConfig

    given = ctx.params.get("prepared") is not None
    return cfg.data.prepared if given or cfg.data.prepared != DataConfig().prepared else None


def console(stderr: bool = False) -> Any:
    """A rich console; 80 columns when piped, so tables read the same in a log file."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def choose_output(json_out: bool, **others: bool) -> None:
    """Refuse two output formats at once (a usage error, exit 2)."""
    from kndcli.errors import UsageError

    chosen = ["--json"] * json_out + [f"--{name}" for name, on in others.items() if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {' and '.join(chosen)}")
