"""The prepared set on disk: what training reads so it never decodes audio again.

Layout of a prepared directory:
    prepare.json    sample rate, sample dtype, counts, provenance
    manifest.csv    one row per clip: path, label, speaker, gender, split, offset, length...
    waveforms.bin   every clip's mono samples back to back (int16 or float32), memory-mapped
    features.csv    per-clip audio features (`kndcli.audio.audio_features`), the drift reference
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from kndcli.errors import KndError, UsageError

MANIFEST = "manifest.csv"
WAVEFORMS = "waveforms.bin"
FEATURES = "features.csv"
INFO = "prepare.json"
MANIFEST_FIELDS = (
    "id",
    "path",
    "label",
    "speaker",
    "gender",
    "dataset",
    "split",
    "duration",
    "orig_sample_rate",
    "channels",
    "offset",
    "length",
    "size",
    "mtime_ns",
)
DTYPES = {"int16": np.int16, "float32": np.float32}  # keys: config.STORE_DTYPES


@dataclass
class PreparedSet:
    """Read-only view of a prepared directory."""

    root: Path
    info: dict = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)
    source: str = ""  # as opened: the directory, or the gs:// URL `root` is a copy of

    @classmethod
    def open(cls, location: str | Path) -> PreparedSet:
        """A local directory, or a gs:// URL downloaded once to the local cache."""
        root = local_prepared(location)
        info_path = root / INFO
        if not info_path.is_file():
            raise UsageError(
                f"no prepared set at {root}: run 'knd data prepare' or pass --prepared DIR"
            )
        try:
            info = json.loads(info_path.read_text())
            with (root / MANIFEST).open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            _check_consistent(root, info, rows, str(location))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            # A truncated prepare.json, a deleted manifest, a column gone from it.
            raise KndError(
                f"{root}: damaged prepared set ({type(exc).__name__}: {exc}); "
                "run 'knd data prepare' again"
            ) from None
        return cls(root=root, info=info, rows=rows, source=str(location))

    @property
    def sample_rate(self) -> int:
        return int(self.info["sample_rate"])

    @property
    def labels(self) -> list[str]:
        return list(self.info["labels"])

    @cached_property
    def samples(self) -> np.ndarray:
        dtype = DTYPES[self.info["dtype"]]
        path = self.root / WAVEFORMS
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def waveform(self, index: int) -> np.ndarray:
        """Float32 samples of clip `index`, scaled to [-1, 1]."""
        row = self.rows[index]
        start, length = int(row["offset"]), int(row["length"])
        raw = self.samples[start : start + length]
        if raw.dtype == np.int16:
            return raw.astype(np.float32) / 32768.0
        return np.array(raw, dtype=np.float32)

    def indices(self, split: str | None = None) -> list[int]:
        return [i for i, row in enumerate(self.rows) if split is None or row["split"] == split]

    def fitting_on(self, splits: list[str]) -> PreparedSet:
        """A view whose train split also holds the clips of `splits` (a final refit)."""
        rows = [{**row, "split": "train"} if row["split"] in splits else row for row in self.rows]
        info = dict(self.info)
        info["speakers"] = {
            s: sorted({r["speaker"] for r in rows if r["split"] == s})
            for s in ("train", "val", "test")
        }
        info["fit_splits"] = list(splits)
        return PreparedSet(root=self.root, info=info, rows=rows, source=self.source)

    def features(self) -> list[dict[str, float]]:
        """The per-clip audio feature table, in manifest order."""
        with (self.root / FEATURES).open(newline="") as handle:
            return [
                {k: (v if k == "id" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(handle)
            ]


def to_stored(samples: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)
    return samples.astype(np.float32)


def _check_consistent(root: Path, info: dict, rows: list[dict[str, str]], source: str) -> None:
    """Refuse a set whose files come from two different prepares.

    `knd data prepare` replaces its four files one after another, so one stopped between
    two replaces leaves, say, new waveforms under an old manifest: every clip would read
    someone else's samples, silently. The counts in prepare.json, written last, catch it
    (a hand-edited split column, which changes no count, still opens).
    """
    problem = None
    waveforms = root / WAVEFORMS
    itemsize = np.dtype(DTYPES.get(info.get("dtype", ""), np.int16)).itemsize
    held = waveforms.stat().st_size // itemsize if waveforms.is_file() else 0
    if "n_clips" in info and len(rows) != info["n_clips"]:
        problem = f"{MANIFEST} lists {len(rows)} clips, {INFO} says {info['n_clips']}"
    elif "total_samples" in info and held != info["total_samples"]:
        problem = f"{WAVEFORMS} holds {held} samples, {INFO} says {info['total_samples']}"
    elif rows and max(int(r["offset"]) + int(r["length"]) for r in rows) > held:
        problem = f"{MANIFEST} points past the end of {WAVEFORMS}"
    if problem is None:
        return
    if "://" in source:
        where = f"{root}, the copy of {source}"
        why = f"downloaded while the set was being uploaded: delete {root} to download it again"
    else:
        where = f"{root}: the prepared set"
        why = "a 'knd data prepare' was stopped while replacing them: run it again"
    raise KndError(f"{where}: its files disagree ({problem}); probably {why}")


def write_manifest(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in MANIFEST_FIELDS} for row in rows)


def write_features(path: Path, ids: list[str], features: list[dict[str, float]]) -> None:
    names = list(features[0]) if features else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *names])
        for clip_id, feats in zip(ids, features, strict=True):
            writer.writerow([clip_id, *(f"{feats[n]:.6g}" for n in names)])


def local_prepared(location: str | Path, cache: Path | None = None) -> Path:
    """A local directory for a prepared set, downloading it once if it lives at gs://...

    Vertex AI jobs read their data from a bucket; the memory-mapped store needs a file.
    The copy is keyed by the URL and the version of the remote prepare.json, which every
    prepare rewrites, so a set prepared and uploaded again to the same URL is downloaded
    again, not read stale from the cache. (A copy taken mid-upload fails the consistency
    check of `PreparedSet.open`, which says which folder to delete.)
    """
    text = str(location)
    if "://" not in text:
        return Path(text)
    import hashlib

    import fsspec

    fs, _, [root] = fsspec.get_fs_token_paths(text)
    base = cache or Path.home() / ".cache" / "knd" / "prepared"
    try:
        meta = fs.info(f"{root.rstrip('/')}/{INFO}")
    except FileNotFoundError:
        raise UsageError(
            f"no prepared set at {text}: upload one made by 'knd data prepare'"
        ) from None
    except Exception as exc:  # offline, no credentials: the copy already here will do
        copies = _copies_of(base, text)
        if not copies:
            raise KndError(f"cannot read {text} ({type(exc).__name__}: {exc})") from None
        print(f"warning: cannot reach {text}; using the copy at {copies[0]}", file=sys.stderr)
        return copies[0]
    version = next(
        (str(meta[k]) for k in ("generation", "md5Hash", "ETag", "mtime") if meta.get(k)), ""
    )
    key = hashlib.sha256(f"{text}\n{version}\n{meta.get('size')}".encode()).hexdigest()[:16]
    target = base / key
    if (target / INFO).is_file():
        return target
    older = _copies_of(base, text)
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, WAVEFORMS, FEATURES, INFO):
        fs.get_file(f"{root.rstrip('/')}/{name}", str(partial / name))
    (partial / _SOURCE).write_text(text)
    partial.replace(target)
    for copy in older:  # earlier versions of the same URL: one copy per URL is kept
        shutil.rmtree(copy, ignore_errors=True)
    return target


# In each downloaded copy: the URL it is a copy of.
_SOURCE = ".source"


def _copies_of(cache: Path, text: str) -> list[Path]:
    """Complete copies of the prepared set at URL `text` in `cache`, newest first."""
    if not cache.is_dir():
        return []
    found = [
        d
        for d in cache.iterdir()
        if (d / INFO).is_file() and (d / _SOURCE).is_file() and (d / _SOURCE).read_text() == text
    ]
    return sorted(found, key=lambda d: (d / INFO).stat().st_mtime, reverse=True)
