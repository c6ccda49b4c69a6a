"""Pretrained speech encoders as knd backbones: wav2vec2, HuBERT, WavLM, data2vec-audio
and Whisper's encoder, through transformers.

`model.encoder` names a local directory in the `save_pretrained` layout or a Hugging Face
id that is already in the local cache: knd never downloads weights (training jobs and
air-gapped machines must not depend on the Hub), and loads safetensors only (a
`pytorch_model.bin` is a pickle). The encoder's config and feature-extractor settings
travel in bundle.json (`EncoderSpec`), so a bundle rebuilds its torch model from its own
weights without the original directory.

The model is the usual `EmotionModel`: its frontend (`EncoderStates`) turns the waveform
into the stack of the encoder's hidden states, and its backbone is one head (or an
ensemble of heads sharing the encoder) that weighs the layers, pools over time with
attentive statistics and classifies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from kndcli.config import ENCODER_MODES, ModelConfig
from kndcli.datasets.download import member_path
from kndcli.errors import ConfigError, KndError
from kndcli.models.emotion import EmotionModel, Ensemble
from kndcli.models.frontend import PowerSpectrogram, fp32_features
from kndcli.models.pooling import AttentiveStatsPool

FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _no_layerdrop(family: str) -> dict[str, float]:
    """LayerDrop skips whole layers in training, and a skipped layer leaves no hidden
    state: the head weighs a fixed stack, so it is off (Whisper's layers are run by
    `EncoderStates` itself, which never drops one)."""
    return {} if family == "whisper" else {"layerdrop": 0.0}


@dataclass
class EncoderSpec:
    """What rebuilds an encoder without its directory, and where it came from."""

    source: str
    family: str
    config: dict[str, Any]
    sampling_rate: int
    # wav2vec2-style zero-mean, unit-variance input per utterance (feature extractor's
    # do_normalize); Whisper: the log-mel settings instead.
    normalize: bool = False
    n_mels: int = 0
    n_fft: int = 400
    hop_length: int = 160
    revision: str = ""
    license: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- loading


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_encoder(source: str) -> Path:
    """The local directory of `model.encoder`: a path, or an id in the Hugging Face cache."""
    if not source:
        raise ConfigError(
            "key 'model.encoder': model.name=ssl needs an encoder: a directory in the "
            "save_pretrained layout or a Hugging Face model id in the local cache"
        )
    if source.startswith("gs://"):
        return _copy_from_bucket(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"key 'model.encoder': {source} has no config.json: not a save_pretrained directory"
            )
        return path
    if source.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ConfigError(f"key 'model.encoder': {source}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        raise ConfigError(
            f"key 'model.encoder': {source} is not in the local Hugging Face cache, and knd "
            f"never downloads weights. On a connected machine run 'huggingface-cli download "
            f"{source} --local-dir DIR', bring DIR here and pass model.encoder=DIR"
        ) from None


def _copy_from_bucket(source: str) -> Path:
    """A gs:// encoder directory copied to ~/.cache/knd/encoders (how weights reach a
    Vertex AI job without baking them into the image). The copy is reused while the
    bucket's objects are unchanged (names, sizes, generations), and is built beside its
    place and renamed in, so processes starting together never read a half-written file."""
    import shutil

    from kndcli.gcs import gcs_filesystem

    local = Path.home() / ".cache" / "knd" / "encoders" / source.removeprefix("gs://").strip("/")
    fs = gcs_filesystem("a gs:// model.encoder")
    remote = source.rstrip("/")
    try:
        listing = fs.find(remote, detail=True)
    except Exception as exc:  # auth, network, bucket
        raise ConfigError(f"key 'model.encoder': cannot list {source} ({exc})") from None
    files = {name: info for name, info in listing.items() if not name.endswith("/")}
    if not any(name.endswith("/config.json") for name in files):
        raise ConfigError(f"key 'model.encoder': {source} has no config.json")
    stamp = json.dumps(
        sorted(
            (n, i.get("size"), i.get("generation") or i.get("md5Hash")) for n, i in files.items()
        )
    )
    if (local / ".complete").is_file() and (local / ".complete").read_text() == stamp:
        return local
    root = remote.removeprefix("gs://")
    local.parent.mkdir(parents=True, exist_ok=True)
    building = local.parent / f".{local.name}.{uuid.uuid4().hex}"
    for name in files:
        target = building / _inside_folder(name[len(root) :], source)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(name, str(target))
    (building / ".complete").write_text(stamp)
    shutil.rmtree(local, ignore_errors=True)
    try:
        building.replace(local)
    except OSError:  # another process put the same copy in place first
        shutil.rmtree(building, ignore_errors=True)
    return local


def _inside_folder(relative: str, source: str) -> PurePosixPath:
    """An object's path below the encoder prefix, refused if it would land outside the
    local copy: object names are whatever whoever can write to the bucket chose."""
    try:
        path = member_path(relative.lstrip("/"), Path(source))
    except KndError:
        path = None
    if path is None:
        raise ConfigError(
            f"key 'model.encoder': {source} holds an object named {relative!r}, which "
            "points outside the encoder's folder"
        )
    return path


def encoder_spec(source: str, directory: Path) -> EncoderSpec:
    """Read the config, feature-extractor settings, revision and licence of a directory."""
    config = json.loads((directory / "config.json").read_text())
    family = str(config.get("model_type", ""))
    if family not in FAMILIES:
        raise ConfigError(
            f"key 'model.encoder': {source} is a {family or 'unknown'} model; knd takes "
            f"{', '.join(FAMILIES)}"
        )
    prep_file = directory / "preprocessor_config.json"
    prep = json.loads(prep_file.read_text()) if prep_file.is_file() else {}
    spec = EncoderSpec(
        source=source,
        family=family,
        config=config,
        sampling_rate=int(prep.get("sampling_rate", 16000)),
        revision=_revision(directory),
        license=_license(directory),
    )
    if family == "whisper":
        spec.n_mels = int(prep.get("feature_size", config.get("num_mel_bins", 80)))
        spec.n_fft = int(prep.get("n_fft", 400))
        spec.hop_length = int(prep.get("hop_length", 160))
    else:
        # Wav2Vec2FeatureExtractor normalises unless told not to.
        spec.normalize = bool(prep.get("do_normalize", True))
    return spec


def longest_input_s(spec: EncoderSpec) -> float | None:
    """Whisper's positions end at max_source_positions frames (30 s); others have no end."""
    if spec.family != "whisper":
        return None
    positions = int(spec.config.get("max_source_positions", 1500))
    return positions * 2 * spec.hop_length / spec.sampling_rate


def _revision(directory: Path) -> str:
    """The Hub commit of a cached snapshot, else a digest of every weight file: what tells
    one fine-tune of an architecture from another (bundle provenance, the state cache)."""
    if directory.parent.name == "snapshots":
        return directory.name
    files = sorted(directory.glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _weights_digest(str(directory), stamp)


@functools.lru_cache(maxsize=8)
def _weights_digest(directory: str, stamp: tuple) -> str:
    """Hashing a large model's weights takes seconds, and a run reads its encoder's spec
    several times (config check, model, checkpoint): once per unchanged set of files."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stamp:
        digest.update(name.encode())
        with (Path(directory) / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "local-" + digest.hexdigest()[:16]


def _license(directory: Path) -> str:
    """The `license:` of the model card's front matter, as the Hub shows it."""
    card = directory / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown (no model card)"


def load_encoder(directory: Path, spec: EncoderSpec) -> nn.Module:
    """The pretrained encoder's weights, refusing pickles and partial checkpoints."""
    from transformers import AutoModel

    _quiet_transformers()
    if not any((directory / name).is_file() for name in _WEIGHTS):
        pickled = (directory / "pytorch_model.bin").is_file()
        why = "only pytorch_model.bin, a pickle knd does not load" if pickled else "no weights"
        raise ConfigError(
            f"key 'model.encoder': {spec.source} has {why}: it needs model.safetensors "
            "(save it with save_pretrained(..., safe_serialization=True))"
        )
    try:
        model, info = AutoModel.from_pretrained(
            str(directory),
            use_safetensors=True,
            output_loading_info=True,
            **_no_layerdrop(spec.family),
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"key 'model.encoder': {spec.source}: {first}") from None
    encoder = model.encoder if spec.family == "whisper" else model
    prefix = "encoder." if spec.family == "whisper" else ""
    missing = [k for k in info["missing_keys"] if k.startswith(prefix)]
    if missing:
        raise ConfigError(
            f"key 'model.encoder': {spec.source}'s checkpoint lacks {len(missing)} encoder "
            f"weights (e.g. {missing[0]}): it would train from random weights"
        )
    return encoder


def encoder_from_spec(spec: EncoderSpec) -> nn.Module:
    """The encoder's architecture with fresh weights (a bundle then loads its own)."""
    from transformers import AutoConfig, AutoModel

    _quiet_transformers()
    fields = {k: v for k, v in spec.config.items() if k != "model_type"}
    fields |= _no_layerdrop(spec.family)
    config = AutoConfig.for_model(spec.family, **fields)
    model = AutoModel.from_config(config)
    return model.encoder if spec.family == "whisper" else model


# ----------------------------------------------------------------------------- modules


class WhisperLogMel(nn.Module):
    """Whisper's log-mel (WhisperFeatureExtractor's numbers) inside the graph: power STFT,
    Slaney mel filters, log10, a floor 8 below the clip's peak, then (x + 4) / 4."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        filters = mel_filter_bank(
            num_frequency_bins=1 + spec.n_fft // 2,
            num_mel_filters=spec.n_mels,
            min_frequency=0.0,
            max_frequency=spec.sampling_rate / 2,
            sampling_rate=spec.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.spectrogram = PowerSpectrogram(spec.n_fft, spec.n_fft, spec.hop_length)
        self.register_buffer("filters", torch.from_numpy(filters.T).float(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return fp32_features(self._features, waveform)

    def _features(self, waveform: torch.Tensor) -> torch.Tensor:
        power = self.spectrogram(waveform)[..., :-1]
        mel = torch.matmul(self.filters, power).clamp(min=1e-10).log10()
        mel = torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0


class FeatureCache:
    """A frozen encoder's hidden states by waveform content, on disk (float16).

    Training sees the same deterministic inputs every epoch (centre crops and the
    rendered degraded copies), so each is encoded once; the key is the waveform's bytes
    and the encoder's identity, so a changed input or encoder can never hit a stale entry.
    """

    def __init__(self, root: Path, identity: str, max_bytes: int) -> None:
        self.root = root / identity
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.bytes = sum(p.stat().st_size for p in self.root.glob("*.npy"))
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(waveform: torch.Tensor) -> str:
        row = waveform.detach().cpu().float().contiguous().numpy()
        return hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        path = self.root / f"{key}.npy"
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return np.load(path)

    def put(self, key: str, states: np.ndarray) -> None:
        if self.bytes + states.nbytes > self.max_bytes:
            return  # full: encode afresh from here on
        # A name of its own per writer: DDP ranks can encode the same clip in one step.
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp.npy"
        np.save(tmp, states)
        tmp.replace(self.root / f"{key}.npy")
        self.bytes += states.nbytes


class EncoderStates(nn.Module):
    """Waveform (batch, samples) -> hidden states (layers + 1, batch, frames, dim).

    `frozen`: no gradient, always in eval mode (no dropout or masking), and with `cache`
    set (training only), each distinct input is encoded once. `partial`: the
    convolutional feature encoder (Whisper: the convolutions and positions) is frozen.
    `full`: everything trains.
    """

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, mode: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.mode = mode
        self.whisper = WhisperLogMel(spec) if spec.family == "whisper" else None
        self.cache: FeatureCache | None = None
        # Whisper's layers are run here, so its gradient checkpointing is done here too.
        self.checkpointing = False
        # from_pretrained leaves the encoder in eval mode, and Lightning keeps the modes it
        # finds: without this, dropout, SpecAugment masking and HF's checkpointing would
        # never run in partial and full training.
        encoder.train(mode != "frozen")
        if mode == "frozen":
            encoder.requires_grad_(False)
        elif mode == "partial":
            if hasattr(encoder, "freeze_feature_encoder"):
                encoder.freeze_feature_encoder()  # also stops gradients into the input
            for module in self._feature_encoder():
                module.requires_grad_(False)

    def _feature_encoder(self) -> list[nn.Module]:
        if self.whisper is not None:
            return [self.encoder.conv1, self.encoder.conv2, self.encoder.embed_positions]
        return [self.encoder.feature_extractor]

    def transformer_layers(self) -> nn.ModuleList:
        if self.whisper is not None:
            return self.encoder.layers
        return self.encoder.encoder.layers

    def train(self, mode: bool = True) -> EncoderStates:
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()
        return self

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.mode != "frozen":
            return self._encode(waveform)
        if self.cache is None:
            with torch.no_grad():
                return self._frozen_states(waveform)
        return self._cached(waveform)

    def _frozen_states(self, waveform: torch.Tensor) -> torch.Tensor:
        """A frozen encoder runs in fp32 even in mixed-precision training: its states are
        then those the exported fp32 graph computes, and it is faster (autocast re-casts
        weights that need no gradient at every call: 2.2x slower for WavLM-base here)."""
        return fp32_features(self._encode, waveform)

    def _cached(self, waveform: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        assert cache is not None
        keys = [cache.key(row) for row in waveform]
        found = [cache.get(k) for k in keys]
        missing = [i for i, states in enumerate(found) if states is None]
        if missing:
            with torch.no_grad():
                fresh = self._frozen_states(waveform[missing]).cpu().half().numpy()
            for j, i in enumerate(missing):
                found[i] = fresh[:, j]
                cache.put(keys[i], fresh[:, j])
        stacked = np.stack(found, axis=1)  # type: ignore[arg-type]
        return torch.from_numpy(stacked).to(waveform.device).float()

    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.whisper is not None:
            return self._whisper_states(self.whisper(waveform))
        if self.spec.normalize:
            mean = waveform.mean(dim=-1, keepdim=True)
            std = waveform.std(dim=-1, keepdim=True)
            waveform = (waveform - mean) / torch.sqrt(std * std + 1e-7)
        out = self.encoder(waveform, output_hidden_states=True)
        return torch.stack(out.hidden_states)

    def _whisper_states(self, features: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder on any length up to 30 s: its positions cut to the frames
        present (transformers insists on 30 s of padded input, 10x the compute of 3 s)."""
        e = self.encoder
        x = nn.functional.gelu(e.conv1(features))
        x = nn.functional.gelu(e.conv2(x)).permute(0, 2, 1)
        x = x + e.embed_positions.weight[: x.shape[1]]
        states = [x]
        for layer in e.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, None, use_reentrant=False)
            else:
                x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
            states.append(x)
        states[-1] = e.layer_norm(states[-1])
        return torch.stack(states)


class EncoderHead(nn.Module):
    """Hidden states -> logits: a learned softmax weighting of the layers (emotion sits in
    the middle layers of speech encoders, not the last), a projection, attentive
    statistics pooling over time, dropout and a linear classifier."""

    def __init__(self, layers: int, dim: int, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(layers))
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Sequential(nn.Linear(dim, cfg.head_dim), nn.ReLU())
        self.pool = AttentiveStatsPool(cfg.head_dim)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.head_dim, n_classes))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.layer_weights, dim=0)
        x = (weights[:, None, None, None] * states).sum(dim=0)
        x = self.project(self.norm(x)).transpose(1, 2)
        return self.head(self.pool(x))


class EncoderEmotionModel(EmotionModel):
    """`EmotionModel` with an encoder frontend, plus layer-wise learning rates."""

    frontend: EncoderStates
    # Training mixes hidden states, not waveforms (training/module.py).
    mixes_states = True

    def member_logits(
        self, waveform: torch.Tensor, lam: float = 1.0, perm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(members, batch, classes), with mixup of the states when `perm` is given."""
        states = self.frontend(waveform)
        if perm is not None:
            states = lam * states + (1 - lam) * states[:, perm]
        if isinstance(self.backbone, Ensemble):
            return self.backbone.member_logits(states)
        return self.backbone(states).unsqueeze(0)

    def parameter_groups(self, head_lr: float, encoder_lr: float, decay: float) -> list[dict]:
        """Head at `head_lr`; encoder layer i of n at encoder_lr * decay^(n-1-i), and what
        sits below the layers at encoder_lr * decay^n (layer-wise learning-rate decay)."""
        layers = self.frontend.transformer_layers()
        placed: set[int] = set()
        groups: list[dict] = []
        for i, layer in enumerate(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            placed |= {id(p) for p in layer.parameters()}
            if params:
                groups.append({"params": params, "lr": encoder_lr * decay ** (len(layers) - 1 - i)})
        encoder_ids = {id(p) for p in self.frontend.encoder.parameters()}
        rest = [
            p for p in self.frontend.encoder.parameters() if p.requires_grad and id(p) not in placed
        ]
        if rest:
            groups.append({"params": rest, "lr": encoder_lr * decay ** len(layers)})
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        return [{"params": head, "lr": head_lr}, *groups]


def build_encoder_model(
    cfg: ModelConfig, n_classes: int, sample_rate: int, spec: EncoderSpec | None = None
) -> EncoderEmotionModel:
    """The SSL model: pretrained weights from `model.encoder`, or (a bundle rebuilding
    itself) the architecture in `spec` with fresh weights."""
    if cfg.encoder_mode not in ENCODER_MODES:
        raise ConfigError(
            f"key 'model.encoder_mode': {cfg.encoder_mode!r}: choose " + ", ".join(ENCODER_MODES)
        )
    if spec is None:
        directory = resolve_encoder(cfg.encoder)
        spec = encoder_spec(cfg.encoder, directory)
        encoder = load_encoder(directory, spec)
    else:
        encoder = encoder_from_spec(spec)
    if spec.sampling_rate != sample_rate:
        raise ConfigError(
            f"key 'audio.sample_rate': {cfg.encoder} was trained on {spec.sampling_rate} Hz "
            f"audio, the prepared set is {sample_rate} Hz: prepare it with "
            f"--set audio.sample_rate={spec.sampling_rate}"
        )
    if cfg.gradient_checkpointing and spec.family != "whisper":
        enable = getattr(encoder, "activation_checkpointing_enable", None)
        (enable or encoder.gradient_checkpointing_enable)()
    frontend = EncoderStates(encoder, spec, cfg.encoder_mode)
    frontend.checkpointing = cfg.gradient_checkpointing and spec.family == "whisper"
    layers = len(frontend.transformer_layers()) + 1
    dim = int(spec.config.get("d_model") or spec.config["hidden_size"])
    heads = [EncoderHead(layers, dim, cfg, n_classes) for _ in range(cfg.ensemble)]
    backbone = heads[0] if len(heads) == 1 else Ensemble(heads, cfg.ensemble_mean)
    return EncoderEmotionModel(frontend, backbone)
