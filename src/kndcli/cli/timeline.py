"""`knd predict --timeline`: long recordings, one emotion timeline per file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kndcli.config import KndConfig
    from kndcli.inference.predictor import Predictor
    from kndcli.inference.timeline import Timeline


def predict_timelines(
    cfg: KndConfig,
    predictor: Predictor,
    files: list[Path],
    fmt: str,
    directory: str | None,
    model: str,
) -> int:
    """Score each file into its timeline and print it as `fmt` (table, json, jsonl,
    csv), writing its files to `directory` when given. Returns the number that failed;
    a failed file never stops the others."""
    from kndcli.inference.timeline import score_recording

    printer = _PRINTERS[fmt](predictor.labels, model)
    stems = _Stems()
    failed = 0
    for path in files:
        timeline = score_recording(predictor, path, cfg.timeline, cfg.audio)
        if not timeline.ok:
            failed += 1
            print(f"error: {timeline.source}: {timeline.error}", file=sys.stderr, flush=True)
        if directory is not None and (timeline.ok or timeline.spans):
            _write_files(timeline, Path(directory), stems.next(path))
        printer.add(timeline)
    printer.close()
    return failed


class _Stems:
    """File names for --timeline-dir: the recording's stem, numbered when two collide."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def next(self, path: Path) -> str:
        stem, n = path.stem, 1
        while stem in self.used:
            n += 1
            stem = f"{path.stem}-{n}"
        self.used.add(stem)
        return stem


def _write_files(timeline: Timeline, directory: Path, stem: str) -> None:
    from kndcli.errors import KndError
    from kndcli.inference.timeline import write_files

    try:
        write_files(timeline, directory, stem)
    except OSError as exc:
        raise KndError(f"--timeline-dir {directory}: cannot write ({exc.strerror})") from None
    try:
        from kndcli.plots import plot_timeline

        plot_timeline(timeline, directory / f"{stem}.png")
    except ImportError:
        print(
            f"note: {stem}.png not drawn: the timeline PNG needs matplotlib "
            "(uv sync --extra train)",
            file=sys.stderr,
        )


class _Table:
    def __init__(self, labels: list[str], model: str) -> None:
        from rich.table import Table

        self.table = Table(show_edge=False, pad_edge=False)
        for name, justify in (
            ("file", "left"),
            ("time", "right"),
            ("label", "left"),
            ("confidence", "right"),
        ):
            self.table.add_column(name, justify=justify, overflow="fold")

    def add(self, t: Timeline) -> None:
        from rich.markup import escape  # file names and errors are text, not markup

        if t.label is None and t.error is None:
            self.table.add_row(escape(t.source), f"0-{t.duration:.1f} s", "[dim]no speech[/]", "")
        elif t.error is not None and not t.spans:
            self.table.add_row(escape(t.source), "", "[red]error[/]", f"[red]{escape(t.error)}[/]")
            return
        else:
            self.table.add_row(
                escape(t.source),
                f"0-{t.duration:.1f} s",
                f"{t.label} (speech {t.speech_s:.0f} s)",
                f"{t.confidence:.3f}",
            )
        for span in t.spans:
            self.table.add_row(
                "", f"{span.start:.1f}-{span.end:.1f} s", span.label, f"{span.confidence:.3f}"
            )
        if t.error is not None:
            self.table.add_row("", "", "[red]stopped[/]", f"[red]{escape(t.error)}[/]")

    def close(self) -> None:
        from kndcli.cli.options import console

        console().print(self.table)


class _Json:
    def __init__(self, labels: list[str], model: str) -> None:
        self.model = model
        self.rows: list[dict] = []

    def add(self, t: Timeline) -> None:
        self.rows.append(t.to_dict())

    def close(self) -> None:
        import json

        failed = sum(1 for row in self.rows if "error" in row)
        document = {"model": self.model, "files": len(self.rows), "failed": failed}
        sys.stdout.write(json.dumps({**document, "timelines": self.rows}) + "\n")


class _JsonLines:
    def __init__(self, labels: list[str], model: str) -> None:
        pass

    def add(self, t: Timeline) -> None:
        import json

        sys.stdout.write(json.dumps(t.to_dict()) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass


class _Csv:
    def __init__(self, labels: list[str], model: str) -> None:
        import csv

        from kndcli.inference.timeline import csv_header

        self.writer = csv.writer(sys.stdout, lineterminator="\n")
        self.writer.writerow([*csv_header(labels), "error"])
        self.blank = [""] * (len(labels) + 4)

    def add(self, t: Timeline) -> None:
        for row in t.csv_rows():
            self.writer.writerow([*row, ""])
        if t.error is not None:
            self.writer.writerow([t.source, *self.blank, t.error])
        sys.stdout.flush()

    def close(self) -> None:
        pass


_PRINTERS = {"table": _Table, "json": _Json, "jsonl": _JsonLines, "csv": _Csv}
