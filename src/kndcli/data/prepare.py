"""`knd data prepare`: catalog -> speaker splits -> decoded mono waveforms + features."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kndcli import __version__
from kndcli.audio import AudioError, audio_features, decode
from kndcli.config import KndConfig, check_data
from kndcli.cpus import usable_cpus
from kndcli.data import store
from kndcli.data.splits import assign_speakers, shared_speakers
from kndcli.errors import ConfigError, KndError


@dataclass
class PrepareResult:
    n_clips: int
    n_reused: int
    seconds: float
    split_counts: dict[str, int]
    failures: list[str] = field(default_factory=list)
    # Splits given speakers whose every clip was bad (split -> those speakers).
    emptied: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Decoded:
    samples: np.ndarray
    features: dict[str, float]
    orig_sample_rate: int
    channels: int


def prepare_dataset(
    cfg: KndConfig, *, strict: bool = False, progress: bool = False
) -> PrepareResult:
    """Build (or refresh) the prepared set described by `cfg.data` and `cfg.audio`.

    Unchanged inputs (same path, size and mtime, same audio settings) are copied from the
    previous prepared set instead of being decoded again. A bad file is recorded and
    skipped unless `strict`.
    """
    from kndcli.datasets import catalog

    if "://" in cfg.data.prepared:
        raise ConfigError(
            f"key 'data.prepared': {cfg.data.prepared!r}: prepare into a local directory, "
            "then copy it (gcloud storage cp -r DIR gs://...); training reads gs:// sets"
        )
    started = time.perf_counter()
    data, audio = cfg.data, cfg.audio
    check_data(data)
    found = catalog(
        data.dataset,
        Path(data.raw),
        include_song=data.include_song,
        speaker_regex=data.speaker_regex,
    )
    if not found.clips:
        raise KndError(f"{data.raw}: no {data.dataset} clips found")
    genders = {clip.speaker: clip.gender for clip in found.clips}
    split_of = assign_speakers(genders, data.split)

    out = Path(data.prepared)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "sample_rate": audio.sample_rate,
        "dtype": data.store_dtype,
        "max_duration_s": audio.max_duration_s,
        # Every other limit a clip was admitted under: a rerun with a tighter one must
        # refuse what it would refuse in a fresh folder, not reuse it.
        "audio_limits": {
            k: v for k, v in asdict(audio).items() if k not in ("sample_rate", "max_duration_s")
        },
    }
    previous = _previous(out, settings)
    stats = [_stat(clip.path) for clip in found.clips]
    todo = [i for i, clip in enumerate(found.clips) if (str(clip.path), *stats[i]) not in previous]
    decoded, failures = _decode_all(
        [found.clips[i].path for i in todo], cfg, strict=strict, progress=progress
    )
    decoded_by_index = dict(zip(todo, decoded, strict=True))

    rows: list[dict] = []
    feature_rows: list[dict[str, float]] = []
    offset = 0
    tmp_wave = out / (store.WAVEFORMS + ".tmp")
    with tmp_wave.open("wb") as wave_out:
        for i, clip in enumerate(found.clips):
            key = (str(clip.path), *stats[i])
            if key in previous:
                samples, feats, orig_sr, channels = previous[key]
            else:
                item = decoded_by_index[i]
                if item is None:
                    continue
                samples, feats = item.samples, item.features
                orig_sr, channels = item.orig_sample_rate, item.channels
            wave_out.write(np.ascontiguousarray(samples).tobytes())
            rows.append(
                {
                    "id": f"{len(rows):06d}",
                    "path": str(clip.path),
                    "label": clip.label,
                    "speaker": clip.speaker,
                    "gender": clip.gender,
                    "dataset": clip.dataset,
                    "split": split_of[clip.speaker],
                    "duration": f"{len(samples) / audio.sample_rate:.4f}",
                    "orig_sample_rate": orig_sr,
                    "channels": channels,
                    "offset": offset,
                    "length": len(samples),
                    "size": stats[i][0],
                    "mtime_ns": stats[i][1],
                }
            )
            feature_rows.append(feats)
            offset += len(samples)
    previous.clear()
    if not rows:
        # Every file failed (a limit set too tight, a stale mount): replacing the set
        # would throw away a good one for nothing.
        tmp_wave.unlink()
        raise KndError(
            f"{data.raw}: none of the {len(found.clips)} clips could be read, so {out} is "
            f"left as it was (the first: {failures[0]})"
        )

    leaks = shared_speakers(rows)
    if leaks and not data.split.allow_shared_speakers:
        raise KndError(f"speakers shared between splits: {leaks}")
    store.write_manifest(out / (store.MANIFEST + ".tmp"), rows)
    store.write_features(out / (store.FEATURES + ".tmp"), [r["id"] for r in rows], feature_rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    info = {
        **settings,
        "labels": list(cfg.labels),
        "dataset": data.dataset,
        "raw": str(data.raw),
        "n_clips": len(rows),
        "total_samples": offset,
        "split_counts": counts,
        "speakers": {s: sorted({r["speaker"] for r in rows if r["split"] == s}) for s in counts},
        "failures": failures,
        "catalog_skipped": found.skipped,
        "knd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / (store.INFO + ".tmp")).write_text(json.dumps(info, indent=2))
    for name in (store.WAVEFORMS, store.MANIFEST, store.FEATURES, store.INFO):
        os.replace(out / (name + ".tmp"), out / name)
    return PrepareResult(
        n_clips=len(rows),
        n_reused=len(found.clips) - len(todo),
        seconds=time.perf_counter() - started,
        split_counts=counts,
        failures=failures + list(found.skipped),
        emptied={
            split: sorted(sp for sp, s in split_of.items() if s == split)
            for split, count in counts.items()
            if count == 0 and split in split_of.values()
        },
    )


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _previous(out: Path, settings: dict) -> dict[tuple, tuple]:
    """Clips of an earlier prepared set that can be reused, keyed by (path, size, mtime)."""
    try:
        old = store.PreparedSet.open(out)
    except (KndError, OSError, ValueError):
        return {}
    if any(old.info.get(k) != v for k, v in settings.items()):
        return {}
    try:
        features = old.features()
    except (OSError, ValueError):
        return {}
    reuse = {}
    for i, row in enumerate(old.rows):
        key = (row["path"], int(row["size"]), int(row["mtime_ns"]))
        start, length = int(row["offset"]), int(row["length"])
        feats = {k: v for k, v in features[i].items() if k != "id"}
        reuse[key] = (
            np.array(old.samples[start : start + length]),
            feats,
            int(row["orig_sample_rate"]),
            int(row["channels"]),
        )
    return reuse


def _decode_all(
    paths: list[Path], cfg: KndConfig, *, strict: bool, progress: bool
) -> tuple[list[_Decoded | None], list[str]]:
    """Decode in parallel; each failure becomes a 'path: reason' line instead of stopping."""
    if not paths:
        return [], []
    args = (cfg.audio, cfg.data.store_dtype)
    workers = cfg.data.workers or usable_cpus()
    results: list[_Decoded | None] = []
    failures: list[str] = []
    bar = _progress(progress)
    with bar:
        task = bar.add_task("decoding", total=len(paths)) if bar else None
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, min(16, len(paths) // (workers * 8) or 1))
            for outcome in pool.map(_decode_one, paths, [args] * len(paths), chunksize=chunk):
                if isinstance(outcome, str):
                    if strict:
                        pool.shutdown(cancel_futures=True)
                        raise KndError(outcome)
                    failures.append(outcome)
                    results.append(None)
                else:
                    results.append(outcome)
                if bar:
                    bar.advance(task)
    return results, failures


def _decode_one(path: Path, args: tuple) -> _Decoded | str:
    limits, dtype = args
    try:
        audio = decode(path, audio=limits)
    except AudioError as exc:
        return str(exc)
    return _Decoded(
        samples=store.to_stored(audio.samples, dtype),
        features=audio_features(audio),
        orig_sample_rate=audio.orig_sample_rate,
        channels=audio.channels,
    )


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self) -> bool:
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
