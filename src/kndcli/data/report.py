"""`knd data split-report`: what is in each split, and proof that no speaker leaks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from kndcli.data.splits import SPLITS, shared_speakers
from kndcli.data.store import PreparedSet


def print_split_report(prepared: Path, console) -> bool:
    """Print clips per split x label and per speaker; False if a speaker is in two splits."""
    from rich.table import Table

    ps = PreparedSet.open(prepared)
    labels = [label for label in ps.labels if any(r["label"] == label for r in ps.rows)]
    by_split_label = Counter((r["split"], r["label"]) for r in ps.rows)
    # Labels down, splits across: eight labels across would not fit 80 columns.
    table = Table(title=f"{prepared}: clips per label and split")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for label in labels:
        counts = [by_split_label[(split, label)] for split in SPLITS]
        table.add_row(label, *map(str, counts), str(sum(counts)))
    totals = [sum(by_split_label[(split, label)] for label in labels) for split in SPLITS]
    table.add_row("[bold]total[/]", *map(str, totals), str(sum(totals)))
    console.print(table)
    for split in SPLITS:
        speakers = sorted({r["speaker"] for r in ps.rows if r["split"] == split})
        console.print(f"{split} speakers: {' '.join(speakers) or '-'}")

    per_speaker = Counter((r["speaker"], r["split"]) for r in ps.rows)
    speakers = Table(title="clips per speaker")
    for name in ("speaker", "gender", "split", "clips"):
        speakers.add_column(name, justify="right" if name == "clips" else "left")
    genders = {r["speaker"]: r["gender"] for r in ps.rows}
    for (speaker, split), n in sorted(per_speaker.items()):
        speakers.add_row(speaker, genders[speaker], split, str(n))
    console.print(speakers)

    leaks = shared_speakers(ps.rows)
    if leaks:
        for speaker, splits in sorted(leaks.items()):
            console.print(f"[red]speaker {speaker} appears in {', '.join(sorted(splits))}[/]")
        return False
    console.print("[green]no speaker appears in more than one split[/]")
    return True
