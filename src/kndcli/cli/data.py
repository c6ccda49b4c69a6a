"""`knd data`: download, synthesize and prepare datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli import options as opt
from kndcli.cli.options import console

app = typer.Typer(help="Get raw audio and turn it into a prepared set.", no_args_is_help=True)


@app.command("download")
def download(
    dataset: Annotated[str, typer.Argument(help="ravdess, cremad or tess.")],
    url: Annotated[str | None, typer.Option(help="Download from this URL instead.")] = None,
    md5: Annotated[str | None, typer.Option(help="Expected md5 of the archive.")] = None,
    out: Annotated[Path, opt.out_option("Extract under this directory.")] = Path("data/raw"),
) -> None:
    """Download a public dataset, verify its checksum and extract it safely."""
    from kndcli.datasets.download import download_dataset

    target = download_dataset(dataset, out=out, url=url, md5=md5)
    console().print(f"[green]extracted[/] {dataset} to {target}")


@app.command("synth")
def synth(
    out: Annotated[Path, opt.out_option("Write RAVDESS-named WAV files here.")] = Path(
        "data/synth"
    ),
    actors: Annotated[int, typer.Option(help="Number of synthetic speakers.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    sample_rate: Annotated[int, typer.Option(help="Sample rate of the written files.")] = 16000,
) -> None:
    """Generate emotional speech-like clips (the built-in data for demo and tests)."""
    from kndcli.datasets.synth import synthesize

    paths = synthesize(out, actors=actors, seed=seed, sample_rate=sample_rate)
    console().print(f"[green]wrote[/] {len(paths)} clips to {out}")


@app.command("prepare")
def prepare(
    ctx: typer.Context,
    dataset: Annotated[
        str | None,
        opt.keyed("data.dataset", "--dataset", help="ravdess, cremad, tess, folder or synth."),
    ] = None,
    raw: Annotated[str | None, opt.keyed("data.raw", "--raw", help="Folder of raw audio.")] = None,
    prepared: opt.Prepared = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad file.")] = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Catalog, split by speaker, decode and store a dataset for training.

    Bad files are skipped and listed (exit 1 when there were any); --strict stops at the first.
    """
    from kndcli.data.prepare import prepare_dataset

    cfg = opt.load(ctx)
    result = prepare_dataset(cfg, strict=strict, progress=True)
    con = console()
    con.print(
        f"[green]prepared[/] {result.n_clips} clips ({result.n_reused} unchanged, reused) "
        f"from {cfg.data.raw} into {cfg.data.prepared} in {result.seconds:.1f} s"
    )
    for split, count in sorted(result.split_counts.items()):
        con.print(f"  {split:<5} {count:>6} clips")
    for split, speakers in result.emptied.items():
        con.print(
            f"[yellow]warning[/] split '{split}' is empty: every clip of its speakers "
            f"({', '.join(speakers)}) was bad"
        )
    if result.failures:
        from rich.markup import escape  # file names and errors are text, not markup

        con.print(f"[yellow]skipped {len(result.failures)} bad files:[/]")
        for failure in result.failures:
            con.print(f"  {escape(failure)}")
        raise typer.Exit(1)


@app.command("split-report")
def split_report(
    ctx: typer.Context,
    prepared: opt.Prepared = None,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Clips per split x label x speaker; exit 1 if a speaker is in two splits."""
    from kndcli.data.report import print_split_report

    cfg = opt.load(ctx)
    ok = print_split_report(cfg.data.prepared, console())
    raise typer.Exit(0 if ok else 1)
