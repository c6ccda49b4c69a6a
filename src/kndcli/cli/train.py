"""`knd train` and `knd evaluate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli import options as opt
from kndcli.cli.options import console
from kndcli.errors import UsageError


def train(
    ctx: typer.Context,
    prepared: opt.Prepared = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue this run directory from its last checkpoint, with its config.",
            show_default=False,
        ),
    ] = None,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Train a model on the prepared set and write a model bundle."""
    from kndcli.training.train import finished_bundle, run_config_file
    from kndcli.training.train import train as run_training

    if resume and (done := finished_bundle(resume)):
        print(
            f"{resume}: this run finished and wrote {done}; nothing to resume "
            "(start a new run with --set train.run_name=NAME)",
            file=sys.stderr,
        )
        return
    if resume and config:
        raise UsageError("--resume continues a run with its own config: drop --config")
    run = (
        {
            "files": [run_config_file(resume)],
            "values": {"train.run_name": resume.name, "train.output_dir": str(resume.parent)},
        }
        if resume
        else {}
    )
    cfg = opt.load(ctx, **run)
    result = run_training(cfg)
    if result is None:  # a non-zero rank of a distributed run
        return
    con = console()
    con.print(f"[green]trained[/] {result.epochs} epochs in {result.seconds:.0f} s")
    for split, m in result.metrics.items():
        con.print(
            f"  {split:<5} accuracy {m['accuracy']:.1%}  macro-F1 {m['macro_f1']:.1%}  "
            f"UAR {m['uar']:.1%}  ({m['n_clips']} clips)"
        )
    con.print(f"bundle: {result.bundle_dir}")
    con.print(f"next:   knd evaluate -m {result.bundle_dir}")
    con.print(f"        knd predict -m {result.bundle_dir} clip.wav")


def evaluate(
    ctx: typer.Context,
    model: opt.Model = None,
    prepared: opt.Prepared = None,
    split: opt.Split = "test",
    backend: opt.Backend = None,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Score the split under every condition of the robustness: config section "
            "(noise, babble, rooms, telephone, codecs, low-pass, clipping) instead of the "
            "per-class report: writes robustness.json and robustness.png.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        opt.out_option("Write metrics JSON and PNGs here (default: BUNDLE/eval)."),
    ] = None,
    json_out: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Evaluate a bundle: accuracy, macro-F1, UAR, calibration (ECE), per class and speaker.

    Scores the prepared set recorded in the bundle unless --prepared names another, and
    refuses a split the bundle was trained on.
    """
    from kndcli.inference.bundle import resolve_model
    from kndcli.inference.evaluate import evaluate_predictor, save_evaluation
    from kndcli.inference.predictor import Predictor

    cfg = opt.load(ctx)
    path = resolve_model(cfg.inference.model)
    predictor = Predictor.from_config(path, cfg.inference)
    data, out_dir = _evaluation_set(predictor.bundle, opt.chosen_prepared(ctx, cfg), out)
    if robustness:
        _robustness(predictor, data, split, cfg, out_dir, json_out)
        return
    result = evaluate_predictor(predictor, data, split)
    written = save_evaluation(result, out_dir)
    summary = result.summary()
    if json_out:
        typer.echo(json.dumps(summary))
        return
    print_evaluation(summary)
    console().print("wrote " + ", ".join(str(p) for p in written))


def _evaluation_set(bundle, chosen: str | None, out: Path | None):
    """The set the user chose, else the bundle's recorded one; where the results go.

    Results for another set never overwrite the bundle's own `eval/`.
    """
    from kndcli.config import DataConfig
    from kndcli.data.store import PreparedSet
    from kndcli.inference.evaluate import is_recorded_set

    recorded = (bundle.meta.get("data") or {}).get("prepared")
    data = PreparedSet.open(chosen or recorded or DataConfig().prepared)
    if is_recorded_set(bundle.meta, data):
        return data, out or bundle.root / "eval"
    if recorded:
        print(
            f"note: scoring {data.source}, not {recorded} (the set this bundle was trained on)",
            file=sys.stderr,
        )
    return data, out or bundle.root / f"eval-{Path(data.source.rstrip('/')).name}"


def _robustness(predictor, prepared, split: str, cfg, out_dir: Path, json_out: bool) -> None:
    from kndcli.inference.robustness import robustness_report, save_report

    con = console(stderr=True)
    report = robustness_report(
        predictor,
        prepared,
        split,
        cfg.robustness,
        progress=None if json_out else lambda name: con.print(f"scoring {name}", style="dim"),
    )
    written = save_report(report, out_dir, title=f"{predictor.bundle.meta.get('name', '')}")
    if json_out:
        typer.echo(json.dumps(report.summary()))
        return
    print_robustness(report)
    console().print("wrote " + ", ".join(str(p) for p in written))


def print_robustness(report) -> None:
    """Accuracy, macro-F1, UAR, ECE and the drop against clean, one row per condition."""
    from rich.table import Table

    table = Table(
        "condition",
        "accuracy",
        "macro-F1",
        "UAR",
        "ECE",
        "vs clean",
        title=f"{report.split}: "
        f"{report.n_clips} clips per condition, seed {report.seed} (* reference level)",
    )
    for row in report.rows:
        table.add_row(
            row["condition"] + (" *" if row["reference"] else ""),
            f"{row['accuracy']:.1%}",
            f"{row['macro_f1']:.1%}",
            f"{row['uar']:.1%}",
            f"{row['ece']:.1%}",
            "" if row["family"] == "clean" else f"{-100 * row['drop']:+.1f} pt",
        )
    console().print(table)
    for note in report.skipped:
        console().print(f"skipped {note}")


def print_evaluation(summary: dict) -> None:
    """A rich table per class and per speaker, with the headline figures above.

    Takes the summary (`Evaluation.summary()`, or a saved `<split>_metrics.json`) rather
    than the Evaluation, so figures that need the per-clip results, such as the ECE a
    calibrated model would measure, print the same from a file as from a fresh run.
    """
    from rich.table import Table

    con = console()
    calibration = summary["calibration"]
    con.print(
        f"[bold]{summary['split']}[/]: {summary['n_clips']} clips  "
        f"accuracy {summary['accuracy']:.1%}  macro-F1 {summary['macro_f1']:.1%}  "
        f"UAR {summary['uar']:.1%}  ECE {summary['ece']:.1%} "
        f"(temperature {calibration['temperature']:.2f}; a calibrated model would measure "
        f"about {calibration['ece_if_calibrated']:.1%} on this many clips)"
    )
    chosen = summary["selective"]
    if chosen["threshold"] > 0:
        con.print(
            f"min_confidence {chosen['threshold']:.2f}: answers {chosen['coverage']:.0%} of "
            f"clips, {chosen['accuracy']:.1%} of them right; the rest are 'uncertain'"
        )
    table = Table("class", "precision", "recall", "F1", "support")
    for label, m in summary["per_class"].items():
        table.add_row(
            label,
            f"{m['precision']:.2f}",
            f"{m['recall']:.2f}",
            f"{m['f1']:.2f}",
            str(m["support"]),
        )
    con.print(table)
    speakers = Table("speaker", "accuracy")
    for speaker, acc in summary["per_speaker"].items():
        speakers.add_row(speaker, f"{acc:.1%}")
    con.print(speakers)
