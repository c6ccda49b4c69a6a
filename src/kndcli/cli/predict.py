"""`knd predict`.

`knd predict` is the command people run most, often on one clip, so nothing heavy is
imported until it is needed: no omegaconf without --config/--set, no rich for --json/--csv,
and the ONNX path never imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from kndcli.cli import options as opt
from kndcli.errors import UsageError

if TYPE_CHECKING:
    from kndcli.config import KndConfig
    from kndcli.inference.predictor import Prediction

PROGRESS_MIN_FILES = 20


def predict(
    ctx: typer.Context,
    paths: opt.Paths,
    model: opt.Model = None,
    backend: opt.Backend = None,
    min_confidence: Annotated[
        float | None,
        opt.keyed(
            "inference.min_confidence",
            "--min-confidence",
            help="Answer 'uncertain' below this calibrated confidence.",
        ),
    ] = None,
    json_out: opt.Json = False,
    jsonl: opt.Jsonl = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV on stdout.")] = False,
    timeline: Annotated[
        bool,
        typer.Option(
            "--timeline",
            help="Long recordings (meetings, calls): speech segments found by a voice-activity "
            "detector, scored into an emotion timeline; read block by block, up to "
            "timeline.max_duration_s (4 h).",
        ),
    ] = False,
    timeline_dir: Annotated[
        str | None,
        typer.Option(
            "--timeline-dir",
            help="With --timeline: also write NAME.json, .csv, .vtt, .srt and .png per "
            "file to this directory.",
        ),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar on stderr (default: on a terminal, for many files).",
        ),
    ] = None,
    out: Annotated[
        str | None,
        opt.out_option(
            "Write results as JSON-lines parts to this directory or gs:// prefix (resumable) "
            "instead of stdout; PATHS may be gs:// prefixes then."
        ),
    ] = None,
    shard: Annotated[
        str,
        typer.Option(
            "--shard",
            help="With --out: score shard I/N of the files (disjoint, by name), or 'auto' "
            "for this Vertex AI replica's shard.",
        ),
    ] = "0/1",
    part_size: Annotated[
        int, typer.Option("--part-size", help="With --out: files per part (the resume unit).")
    ] = 1000,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            help="With --out: score the shard in this many processes (one per vCPU on a "
            "big machine; a rerun must use the same count).",
        ),
    ] = 1,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Predict the emotion of each clip: label, confidence and top-3 (table, JSON or CSV).

    Exit 1 when any file could not be scored (the others are still printed).
    """
    opt.choose_output(json_out, jsonl=jsonl, csv=csv_out)
    cfg = opt.load(ctx)
    if timeline_dir is not None and not timeline:
        raise UsageError("--timeline-dir needs --timeline")
    if out is not None:
        if timeline:
            raise UsageError(
                "--timeline and --out do not go together: a timeline is per recording; "
                "use --timeline-dir DIR for its files"
            )
        as_json = json_out or jsonl or csv_out
        predict_to_store(cfg, paths, out, shard, part_size, as_json, processes=processes)
        return
    if shard != "0/1" or processes != 1:
        raise UsageError(
            "--shard and --processes need --out: a shard's results go to parts, not stdout"
        )
    from kndcli.audio import find_audio_files
    from kndcli.inference.bundle import resolve_model
    from kndcli.inference.predictor import Predictor

    files = find_audio_files(paths)
    if not files:
        raise UsageError(f"no audio files found in {' '.join(paths)}")
    bundle = resolve_model(cfg.inference.model)
    predictor = Predictor.from_config(bundle, cfg.inference, audio=cfg.audio)
    if timeline:
        from kndcli.cli.timeline import predict_timelines

        fmt = "json" if json_out else "jsonl" if jsonl else "csv" if csv_out else "table"
        failed = predict_timelines(cfg, predictor, files, fmt, timeline_dir, str(bundle))
        if failed:
            print(f"{failed} of {len(files)} files failed", file=sys.stderr)
            raise typer.Exit(1)
        return
    predictions = predictor.predict_paths(
        files, batch_size=cfg.inference.batch_size, workers=cfg.inference.workers
    )
    if progress is None:
        progress = len(files) >= PROGRESS_MIN_FILES and sys.stderr.isatty()
    if progress:
        predictions = _with_progress(predictions, len(files))
    if json_out:
        failed = _write_json(predictions, str(bundle))
    elif jsonl:
        failed = _write_jsonl(predictions)
    elif csv_out:
        failed = _write_csv(predictions, predictor.labels)
    else:
        failed = _write_table(predictions)
    if failed:
        print(f"{failed} of {len(files)} files failed", file=sys.stderr)
        raise typer.Exit(1)


def predict_to_store(
    cfg: KndConfig,
    paths: list[str],
    out: str,
    shard_text: str,
    part_size: int,
    as_json: bool,
    processes: int = 1,
) -> None:
    """`--out`: this shard's files scored into resumable parts; a summary on stdout."""
    import json

    from kndcli.inference.archive import (
        Shard,
        ShardJob,
        Store,
        check_split,
        list_sources,
        score_in_processes,
        score_shard,
    )
    from kndcli.inference.bundle import resolve_model
    from kndcli.inference.predictor import Predictor

    if processes < 1:
        raise UsageError(f"--processes {processes}: at least 1")
    if part_size < 1:
        raise UsageError(f"--part-size must be at least 1, got {part_size}")
    shard = Shard.parse(shard_text)
    sources = list_sources(paths)
    if not sources:
        raise UsageError(f"no audio files found in {' '.join(paths)}")
    model = str(resolve_model(cfg.inference.model))
    if processes > 1:
        job = ShardJob(model, cfg.inference, cfg.audio, out, part_size, cfg.inference.batch_size)
        summary = score_in_processes(job, sources, shard, processes)
    else:
        check_split(Store(out), shard, processes)
        predictor = Predictor.from_config(model, cfg.inference, audio=cfg.audio)

        def progress(number: int, total: int) -> None:
            print(f"part {number + 1}/{total} written", file=sys.stderr, flush=True)

        summary = score_shard(
            predictor,
            sources,
            out,
            shard,
            part_size=part_size,
            batch_size=cfg.inference.batch_size,
            workers=cfg.inference.workers,
            on_part=progress,
        )
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        print(
            f"shard {shard.index}/{shard.count}: {summary.files} of {len(sources)} files, "
            f"{summary.parts} parts ({summary.parts_skipped} done before); scored "
            f"{summary.scored}, failed {summary.failed} -> {out}"
        )
    if summary.failed:
        print(f"{summary.failed} files failed: see {out}/errors-*.jsonl",
              file=sys.stderr)  # fmt: skip
        raise typer.Exit(1)


def _error_line(pred: Prediction) -> None:
    print(f"error: {pred.source}: {pred.error}", file=sys.stderr, flush=True)


def _with_progress(predictions: Iterable[Prediction], total: int) -> Iterator[Prediction]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from kndcli.cli.options import console

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("scoring", total=total)
        for pred in predictions:
            bar.advance(task)
            yield pred


def _write_json(predictions: Iterable[Prediction], model: str) -> int:
    """One document: the model, counts and every prediction (failures with their error)."""
    import json

    rows = []
    for pred in predictions:
        if not pred.ok:
            _error_line(pred)
        rows.append(pred.to_dict())
    failed = sum(1 for row in rows if row.get("error"))
    document = {"model": model, "files": len(rows), "failed": failed, "predictions": rows}
    sys.stdout.write(json.dumps(document) + "\n")
    return failed


def _write_jsonl(predictions: Iterable[Prediction]) -> int:
    import json

    failed = 0
    out = sys.stdout
    for pred in predictions:
        if not pred.ok:
            failed += 1
            _error_line(pred)
        out.write(json.dumps(pred.to_dict()) + "\n")
        out.flush()
    return failed


def _write_csv(predictions: Iterable[Prediction], labels: list[str]) -> int:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["file", "label", "confidence", "duration", *labels, "error"])
    failed = 0
    for pred in predictions:
        if not pred.ok:
            failed += 1
            _error_line(pred)
            writer.writerow([pred.source, "", "", "", *[""] * len(labels), pred.error])
        else:
            writer.writerow(
                [
                    pred.source,
                    pred.label,
                    f"{pred.confidence:.6f}",
                    f"{pred.duration:.4f}",
                    *(f"{pred.probabilities[label]:.6f}" for label in labels),
                    "",
                ]
            )
        sys.stdout.flush()
    return failed


def _write_table(predictions: Iterable[Prediction]) -> int:
    from rich.markup import escape
    from rich.table import Table

    from kndcli.cli.options import console

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("file", overflow="fold")
    table.add_column("label")
    table.add_column("confidence", justify="right")
    table.add_column("top-3")
    failed = 0
    for pred in predictions:
        if not pred.ok:
            failed += 1
            _error_line(pred)
            table.add_row(escape(pred.source), "[red]error[/]", "", f"[red]{escape(pred.error)}[/]")
            continue
        top3 = ", ".join(f"{label} {p:.2f}" for label, p in pred.top(3))
        table.add_row(escape(pred.source), escape(pred.label), f"{pred.confidence:.3f}", top3)
    console().print(table)
    return failed
