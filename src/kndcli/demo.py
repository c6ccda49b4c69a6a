"""`knd demo`: the whole job on built-in synthetic data, offline, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kndcli.config import KndConfig, load_config

# Small enough for two CPU cores in a few minutes, large enough to learn the prosody cues.
DEMO_OVERRIDES = [
    "data.dataset=synth",
    "data.split.val_speakers=['07']",
    "data.split.test_speakers=['08']",
    "model.channels=32",
    "train.clip_seconds=2.5",
    "train.batch_size=32",
    "train.lr=0.005",
    "train.trainer.max_epochs=30",
    "train.run_name=demo",
]


@dataclass
class DemoResult:
    out: Path
    raw: Path
    prepared: Path
    bundle: Path
    heldout_clip: Path
    prediction: dict
    metrics: dict
    timings: dict[str, float] = field(default_factory=dict)


def demo_config(out: Path, actors: int, extra: list[str] | None = None) -> KndConfig:
    overrides = [
        *DEMO_OVERRIDES,
        f"data.raw={out / 'raw'}",
        f"data.prepared={out / 'prepared'}",
        f"train.output_dir={out / 'models'}",
        f"data.split.val_speakers=['{actors - 1:02d}']",
        f"data.split.test_speakers=['{actors:02d}']",
        *(extra or []),
    ]
    return load_config(overrides=overrides)


def run_demo(
    out: Path,
    *,
    actors: int = 8,
    seed: int = 0,
    overrides: list[str] | None = None,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Synthesize -> prepare -> train -> evaluate -> predict one held-out clip."""
    from kndcli.data.prepare import prepare_dataset
    from kndcli.datasets.synth import synthesize
    from kndcli.inference.predictor import Predictor

    if actors < 3:
        raise ValueError("the demo needs at least 3 actors (train, val and test speakers)")
    cfg = demo_config(out, actors, overrides)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    say(f"1/5 synthesizing {actors * 60} clips from {actors} speakers into {cfg.data.raw}")
    paths = synthesize(Path(cfg.data.raw), actors=actors, seed=seed)
    timings["synth"] = time.perf_counter() - started

    started = time.perf_counter()
    say(f"2/5 preparing {cfg.data.prepared} (speaker-independent splits)")
    prepare_dataset(cfg)
    timings["prepare"] = time.perf_counter() - started

    started = time.perf_counter()
    say(f"3/5 training a {cfg.model.name} for {cfg.train.trainer.max_epochs} epochs on the CPU")
    from kndcli.training.train import train

    result = train(cfg)
    assert result is not None  # single process: always rank 0
    timings["train"] = time.perf_counter() - started

    say("4/5 evaluated on the held-out speaker (training scores the bundle on val and test)")
    metrics = json.loads((result.run_dir / "eval" / "test_metrics.json").read_text())

    started = time.perf_counter()
    heldout = next(
        p for p in paths if p.parent.name == f"Actor_{actors:02d}" and "-05-02-" in p.name
    )
    say(f"5/5 predicting {heldout.name} (an angry clip from the held-out speaker)")
    predictor = Predictor.from_config(result.run_dir)
    prediction = next(iter(predictor.predict_paths([heldout], timeline=True))).to_dict(True)
    timings["predict"] = time.perf_counter() - started
    return DemoResult(
        out=out,
        raw=Path(cfg.data.raw),
        prepared=Path(cfg.data.prepared),
        bundle=result.run_dir,
        heldout_clip=heldout,
        prediction=prediction,
        metrics=metrics,
        timings=timings,
    )
