"""The model bundle: the one artefact that predict, serve, drift and deploy consume.

A bundle is a directory holding `bundle.json` (self-description and file hashes),
`model.onnx` (frontend included, probabilities out), `weights.safetensors` and
`reference.parquet` (the drift reference). Nothing in it is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kndcli.errors import KndError

SCHEMA_VERSION = 1
BUNDLE_JSON = "bundle.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
REFERENCE_FILE = "reference.parquet"


class BundleError(KndError):
    """A bundle that is missing, incomplete or tampered with."""


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

        # Bundles written before ensembles existed hold one backbone.
        hyper = {"ensemble": 1, **self.meta["model"]}
        model = build_model(ModelConfig(**hyper), len(self.labels), self.sample_rate)
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
        hint = "run 'knd train' or pass --model" if root.name == "latest" else "not a model bundle"
        raise BundleError(f"no bundle at {root}: {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: unreadable bundle.json ({exc})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{meta_path}: schema_version {meta.get('schema_version')!r} is not "
            f"{SCHEMA_VERSION}; re-export the bundle with this knd version"
        )
    for key in ("labels", "sample_rate", "clip_seconds", "files"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing field '{key}'")
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


def write_bundle_json(root: Path, meta: dict[str, Any], files: list[str]) -> Path:
    """Hash `files` into `meta` and write bundle.json atomically."""
    meta = {**meta, "schema_version": SCHEMA_VERSION}
    meta["files"] = {name: sha256_file(root / name) for name in files}
    tmp = root / (BUNDLE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False, default=str))
    os.replace(tmp, root / BUNDLE_JSON)
    return root / BUNDLE_JSON


def resolve_model(model: str | os.PathLike | None, default: str = "models/latest") -> Path:
    """The bundle to use: the one given, else the configured default, else the newest one."""
    if model:
        return Path(model)
    path = Path(default)
    if (path / BUNDLE_JSON).is_file():
        return path
    parent = path.parent if path.name == "latest" else path
    candidates = sorted(
        parent.glob(f"*/{BUNDLE_JSON}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if candidates:
        return candidates[0].parent
    raise BundleError(f"no bundle at {path}: run 'knd train' or pass --model")


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
