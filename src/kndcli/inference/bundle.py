"""The model bundle: the one artefact that predict, serve, drift and deploy consume.

A bundle is a directory holding `bundle.json` (self-description and file hashes),
`model.onnx` (frontend included, probabilities out), `weights.safetensors` and
`reference.parquet` (the drift reference). Nothing in it is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kndcli.config import TRIM_METHODS
from kndcli.errors import KndError, UsageError

if TYPE_CHECKING:
    from kndcli.config import ModelConfig, TrainConfig

# Version 2 marks a bundle that a knd of version 1 must refuse rather than misread: one
# trimmed by the VAD (`trim_method`), which such a knd would trim by energy, unlike the
# model learnt. Every other bundle is still written as version 1, which any knd reads.
SCHEMA_VERSIONS = (1, 2)
BUNDLE_JSON = "bundle.json"
ONNX_FILE = "model.onnx"
# The weights of a graph too large for one protobuf (2 GB: Whisper-large's encoder), beside
# model.onnx, which names it; ONNX Runtime reads it from the same directory.
ONNX_DATA_FILE = "model.onnx.data"
WEIGHTS_FILE = "weights.safetensors"
REFERENCE_FILE = "reference.parquet"


class BundleError(KndError):
    """A bundle that is missing, incomplete or tampered with."""


class BundleNotFound(BundleError, UsageError):
    """The path given as a bundle holds none (a usage error: exit 2)."""


@dataclass(frozen=True)
class DataSummary:
    """bundle.json `data`: what the model was fitted on, so evaluation can refuse to call
    a split it learned from held out (`evaluate.check_held_out`) and re-export can find
    real clips for its parity check."""

    dataset: str | None
    prepared: str
    clips: dict[str, int]
    speakers: dict[str, list[str]] | None
    fit_splits: list[str]


@dataclass(frozen=True)
class TrainingSummary:
    """bundle.json `training`: how the run ended, for resumed or distributed runs."""

    epochs: int
    best_checkpoint: str
    resumed_from: str | None
    world_size: int = 1


@dataclass(frozen=True)
class BundleMeta:
    """The self-description a new bundle.json starts from, typed and built in one place.

    Training, the test fixtures and the benchmarks all write bundles; hand-built dicts
    let a key drift between writers while `Bundle` reads it. `to_dict` leaves out what
    is None, and `Bundle` reads a missing key as older bundles meant it: no window or
    hop means the clip length and half a window. Provenance (`created`, `onnx`,
    `versions`, `git_commit`) is stamped by `training.export.write_bundle`, `files` and
    `schema_version` by `write_bundle_json`, and `metrics` and `calibration` are added
    later with `update_bundle`.
    """

    name: str
    labels: list[str]
    sample_rate: int
    clip_seconds: float
    model: ModelConfig
    trim_silence: bool
    trim_method: str = "energy"
    window_seconds: float | None = None
    hop_seconds: float | None = None
    hyperparameters: TrainConfig | None = None
    data: DataSummary | None = None
    training: TrainingSummary | None = None
    # model.name=ssl: the encoder's config, source, revision and licence (models/ssl.py).
    encoder: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The bundle.json fields, in the order bundles have always listed them."""
        fields: dict[str, Any] = {
            "name": self.name,
            "labels": list(self.labels),
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "window_seconds": self.window_seconds,
            "hop_seconds": self.hop_seconds,
            "trim_silence": self.trim_silence,
            "trim_method": self.trim_method,
            "model": asdict(self.model),
            "encoder": self.encoder,
            "hyperparameters": _asdict_or_none(self.hyperparameters),
            "data": _asdict_or_none(self.data),
            "training": _asdict_or_none(self.training),
        }
        return {key: value for key, value in fields.items() if value is not None}


def _asdict_or_none(value: Any) -> dict[str, Any] | None:
    return None if value is None else asdict(value)


@dataclass
class Bundle:
    root: Path
    meta: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    @property
    def clip_seconds(self) -> float:
        return float(self.meta["clip_seconds"])

    @property
    def window_seconds(self) -> float:
        return float(self.meta.get("window_seconds") or self.clip_seconds)

    @property
    def hop_seconds(self) -> float:
        return float(self.meta.get("hop_seconds") or self.window_seconds / 2)

    @property
    def trim_silence(self) -> bool:
        return bool(self.meta.get("trim_silence", False))

    @property
    def trim_method(self) -> str:
        return trim_method_of(self.meta)

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted after training (1.0: uncalibrated)."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def version(self) -> str:
        """Short id of this exact model: the start of the ONNX file's sha256."""
        return f"{self.meta.get('name', self.root.name)}@{self.meta['files'][ONNX_FILE][:12]}"

    def path(self, name: str) -> Path:
        return self.root / name

    def torch_model(self) -> Any:
        """The bundle's torch model, in eval mode, from `weights.safetensors` (no pickle).

        Imports torch: only for the torch backend, export and profiling, never on the
        ONNX predict and serve path.
        """
        from safetensors.torch import load_file

        from kndcli.config import ModelConfig
        from kndcli.models import build_model

        # Bundles written before ensembles existed hold one backbone; those written before
        # `ensemble_mean` existed averaged probabilities.
        hyper = {"ensemble": 1, "ensemble_mean": "probability", **self.meta["model"]}
        model = build_model(
            ModelConfig(**hyper), len(self.labels), self.sample_rate, self.meta.get("encoder")
        )
        model.load_state_dict(load_file(str(self.path(WEIGHTS_FILE))))
        return model.eval()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(root: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read bundle.json and, by default, check every listed file against its sha256."""
    root = Path(root)
    meta_path = root / BUNDLE_JSON
    if not meta_path.is_file():
        hint = "run 'knd train' or pass --model DIR" if root.name == "latest" else "no bundle.json"
        raise BundleNotFound(f"no bundle at {root}: {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: unreadable bundle.json ({exc})") from None
    if meta.get("schema_version") not in SCHEMA_VERSIONS:
        raise BundleError(
            f"{meta_path}: schema_version {meta.get('schema_version')!r} is not one this "
            f"knd reads ({', '.join(map(str, SCHEMA_VERSIONS))}); use the knd version "
            "that wrote the bundle"
        )
    for key in ("labels", "sample_rate", "clip_seconds", "files"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing field '{key}'")
    if trim_method_of(meta) not in TRIM_METHODS:
        raise BundleError(
            f"{meta_path}: trim_method {meta['trim_method']!r} is not "
            f"{' or '.join(TRIM_METHODS)}, the trims this knd knows; use the knd version "
            "that wrote the bundle"
        )
    inside = root.resolve()
    for name in meta["files"]:
        # A bundle may come from someone else: its names must not reach other files
        # (hashed and quoted in errors here, copied by a re-export).
        if not (root / name).resolve().is_relative_to(inside) or name in ("", "."):
            raise BundleError(f"{meta_path}: file {name!r} in 'files' points outside the bundle")
    if verify:
        for name, expected in meta["files"].items():
            path = root / name
            if not path.is_file():
                raise BundleError(f"{root}: file {name} listed in bundle.json is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path}: sha256 {actual[:12]}… does not match bundle.json "
                    f"({expected[:12]}…): the file was changed or corrupted"
                )
    return Bundle(root=root, meta=meta)


def trim_method_of(meta: dict[str, Any]) -> str:
    """`train.trim_method` of the run; bundles written before it existed trimmed by energy."""
    return str(meta.get("trim_method", "energy"))


def schema_version(meta: dict[str, Any]) -> int:
    """The lowest version whose readers handle this bundle (`SCHEMA_VERSIONS`): 2 only for
    a bundle that trims by the VAD, since a version-1 reader would trim it by energy."""
    vad = meta.get("trim_silence", False) and trim_method_of(meta) == "vad"
    return 2 if vad else 1


def write_bundle_json(root: Path, meta: dict[str, Any], files: list[str]) -> Path:
    """Hash `files` into `meta` and write bundle.json atomically."""
    meta = {**meta, "schema_version": schema_version(meta)}
    meta["files"] = {name: sha256_file(root / name) for name in files}
    tmp = root / (BUNDLE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False, default=str))
    os.replace(tmp, root / BUNDLE_JSON)
    return root / BUNDLE_JSON


def resolve_model(location: str | os.PathLike) -> Path:
    """The bundle `inference.model` names; `<dir>/latest` falls back to the newest bundle.

    Only `latest` falls back: a bundle path given by hand that holds no bundle is an
    error, never silently another model.
    """
    path = Path(location)
    if (path / BUNDLE_JSON).is_file() or path.name != "latest":
        return path
    candidates = sorted(
        path.parent.glob(f"*/{BUNDLE_JSON}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if candidates:
        return candidates[0].parent
    raise BundleNotFound(f"no bundle at {path}: run 'knd train' or pass --model DIR")


def mark_latest(bundle_dir: Path) -> None:
    """Point `<parent>/latest` at this bundle (a relative symlink, swapped atomically)."""
    link = bundle_dir.parent / "latest"
    tmp = bundle_dir.parent / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(bundle_dir.name)
    os.replace(tmp, link)


def update_bundle(root: Path, updates: dict[str, Any], add_files: list[str] = ()) -> Path:
    """Merge `updates` into bundle.json and re-hash its files plus `add_files`."""
    meta = json.loads((root / BUNDLE_JSON).read_text())
    files = list(meta.get("files", {})) + [f for f in add_files if f not in meta.get("files", {})]
    meta.update(updates)
    return write_bundle_json(root, meta, files)
