"""`knd train` and `knd evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli.common import ConfigOpt, JsonOpt, OverridesArg, build_config, console


def train(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a run directory from its last checkpoint.")
    ] = None,
) -> None:
    """Train a model on the prepared set and write a model bundle."""
    from kndcli.training.train import load_run_config
    from kndcli.training.train import train as run_training

    cfg = load_run_config(resume, overrides) if resume else build_config(config, overrides)
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
    con.print(
        f"next:   knd evaluate {result.bundle_dir}  |  knd predict -m {result.bundle_dir} clip.wav"
    )


def evaluate(
    bundle: Annotated[
        Path | None, typer.Argument(help="Bundle directory (default: latest).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Prepared set (default: data.prepared).")
    ] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    backend: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Also score the split under every condition of the robustness: config "
            "section (noise, babble, rooms, telephone, codecs, low-pass, clipping).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Write metrics JSON and PNGs here (default: BUNDLE/eval)."),
    ] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Evaluate a bundle: accuracy, macro-F1, UAR, calibration (ECE), per class and speaker."""
    from kndcli.data.store import PreparedSet
    from kndcli.inference.bundle import resolve_model
    from kndcli.inference.evaluate import evaluate_predictor, save_evaluation
    from kndcli.inference.predictor import Predictor

    cfg = build_config(config, overrides)
    path = resolve_model(bundle, cfg.inference.model)
    predictor = Predictor.from_bundle(
        path, backend=backend, min_confidence=cfg.inference.min_confidence
    )
    prepared = PreparedSet.open(data or cfg.data.prepared)
    out_dir = out or path / "eval"
    if robustness:
        _robustness(predictor, prepared, split, cfg, out_dir, json_out)
        return
    result = evaluate_predictor(predictor, prepared, split)
    written = save_evaluation(result, out_dir)
    if json_out:
        typer.echo(json.dumps(result.summary()))
        return
    print_evaluation(result)
    console().print("wrote " + ", ".join(str(p) for p in written))


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


def print_evaluation(result) -> None:
    """A rich table per class and per speaker, with the headline figures above."""
    from rich.table import Table

    con = console()
    con.print(
        f"[bold]{result.split}[/]: {result.n_clips} clips  accuracy {result.accuracy:.1%}  "
        f"macro-F1 {result.macro_f1:.1%}  UAR {result.uar:.1%}  ECE {result.ece:.1%} "
        f"(temperature {result.temperature:.2f})"
    )
    if result.min_confidence > 0:
        chosen = result.summary()["selective"]
        con.print(
            f"min_confidence {result.min_confidence:.2f}: answers {chosen['coverage']:.0%} of "
            f"clips, {chosen['accuracy']:.1%} of them right; the rest are 'uncertain'"
        )
    table = Table("class", "precision", "recall", "F1", "support")
    for label, m in result.per_class.items():
        table.add_row(
            label,
            f"{m['precision']:.2f}",
            f"{m['recall']:.2f}",
            f"{m['f1']:.2f}",
            str(m["support"]),
        )
    con.print(table)
    speakers = Table("speaker", "accuracy")
    for speaker, acc in result.per_speaker.items():
        speakers.add_row(speaker, f"{acc:.1%}")
    con.print(speakers)
