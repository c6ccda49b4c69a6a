"""The benchmarks: each measures knd and its course-project baseline in the same run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    RAVDESS,
    REPO,
    WORK,
    BenchResult,
    Figure,
    bench_env,
    knd_command,
    run_peak,
    stats,
    timed_run,
)
from bench.encoders import bench_encoders

COURSE = "course project: VGG19 on a 3-channel 128-mel image of 3 s at 48 kHz"


class Context:
    """What the benchmarks share, built lazily: clip lists, the bundle, the course checkpoint."""

    def __init__(
        self, *, quick: bool, reps: int | None, model: Path | None, work: Path = WORK
    ) -> None:
        self.quick = quick
        self.reps = reps or (1 if quick else 3)
        self.model_arg = model
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self._bundle: Path | None = None
        self.bundle_note = ""
        self.train_epoch_s: float | None = None

    # ------------------------------------------------------------------ data
    def all_clips(self) -> list[Path]:
        from kndcli.audio import find_audio_files

        if not RAVDESS.is_dir():
            raise RuntimeError(f"shared RAVDESS data not found at {RAVDESS}")
        return find_audio_files([RAVDESS])

    def clips(self) -> list[Path]:
        """All 960 clips, or actor 01's 60 in quick mode."""
        clips = self.all_clips()
        return clips[:60] if self.quick else clips

    def raw_dir(self) -> Path:
        """A directory holding exactly `clips()` (links), for whole-directory commands."""
        clips = self.clips()
        if not self.quick:
            return RAVDESS
        root = self.work / "raw-quick"
        if not root.is_dir():
            tmp = self.work / "raw-quick.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for clip in clips:
                (tmp / clip.parent.name).mkdir(parents=True, exist_ok=True)
                (tmp / clip.parent.name / clip.name).symlink_to(clip)
            tmp.replace(root)
        return root

    def prepared(self) -> Path:
        """The full shared set, prepared once (reused by later runs)."""
        out = self.work / "prepared"
        if not (out / "prepare.json").is_file():
            from kndcli.config import load_config
            from kndcli.data.prepare import prepare_dataset

            cfg = load_config(
                overrides=["data.dataset=ravdess", f"data.raw={RAVDESS}", f"data.prepared={out}"]
            )
            prepare_dataset(cfg)
        return out

    def speech_clips(self, n: int) -> list[Path]:
        """`n` clips of 3-4 s (the serving load), spread over actors."""
        import soundfile as sf

        picked = []
        clips = self.all_clips()
        for clip in clips[:: max(1, len(clips) // (4 * n))]:
            if 3.0 <= sf.info(str(clip)).duration <= 4.0:
                picked.append(clip)
            if len(picked) == n:
                break
        return picked or clips[:n]

    # ------------------------------------------------------------------ models
    def bundle(self) -> Path:
        """--model, else models/latest, else a bundle trained here (or untrained in quick)."""
        if self._bundle is not None:
            return self._bundle
        from kndcli.inference.bundle import BUNDLE_JSON

        if self.model_arg is not None:
            self._bundle, self.bundle_note = self.model_arg, f"given: {self.model_arg}"
        elif (REPO / "models" / "latest" / BUNDLE_JSON).is_file():
            self._bundle, self.bundle_note = REPO / "models" / "latest", "models/latest"
        elif (self.work / "bundle" / BUNDLE_JSON).is_file():
            self._bundle = self.work / "bundle"
            self.bundle_note = "bench/work/bundle (trained by an earlier bench run)"
        elif self.quick:
            self._bundle = untrained_bundle(self.work / "bundle-untrained")
            self.bundle_note = "untrained default cnn (quick mode: numbers not judged)"
        else:
            self._bundle = self._train_bundle()
        return self._bundle

    def _train_bundle(self, epochs: int = 2) -> Path:
        from kndcli.config import load_config
        from kndcli.training.train import train

        runs = self.work / "runs"
        cfg = load_config(
            overrides=[
                f"data.prepared={self.prepared()}",
                f"train.output_dir={runs}",
                "train.run_name=bench",
                f"train.trainer.max_epochs={epochs}",
                "wandb.enabled=false",
            ]
        )
        shutil.rmtree(runs / "bench", ignore_errors=True)
        result = train(cfg)
        target = self.work / "bundle"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(
            result.bundle_dir,
            target,
            ignore=shutil.ignore_patterns("*.ckpt", "checkpoints", "wandb"),
        )
        self.train_epoch_s = result.seconds / max(1, result.epochs)
        self.bundle_note = f"default config trained here for {epochs} epochs"
        return target

    def course_checkpoint(self) -> Path:
        from bench.course import make_checkpoint

        return make_checkpoint(self.work / "course" / "vgg19.pt")


def untrained_bundle(
    out: Path,
    *,
    model: Any = None,
    name: str = "bench-untrained",
    clips: list[Any] | None = None,
    trim_method: str = "energy",
) -> Path:
    """A complete bundle with random weights (ONNX, safetensors, drift reference): the cost
    of a real one without training. The benchmarks use the default model; the tests a
    narrow one (`model`) whose window is the length of their `clips`."""
    import numpy as np

    from kndcli.audio import Audio, audio_features
    from kndcli.config import LABELS, ModelConfig
    from kndcli.inference.bundle import BUNDLE_JSON, BundleMeta
    from kndcli.models import build_model
    from kndcli.monitoring.reference import build_reference
    from kndcli.training.bundle import encoder_record
    from kndcli.training.export import write_bundle

    if (out / BUNDLE_JSON).is_file():
        return out
    cfg = model or ModelConfig()
    if clips is None:
        rng = np.random.default_rng(0)
        clips = [0.1 * rng.standard_normal(48000).astype(np.float32) for _ in range(4)]
    seconds = len(clips[0]) / 16000
    feats = [audio_features(Audio(c, 16000, 16000, 1, "gen", 0.3, 0.0)) for c in clips]
    reference = build_reference(feats, ["happy"] * 4, feats, ["sad"] * 4, ["sad"] * 4, [0.5] * 4)
    network = build_model(cfg, len(LABELS), 16000)
    meta = BundleMeta(
        name=name,
        labels=list(LABELS),
        sample_rate=16000,
        clip_seconds=seconds,
        window_seconds=seconds,
        hop_seconds=seconds / 2,
        trim_silence=True,
        trim_method=trim_method,
        model=cfg,
        encoder=encoder_record(network),
    )
    return write_bundle(network, out, meta, np.stack(clips[:2]), reference=reference)


def _read_all(paths: list[Path]) -> None:
    """Read every input once so knd and the baseline both start from a warm page cache."""
    for path in paths:
        path.read_bytes()


# ----------------------------------------------------------------------------- prepare
def bench_prepare(ctx: Context) -> BenchResult:
    clips = ctx.clips()
    raw = ctx.raw_dir()
    _read_all(clips)
    knd_s, base_s = [], []
    with tempfile.TemporaryDirectory(prefix="knd-bench-prepare-") as tmp:
        for rep in range(ctx.reps):
            out = Path(tmp) / f"knd{rep}"
            knd_s.append(
                timed_run(
                    [
                        *knd_command(),
                        "data",
                        "prepare",
                        "--dataset",
                        "ravdess",
                        "--raw",
                        str(raw),
                        "--prepared",
                        str(out),
                    ]
                )
            )
            info = json.loads((out / "prepare.json").read_text())
            if info["n_clips"] != len(clips):
                raise RuntimeError(f"knd prepared {info['n_clips']} of {len(clips)} clips")
            shutil.rmtree(out)
            base = Path(tmp) / f"base{rep}"
            base_s.append(
                timed_run(
                    [sys.executable, "-m", "bench.course", "prepare", str(raw), str(base)],
                    env=bench_env(),
                )
            )
            shutil.rmtree(base)
    return BenchResult(
        "prepare",
        [
            Figure(
                f"knd data prepare, {len(clips)} shared files, cold (fresh output dir), wall",
                "s",
                "lower",
                stats(knd_s),
                stats(base_s),
                "one process: soundfile read + soxr resample per file, one array out",
                target=20.0,
            )
        ],
        details={"files": len(clips), "cores": os.cpu_count()},
        notes=[
            "whole process, as a user runs it; fresh output directory each repetition",
            "page cache warm: every input file is read once before timing (no drop_caches "
            "on a shared machine), for knd and the baseline alike",
        ],
    )


# ----------------------------------------------------------------------------- train
def bench_train(ctx: Context) -> BenchResult:

    from bench.course import CLIP_SAMPLES, load_48k, train_steps
    from kndcli.config import load_config
    from kndcli.profiling import profile_train

    steps = 2 if ctx.quick else 8
    cfg = load_config(overrides=[f"data.prepared={ctx.prepared()}"])
    knd = profile_train(cfg, steps=steps, warmup=1, profile_ops=False)
    knd_rates = [s["samples"] / (s["data_s"] + s["compute_s"]) for s in knd["per_step"]]

    base_steps, base_batch = (1, 4) if ctx.quick else (3, 8)
    waves = [load_48k(p) for p in ctx.all_clips()[:: 960 // 32][:32]]
    assert all(len(w) == CLIP_SAMPLES for w in waves)
    train_steps(waves, 1, base_batch)  # warm-up, not counted, as for knd
    base = train_steps(waves, base_steps, base_batch)
    base_rates = [s["samples"] / (s["data_s"] + s["compute_s"]) for s in base]
    n_train = knd["train_clips"]
    knd_epoch = [n_train / r for r in knd_rates]
    base_epoch = [n_train / r for r in base_rates]
    figures = [
        Figure(
            f"training throughput, default config ({cfg.model.name}, batch "
            f"{cfg.train.batch_size}, {cfg.train.clip_seconds:g} s clips)",
            "clips/s",
            "higher",
            stats(knd_rates),
            stats(base_rates),
            f"{COURSE}, batch {base_batch}, Adam",
        ),
        Figure(
            f"training epoch time ({n_train} train clips, from per-step throughput)",
            "s",
            "lower",
            stats(knd_epoch),
            stats(base_epoch),
            "VGG19 at its measured throughput",
        ),
    ]
    details: dict[str, Any] = {
        "knd": {k: v for k, v in knd.items() if k not in ("operators", "per_step")},
        "knd_per_step": knd["per_step"],
        "baseline_per_step": base,
        "baseline_batch": base_batch,
    }
    if ctx.train_epoch_s is not None:
        details["bundle_training_s_per_epoch_incl_validation"] = ctx.train_epoch_s
    return BenchResult(
        "train",
        figures,
        details=details,
        notes=[
            "each measured step is one repetition; one warm-up step first for both",
            "knd: the real LightningModule and train DataModule (augmentation on), "
            "data-loader wait included; baseline: mel image computed per batch",
        ],
    )


# ----------------------------------------------------------------------------- predict
def bench_predict_cold(ctx: Context) -> BenchResult:
    bundle = ctx.bundle()
    clip = ctx.speech_clips(1)[0]
    checkpoint = ctx.course_checkpoint()
    _read_all([clip, checkpoint, *(p for p in Path(bundle).iterdir() if p.is_file())])
    reps = ctx.reps if ctx.quick else max(5, ctx.reps)
    timed_run([*knd_command(), "predict", "--model", str(bundle), str(clip)])  # warm disk
    knd_s = [
        timed_run([*knd_command(), "predict", "--model", str(bundle), str(clip)])
        for _ in range(reps)
    ]
    base_s = [
        timed_run(
            [sys.executable, "-m", "bench.course", "predict", str(checkpoint), str(clip)],
            env=bench_env(),
        )
        for _ in range(ctx.reps)
    ]
    return BenchResult(
        "predict_cold",
        [
            Figure(
                "knd predict one.wav, cold, whole process wall",
                "s",
                "lower",
                stats(knd_s),
                stats(base_s),
                f"{COURSE}: imports torch + torchvision, reads the "
                f"{checkpoint.stat().st_size / 1e6:.0f} MB checkpoint, predicts",
                target=0.6,
            )
        ],
        details={"clip": str(clip), "bundle": ctx.bundle_note},
        notes=["files read once before timing (warm page cache) for both sides"],
    )


def bench_predict_dir(ctx: Context) -> BenchResult:
    bundle = ctx.bundle()
    raw = ctx.raw_dir()
    clips = ctx.clips()
    checkpoint = ctx.course_checkpoint()
    _read_all(clips)
    knd_rates = []
    for _ in range(ctx.reps):
        # --jsonl streams one object per file, as --json did before it became one document.
        seconds = timed_run(
            [*knd_command(), "predict", "--model", str(bundle), "--jsonl", str(raw)]
        )
        knd_rates.append(len(clips) / seconds)
    subset = [str(p) for p in ctx.all_clips()[:: 960 // (2 if ctx.quick else 10)]]
    out = subprocess.run(
        [sys.executable, "-m", "bench.course", "predict-each", str(checkpoint), *subset],
        capture_output=True,
        env=bench_env(),
        cwd=REPO,
        check=True,
        timeout=900,
    )
    per_clip = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return BenchResult(
        "predict_dir",
        [
            Figure(
                f"knd predict on a directory of {len(clips)} RAVDESS clips, whole process",
                "clips/s",
                "higher",
                stats(knd_rates),
                stats([1 / s for s in per_clip]),
                f"{COURSE}, checkpoint reloaded per clip ({len(subset)} clips; each one "
                "is a repetition; imports not counted)",
                target=300.0,
            )
        ],
        details={
            "clips": len(clips),
            "output": "--jsonl to /dev/null",
            "bundle": ctx.bundle_note,
            "baseline_seconds_per_clip": per_clip,
        },
    )


def bench_predict_archive(ctx: Context) -> BenchResult:
    """`knd predict DIR --out` (resumable parts) against the stdout path, same process kind."""
    from kndcli.cpus import usable_cpus

    bundle = ctx.bundle()
    raw = ctx.raw_dir()
    clips = ctx.clips()
    _read_all(clips)
    import soundfile as sf

    audio_s = sum(sf.info(str(c)).duration for c in clips)
    archive_rates, stdout_rates, resume_seconds, process_rates = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="knd-bench-archive-") as tmp:
        for rep in range(ctx.reps):
            out = Path(tmp) / f"run{rep}"
            cmd = [*knd_command(), "predict", "--model", str(bundle), str(raw), "--out", str(out)]
            archive_rates.append(len(clips) / timed_run([*cmd, "--part-size", "100"]))
            # One process per vCPU (one ONNX thread, one decoder each), as a cloud replica.
            split = [*cmd[:-1], str(out) + "-procs", "--part-size", "100", "--processes"]
            process_rates.append(len(clips) / timed_run([*split, str(usable_cpus())]))
            # A rerun of a finished shard: every part is skipped (the resume cost).
            resume_seconds.append(timed_run([*cmd, "--part-size", "100"]))
            seconds = timed_run(
                [*knd_command(), "predict", "--model", str(bundle), "--jsonl", str(raw)]
            )
            stdout_rates.append(len(clips) / seconds)
    stdout_desc = "knd predict --jsonl on the same directory, same run (stdout, no parts)"
    return BenchResult(
        "predict_archive",
        [
            Figure(
                f"knd predict --out (one shard, parts of 100) on {len(clips)} RAVDESS clips",
                "clips/s",
                "higher",
                stats(archive_rates),
                stats(stdout_rates),
                stdout_desc,
            ),
            Figure(
                "rerun of a finished shard (every part skipped), whole process",
                "s",
                "lower",
                stats(resume_seconds),
            ),
            Figure(
                f"knd predict --out --processes {usable_cpus()} (one process per vCPU)",
                "clips/s",
                "higher",
                stats(process_rates),
                stats(archive_rates),
                "one process (all threads), same run",
            ),
            Figure(
                "audio scored per vCPU-second with --processes (the cloud estimate's basis)",
                "s/s",
                "higher",
                stats([r * audio_s / len(clips) / usable_cpus() for r in process_rates]),
            ),
        ],
        details={"clips": len(clips), "audio_s": audio_s, "bundle": ctx.bundle_note},
        notes=["one replica's rate; N replicas of a Vertex job each score their own shard"],
    )


def bench_timeline_long(ctx: Context) -> BenchResult:
    """`knd predict --timeline` on one hour of RAVDESS speech with pauses (issue 17):
    speed as a multiple of real time, and peak memory against a 5 s recording."""
    from bench.recordings import long_recording
    from kndcli.inference.predictor import Predictor

    bundle = ctx.bundle()
    hours = 0.05 if ctx.quick else 1.0
    clips = ctx.all_clips()
    speeds, peaks, short_peaks = [], [], []
    with tempfile.TemporaryDirectory(prefix="knd-bench-timeline-") as tmp:
        long_path, short_path = Path(tmp) / "hour.flac", Path(tmp) / "short.flac"
        truth = long_recording(clips, hours * 3600.0, long_path, seed=0)
        long_recording(clips[:1], 5.0, short_path)
        cmd = [*knd_command(), "predict", "--model", str(bundle), "--timeline", "--jsonl"]
        for _ in range(ctx.reps):
            seconds, peak, out = run_peak([*cmd, str(long_path)])
            speeds.append(hours * 3600.0 / seconds)
            peaks.append(peak)
            short_peaks.append(run_peak([*cmd, str(short_path)])[1])
    timeline = json.loads(out)
    found, agree = 0, 0
    clip_labels = {
        p.source: p.label
        for p in Predictor.from_config(bundle).predict_paths(sorted({u.clip for u in truth}))
    }
    for u in truth:
        spans = [
            (min(s["end"], u.end) - max(s["start"], u.start), s["label"])
            for s in timeline["segments"]
        ]
        spans = [(o, label) for o, label in spans if o > 0]
        found += bool(spans)
        agree += bool(spans) and max(spans)[1] == clip_labels[str(u.clip)]
    return BenchResult(
        "timeline_long",
        [
            Figure(
                f"knd predict --timeline on {hours:g} h of speech with pauses (FLAC, 16 kHz), "
                "whole process",
                "x real time",
                "higher",
                stats(speeds),
            ),
            Figure(
                f"peak memory scoring {hours:g} h",
                "MB",
                "lower",
                stats(peaks),
                stats(short_peaks),
                "the same command on a 5 s recording, same run",
            ),
            Figure(
                "utterances the voice-activity detector found",
                "%",
                "higher",
                stats([100.0 * found / len(truth)]),
            ),
            Figure(
                "utterances whose longest span has the label knd predict gives the clip alone",
                "%",
                "higher",
                stats([100.0 * agree / len(truth)]),
            ),
        ],
        details={
            "utterances": len(truth),
            "speech_s": timeline["speech_s"],
            "segments": len(timeline["segments"]),
            "bundle": ctx.bundle_note,
        },
        notes=[
            "memory is bounded by timeline.max_segment_s (30 s) plus a decode block: "
            "the hour's samples as float32 at 16 kHz would be 230 MB"
        ],
    )


# ----------------------------------------------------------------------------- serve
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, start: float, timeout: float = 120) -> float:
    """Seconds from `start` (just before the process was spawned) to GET /ready == 200."""
    import http.client

    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"/ready not reached within {timeout} s")


@contextmanager
def _knd_serving(bundle: Path, tmp: str) -> Iterator[int]:
    """`knd serve` of `bundle` on a free loopback port (its log under `tmp`), ready; the
    port. Stopped on the way out."""
    port = _free_port()
    cmd = [*knd_command(), "serve", "--model", str(bundle), "--port", str(port)]
    cmd += ["--set", f"serve.log_sink={Path(tmp) / 'log.sqlite'}"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=bench_env(), cwd=REPO
    )
    try:
        _wait_ready(port, proc, start)
        yield port
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_round(
    cmd: Callable[[int], list[str]], bodies: list[tuple[bytes, str]], load: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    from bench.loadgen import run_load

    port = _free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=bench_env(), cwd=REPO
    )
    try:
        ready = _wait_ready(port, proc, start)
        result = run_load(port, bodies, clients=16, **load)
    finally:
        _stop(proc)
    return ready, result


def bench_serve(ctx: Context) -> BenchResult:
    bundle = ctx.bundle()
    checkpoint = ctx.course_checkpoint()
    bodies = [
        (p.read_bytes(), "audio/flac" if p.suffix == ".flac" else "audio/wav")
        for p in ctx.speech_clips(16)
    ]
    duration = 3.0 if ctx.quick else 10.0
    rounds = []
    with tempfile.TemporaryDirectory(prefix="knd-bench-serve-") as tmp:
        for rep in range(ctx.reps):

            def knd_cmd(port: int, rep: int = rep) -> list[str]:
                return [
                    *knd_command(),
                    "serve",
                    "--model",
                    str(bundle),
                    "--port",
                    str(port),
                    "--set",
                    f"serve.log_sink={Path(tmp) / f'log{rep}.sqlite'}",
                ]

            rounds.append(_serve_round(knd_cmd, bodies, {"duration_s": duration}))
        base_ready, base = _serve_round(
            lambda port: [
                sys.executable,
                "-m",
                "bench.course",
                "serve",
                str(checkpoint),
                str(port),
            ],
            bodies,
            {"duration_s": None, "max_requests": 4 if ctx.quick else 16},
        )
    loads = [r for _, r in rounds]
    one = {k: stats([float(r[k]) for r in loads]) for k in ("requests_per_s", "p50_ms", "p99_ms")}
    base_stats = {k: stats([float(base[k])]) for k in ("requests_per_s", "p50_ms", "p99_ms")}
    base_desc = (
        f"{COURSE}: single-threaded HTTP handler reloading the checkpoint per request, "
        f"{base['ok']} requests from 16 clients"
    )
    figures = [
        Figure(
            "knd serve throughput, 16 loopback clients, 3-4 s clips",
            "req/s",
            "higher",
            one["requests_per_s"],
            base_stats["requests_per_s"],
            base_desc,
            target=200.0,
        ),
        Figure(
            "knd serve p50 latency", "ms", "lower", one["p50_ms"], base_stats["p50_ms"], base_desc
        ),
        Figure(
            "knd serve p99 latency",
            "ms",
            "lower",
            one["p99_ms"],
            base_stats["p99_ms"],
            base_desc,
            target=100.0,
        ),
        Figure(
            "knd serve errors under load",
            "errors",
            "lower",
            stats([float(r["errors"]) for r in loads]),
            stats([float(base["errors"])]),
            base_desc,
            target=0.5,
            note="target: zero errors",
        ),
        Figure(
            "knd serve process start to /ready",
            "s",
            "lower",
            stats([r for r, _ in rounds]),
            stats([base_ready]),
            "baseline process start to listening (imports only)",
            target=1.5,
        ),
    ]
    return BenchResult(
        "serve",
        figures,
        details={
            "rounds": loads,
            "baseline": base,
            "duration_s": duration,
            "bundle": ctx.bundle_note,
        },
        notes=[
            "server and load generator share the machine's cores (loopback)",
            "each repetition starts a fresh server, waits for /ready, then loads it",
        ],
    )


# ----------------------------------------------------------------------------- open loop
OPEN_LOOP_LOADS = (0.5, 0.7, 0.9)  # shares of the measured closed-loop capacity
HOSTILE_SHARE = 0.05


def hostile_bodies(good: bytes) -> list[tuple[str, bytes, str]]:
    """The costly and stalling requests of issue 15, as a client would send them."""
    import io

    import numpy as np
    import soundfile as sf

    def encoded(x: np.ndarray, rate: int, fmt: str) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, x, rate, format=fmt)
        return buf.getvalue()

    noise = np.random.default_rng(0).normal(0, 0.1, (65535, 8)).astype(np.float32)
    mp3 = encoded(noise[:80000, 0], 16000, "MP3")
    return [
        ("stalled upload", good, "audio/wav"),
        ("8-channel FLAC at 655 kHz", encoded(noise, 655350, "FLAC"), "audio/flac"),
        ("WAV at 1 Hz", encoded(np.zeros(60, np.float32), 1, "WAV"), "audio/wav"),
        ("MP3 cut mid-frame", mp3[: len(mp3) // 2 + 7], "audio/mpeg"),
    ]


STREAM_COUNTS = (1, 8, 32)


def _stream_latencies(url: str, path: Path, streams: int, seed: int) -> list[float]:
    """Concurrent real-time streams of `path`, started at random offsets within a second;
    per window, ms from the moment its last sample was sent to its event."""
    import random
    import threading

    from kndcli.audio import decode
    from kndcli.serving.stream_client import pcm16_chunks, stream_audio

    samples = decode(path).samples
    chunks = list(pcm16_chunks([samples], 16000, 0.1))
    latencies: list[float] = []
    errors: list[Exception] = []
    lock = threading.Lock()
    rng = random.Random(seed)

    def one(delay: float) -> None:
        time.sleep(delay)
        began: list[float] = []

        def note(event: dict[str, Any]) -> None:
            now = time.perf_counter()
            if event["type"] == "ready":
                began.append(now)
            elif event["type"] == "window" and event["end"] < len(samples) / 16000:
                with lock:
                    latencies.append((now - began[0] - event["end"]) * 1000)

        try:
            stream_audio(url, chunks, sample_rate=16000, speed=1.0, on_event=note)
        except Exception as exc:  # counted: a failed stream must show in the figures
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(rng.uniform(0, 1.0),)) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
    return latencies


def bench_stream(ctx: Context) -> BenchResult:
    """`/stream` latency from the end of a window's audio to its event, at 1, 8 and 32
    concurrent real-time streams (issue 17)."""
    from bench.common import percentile
    from bench.recordings import long_recording
    from kndcli.serving.stream_client import stream_url

    bundle = ctx.bundle()
    seconds = 6.0 if ctx.quick else 20.0
    runs: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="knd-bench-stream-") as tmp:
        path = Path(tmp) / "call.wav"
        long_recording(ctx.all_clips()[::40], seconds, path, seed=5)
        with _knd_serving(bundle, tmp) as port:
            url = stream_url(f"http://127.0.0.1:{port}")
            for count in STREAM_COUNTS:
                runs[count] = _stream_latencies(url, path, count, seed=count)
    figures = []
    for count, values in runs.items():
        for p in (50, 99):
            figures.append(
                Figure(
                    f"/stream p{p} latency, end of a window's audio to its event, "
                    f"{count} concurrent real-time streams",
                    "ms",
                    "lower",
                    stats([percentile(values, p)]),
                    target=100.0 if (count, p) == (8, 99) else None,
                )
            )
    return BenchResult(
        "stream",
        figures,
        details={
            "windows": {str(c): len(v) for c, v in runs.items()},
            "recording_s": seconds,
            "bundle": ctx.bundle_note,
        },
        notes=[
            "each stream sends 100 ms PCM16 messages paced to real time; streams start at "
            "random offsets within one second, as independent callers would"
        ],
    )


def bench_serve_openloop(ctx: Context) -> BenchResult:
    """Latency as a population of clients sees it: Poisson arrivals at shares of capacity,
    clean and with 5 % hostile requests mixed in (issue 15)."""
    from bench.loadgen import run_load, run_open_loop
    from kndcli.config import KndConfig

    keep_alive_s = KndConfig().serve.keep_alive_s  # the server below runs the defaults
    bundle = ctx.bundle()
    good = [
        (p.read_bytes(), "audio/flac" if p.suffix == ".flac" else "audio/wav")
        for p in ctx.speech_clips(16)
    ]
    wav = next((body for body, ctype in good if ctype == "audio/wav"), good[0][0])
    hostile = hostile_bodies(wav)
    duration = 3.0 if ctx.quick else 20.0
    runs: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="knd-bench-openloop-") as tmp,
        _knd_serving(bundle, tmp) as port,
    ):
        capacity = run_load(port, good, clients=16, duration_s=duration / 2)
        rate = capacity["requests_per_s"]
        for share in OPEN_LOOP_LOADS:
            for mix in ("clean", "hostile"):
                runs[f"{mix} {share:.0%}"] = run_open_loop(
                    port,
                    good,
                    rate=share * rate,
                    duration_s=duration,
                    hostile=hostile if mix == "hostile" else [],
                    hostile_share=HOSTILE_SHARE if mix == "hostile" else 0.0,
                    seed=int(share * 100),
                    keep_alive_s=keep_alive_s,
                )

    def one(run: dict[str, Any], key: str) -> dict[str, Any]:
        return stats([float(run[key])] if run[key] is not None else [])

    clean70, hostile70 = runs["clean 70%"], runs["hostile 70%"]
    clean_desc = "the same load without hostile requests, same run"
    figures = [
        Figure(
            "closed-loop capacity, 16 loopback clients (the loads below are shares of it)",
            "req/s",
            "higher",
            stats([capacity["requests_per_s"]]),
        ),
        Figure(
            "open-loop p99 latency at 70 % of capacity, Poisson arrivals",
            "ms",
            "lower",
            one(clean70, "p99_ms"),
            target=100.0,
        ),
        Figure(
            "open-loop p99 latency at 70 % of capacity, 5 % hostile requests (good clips)",
            "ms",
            "lower",
            one(hostile70, "p99_ms"),
            one(clean70, "p99_ms"),
            clean_desc,
            target=150.0,
        ),
        Figure(
            "good clips not answered 200 at 70 % of capacity with the hostile mix",
            "errors",
            "lower",
            stats([float(hostile70["good_errors"])]),
            stats([float(clean70["good_errors"])]),
            clean_desc,
            target=0.5,
            note="target: zero errors",
        ),
    ]
    for name, run in runs.items():
        if name not in ("clean 70%", "hostile 70%"):
            figures.append(
                Figure(
                    f"open-loop p99 latency, {name} of capacity", "ms", "lower", one(run, "p99_ms")
                )
            )
    return BenchResult(
        "serve_openloop",
        figures,
        details={
            "capacity": capacity,
            "runs": runs,
            "duration_s": duration,
            "bundle": ctx.bundle_note,
        },
        notes=[
            "server and load generator share the machine's 2 cores (loopback)",
            "hostile mix: stalled uploads (half a body, then silence), an 8-channel FLAC at "
            "655 kHz, a WAV at 1 Hz, an MP3 cut mid-frame; p99 is over good clips only",
            "one server for every load, default serve settings",
        ],
    )


# ----------------------------------------------------------------------------- drift
def bench_drift(ctx: Context) -> BenchResult:
    records = 500 if ctx.quick else 10_000
    totals, walls, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="knd-bench-drift-") as tmp:
        for rep in range(ctx.reps):
            out = Path(tmp) / f"drift{rep}.json"
            walls.append(
                timed_run(
                    [
                        sys.executable,
                        str(REPO / "bench" / "drift_report.py"),
                        "--records",
                        str(records),
                        "--out",
                        str(out),
                    ],
                    env=bench_env(),
                )
            )
            run = json.loads(out.read_text())
            runs.append(run)
            totals.append(run["total_report_s"])
    no_base = "none: the course project had no drift monitoring"
    return BenchResult(
        "drift",
        [
            Figure(
                f"drift report for {records} logged requests (read + analyse + HTML/JSON)",
                "s",
                "lower",
                stats(totals),
                None,
                no_base,
            ),
            Figure(
                "drift benchmark whole process (features, log write, evidently import, report)",
                "s",
                "lower",
                stats(walls),
                None,
                no_base,
            ),
        ],
        details={"runs": runs},
    )


BENCHMARKS: dict[str, Callable[[Context], BenchResult]] = {
    "prepare": bench_prepare,
    "train": bench_train,
    "predict_cold": bench_predict_cold,
    "predict_dir": bench_predict_dir,
    "predict_archive": bench_predict_archive,
    "serve": bench_serve,
    "serve_openloop": bench_serve_openloop,
    "timeline_long": bench_timeline_long,
    "stream": bench_stream,
    "drift": bench_drift,
    "encoders": bench_encoders,
}
