"""Typed configuration: dataclasses are the schema, YAML files and `key=value` only set values.

`load_config` is the one door from the outside world to the core: it merges, in order,
`configs/default.yaml`-style files, the environment variables of `ENV_KEYS`, `--set
key=value` overrides and the values of the command's own flags (each flag names its key)
onto the schema, then checks every value (`check_config`), so an unknown key, a wrongly
typed or out-of-range value fails at once with the key's name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from kndcli.errors import ConfigError

LABELS: list[str] = [
    "neutral",
    "calm",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgust",
    "surprised",
]


# libsndfile's container names (soundfile's `format`); an `audio.formats` entry is one,
# or FORMAT/SUBTYPE to accept one codec of a container (OGG holds Vorbis or Opus).
SOUNDFILE_FORMATS = (
    "AIFF", "AU", "AVR", "CAF", "FLAC", "HTK", "IRCAM", "MAT4", "MAT5", "MP3", "MPC2K",
    "NIST", "OGG", "PAF", "PVF", "RAW", "RF64", "SD2", "SDS", "SVX", "VOC", "W64", "WAV",
    "WAVEX", "WVE", "XI",
)  # fmt: skip


@dataclass
class AudioConfig:
    """How `audio.decode` reads a clip and what it refuses (docs/serving.md, "Audio limits").

    The bounds are read from the header and refused before any audio is decoded; every
    real recording passes (RAVDESS is 48 kHz mono and stereo, telephone audio 8 kHz).
    """

    sample_rate: int = 16000
    max_duration_s: float = 60.0
    max_file_mb: float = 100.0
    # Below 4 kHz no speech band is left to classify, and upsampling such a file costs
    # more than it holds (a 164-byte 1 Hz WAV became 60 s, +133 MiB); 192 kHz is the
    # highest rate recording interfaces offer.
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000
    # 7.1 surround; the buffer a block of audio needs grows with the channels.
    max_channels: int = 8
    # Decoded samples (frames x channels) per clip, what decoding costs: 60 s of 192 kHz
    # stereo or of 48 kHz 7.1, ~0.6 s of one core to decode and resample (measured).
    max_samples: int = 23_040_000
    formats: list[str] = field(
        default_factory=lambda: ["WAV", "WAVEX", "RF64", "FLAC", "OGG/VORBIS", "OGG/OPUS", "MP3"]
    )


@dataclass
class SplitConfig:
    # Explicit speaker lists win over fractions; speakers are dataset speaker ids ("01", "1001").
    val_speakers: list[str] = field(default_factory=list)
    test_speakers: list[str] = field(default_factory=list)
    val_fraction: float = 0.125
    test_fraction: float = 0.125
    seed: int = 0
    allow_shared_speakers: bool = False


@dataclass
class DataConfig:
    dataset: str = "ravdess"
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    include_song: bool = False
    speaker_regex: str = r"^(?P<speaker>[^_\-]+)"
    store_dtype: str = "int16"
    workers: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    name: str = "cnn"
    n_mels: int = 64
    n_fft: int = 512
    win_ms: float = 32.0
    hop_ms: float = 16.0
    f_min: float = 40.0
    f_max: float = 8000.0
    channels: int = 32
    # "global": one mean and variance per clip (keeps spectral tilt, an arousal cue: +4 to 5
    # points of speaker-independent accuracy on RAVDESS, docs/quality.md);
    # "bin": each mel bin to zero mean, unit variance over the clip (removes channel colour).
    normalize: str = "global"
    # How mel energies are compressed: "log", or "pcen" (per-channel energy normalisation,
    # Wang et al. 2017: each band divided by its own smoothed recent energy, then root
    # compressed; alpha, delta and r learnt per band). PCEN suppresses stationary noise and
    # channel gain, but also the level and spectral tilt that carry arousal: 11 points
    # lower on clean RAVDESS speech in speaker CV (one fold, docs/quality.md).
    compression: str = "log"
    dropout: float = 0.3
    freq_masks: int = 2
    freq_mask_width: int = 8
    time_masks: int = 2
    time_mask_width: int = 12
    # Vocal tract length perturbation in training: spectra stretched by up to 1 ± vtlp.
    vtlp: float = 0.0
    # Independently initialised copies of the backbone on one shared frontend, each trained
    # on its own loss; the bundle outputs their mean probability (one ONNX graph). Two
    # members: +1.6 points of speaker-independent accuracy on clean audio (two seeds,
    # docs/quality.md) for about 1.7x the compute per step; with the degraded copies
    # rendered once (train.augment.conditions.variants) two fit 15 minutes on 2 cores.
    ensemble: int = 2
    # How the members' outputs are combined: "log" (the normalised geometric mean of their
    # probabilities, i.e. their mean log-probability), or "probability" (the arithmetic
    # mean; bundles written before this key). With "log", a temperature applied to the
    # ensemble equals the same temperature applied to every member, so the temperature
    # fitted on each member's own left-out speakers fits the output it is applied to
    # (clean ECE 5.9 -> 5.3 % in speaker CV on the same weights, docs/quality.md).
    ensemble_mean: str = "log"
    # model.name=ssl: a pretrained speech encoder (wav2vec2, HuBERT, WavLM, data2vec-audio,
    # Whisper's encoder) from a save_pretrained directory or a Hugging Face id already in
    # the local cache (nothing is downloaded). frozen: the encoder's hidden states are
    # computed once per distinct input and cached under train.output_dir/.cache (up to
    # feature_cache_gb), and only the head trains; partial: the convolutional feature
    # encoder stays frozen; full: everything trains, encoder layers at encoder_lr decayed
    # by layer_decay per layer downwards. The ensemble is of heads on one encoder.
    encoder: str = ""
    encoder_mode: str = "frozen"
    encoder_lr: float = 5e-5
    layer_decay: float = 0.9
    head_dim: int = 256
    gradient_checkpointing: bool = False
    feature_cache_gb: float = 20.0


@dataclass
class ConditionsConfig:
    """Multi-condition training: what real recordings do to speech, drawn per clip.

    Each degradation is applied to a clip with its probability, independently of the
    others, in the order a recording meets them (room, noise, channel, clipping, codec),
    with its parameters drawn uniformly from the [low, high] ranges. The two channels
    exclude each other: the low-pass is drawn only for clips that did not go through the
    telephone, which is band-limited already, so its share of all clips is
    (1 - telephone_prob) x lowpass_prob. `enabled: false` trains on clean audio only.
    """

    enabled: bool = True
    noise_prob: float = 0.5
    noise_types: list[str] = field(default_factory=lambda: ["white", "pink", "brown", "babble"])
    snr_db: list[float] = field(default_factory=lambda: [0.0, 30.0])
    # SNR curriculum: the lowest SNR training may draw falls linearly from the top of
    # snr_db to its bottom over this fraction of train.trainer.max_epochs (0: the whole
    # range from the first epoch). 0.4, chosen before measuring: clean accuracy 66.8 ->
    # 69.1 % in speaker CV, higher under 22 of 27 conditions (docs/quality.md).
    snr_curriculum: float = 0.4
    babble_talkers: list[int] = field(default_factory=lambda: [3, 8])
    reverb_prob: float = 0.3
    rt60_s: list[float] = field(default_factory=lambda: [0.2, 1.2])
    rooms: int = 24
    telephone_prob: float = 0.1
    telephone_laws: list[str] = field(default_factory=lambda: ["mulaw", "alaw", "gsm"])
    codec_prob: float = 0.03
    # The codecs a coded clip is drawn from (mp3, opus), each at a bitrate from its range.
    codecs: list[str] = field(default_factory=lambda: ["mp3"])
    mp3_kbps: list[float] = field(default_factory=lambda: [16.0, 64.0])
    opus_kbps: list[float] = field(default_factory=lambda: [8.0, 32.0])
    lowpass_prob: float = 0.1
    lowpass_hz: list[float] = field(default_factory=lambda: [2000.0, 6000.0])
    clipping_prob: float = 0.05
    clipping_drive_db: list[float] = field(default_factory=lambda: [3.0, 20.0])
    # Degraded copies of each training clip, rendered once before the first epoch; every
    # epoch draws one of them (then speed, crop and gain vary as before). 0 degrades every
    # clip afresh in every epoch: about 2 ms of CPU per clip, a third of a training step
    # on a 2-core CPU, and the reason the two-member ensemble did not fit 15 minutes.
    variants: int = 8


@dataclass
class AugmentConfig:
    gain_db: float = 6.0
    speeds: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    mixup_alpha: float = 0.2
    # False: the centre of each clip, as evaluation takes it. With speeds [1.0] and
    # gain_db 0 every training input then repeats each epoch (one per rendered copy), so a
    # frozen encoder's states are computed once (model.encoder_mode=frozen).
    random_crop: bool = True
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)


# Lightning's names; "auto" picks bf16-mixed where the CPU or GPU has bf16 (training/train.py).
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
BACKENDS = ("onnx", "torch")
TRIM_METHODS = ("energy", "vad")


@dataclass
class TrainerConfig:
    max_epochs: int = 120
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    log_every_n_steps: int = 10
    deterministic: bool = True
    max_time_minutes: float = 0.0


@dataclass
class TrainConfig:
    run_name: str = ""
    output_dir: str = "models"
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 0
    clip_seconds: float = 3.0
    trim_silence: bool = True
    # How the silence is found: "energy" keeps what lies within 40 dB of the loudest frame
    # (which keeps the silence of a noisy clip: noise fills it); "vad" keeps the span of
    # WebRTC VAD's speech segments. Written to the bundle, so the Predictor trims alike.
    trim_method: str = "energy"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    scheduler: str = "onecycle"
    early_stopping_patience: int = 0
    monitor: str = "val/uar"
    # Weight of a gradient-reversed speaker classifier on the pooled embedding: the
    # backbone is pushed towards features that do not tell the training speakers apart.
    speaker_adversarial: float = 0.0
    # Export the mean of the weights over this last fraction of the epochs (BatchNorm
    # re-estimated) instead of the best checkpoint on validation; 0 turns it off.
    average_last: float = 0.5
    # Splits of the prepared set whose clips train the model. ["train", "test"] refits on
    # the test speakers too, for the model you ship once cross-validation has measured the
    # recipe; such a bundle reports no test figures and `knd evaluate` refuses its test split.
    fit_splits: list[str] = field(default_factory=lambda: ["train"])
    # Fit a temperature on the validation speakers after training (clean clips and one
    # degraded copy of each), stored in the bundle and applied by every Predictor.
    calibrate: bool = True
    # Cross-fitted calibration: each ensemble member leaves this many training speakers
    # out of its loss (a different set per member), and the temperature is fitted on
    # every member's own left-out speakers. Calibration then needs no validation split,
    # and with two or more members every training speaker is learnt by some member (+3.3
    # points in speaker cross-validation, docs/quality.md). 0, or a train split with fewer
    # than members x this + 2 speakers: fit on the val split instead. A single model
    # (model.ensemble=1) fits on the val split when there is one, and otherwise leaves
    # these speakers unlearnt, with a warning naming them. Members that share trainable
    # parameters (an SSL encoder in partial or full mode, or model.compression=pcen) each
    # still hear their left-out speakers' labels through the others' losses.
    cross_fit_speakers: int = 2
    # Where else the bundle goes (a gs:// URL) and where checkpoints live; Vertex AI sets
    # them through AIP_MODEL_DIR and AIP_CHECKPOINT_DIR (ENV_KEYS). Empty: the run directory.
    model_dir: str = ""
    checkpoint_dir: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"
    project: str = "knd"
    entity: str = ""


@dataclass
class InferenceConfig:
    model: str = "models/latest"
    backend: str = "onnx"
    batch_size: int = 32
    workers: int = 0
    window_s: float = 0.0
    hop_s: float = 0.0
    # Below this calibrated confidence, predict, serve and the timeline answer "uncertain"
    # instead of a label (0 always answers a label).
    min_confidence: float = 0.0


@dataclass
class TimelineConfig:
    """`knd predict --timeline`: long recordings scored by speech segments (README.md,
    "Long recordings").

    The file is decoded block by block, so memory stays bounded whatever its length;
    these limits replace `audio.max_duration_s` and `audio.max_file_mb` on this path only.
    """

    max_duration_s: float = 14400.0  # 4 hours
    max_file_mb: float = 4000.0
    # WebRTC VAD aggressiveness: 0 keeps the most audio as speech, 3 the least.
    vad_mode: int = 2
    # Pauses shorter than min_silence_s stay inside a segment; speech shorter than
    # min_speech_s is dropped; each segment is widened by pad_s on both sides.
    min_silence_s: float = 0.5
    min_speech_s: float = 0.3
    pad_s: float = 0.2
    # Speech without a pause is cut into segments of at most this length (bounded memory).
    max_segment_s: float = 30.0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_mb: float = 25.0
    max_duration_s: float = 60.0
    max_batch_files: int = 16
    # Per forward pass. On a CPU a batch costs its clips' time, so large batches only make
    # their clips wait for each other: 4 kept p99 at 90 ms where 16 gave 140 (measured).
    max_batch_size: int = 4
    max_wait_ms: float = 5.0
    # Processes that decode and score ("auto": one per core; 0: inside the server process).
    scoring_processes: Any = "auto"
    # Deadline for one batch in a scoring process: one that misses it is killed and replaced,
    # and its clips are answered 503 with Retry-After. A worst-case batch (4 clips of 60 s
    # at 48 kHz) takes 1-2 s on one core (measured): 15 s leaves room for a loaded machine.
    scoring_timeout_s: float = 15.0
    log_sink: str = "predictions.sqlite"
    log_flush_s: float = 10.0
    # A request is answered only once its log record is durable. SQLite: the whole write
    # (waiting for other writers included) has log_timeout_s, then 503. gs://: records are
    # fsynced to a local spool directory (log_spool; '' is one per sink under the system's
    # temporary directory), uploaded every log_flush_s, at shutdown and by the next start
    # after a crash; a spool holding log_spool_mb (a bucket down for long) answers 503.
    log_timeout_s: float = 5.0
    log_spool: str = ""
    log_spool_mb: float = 64.0
    monitoring_interval_s: float = 600.0
    # Off loopback, the service refuses to start without KND_API_TOKEN unless this is set
    # (--insecure-no-token): on Cloud Run, a private service is guarded by IAM instead.
    allow_no_token: bool = False
    # /metrics shows label counts and the model version: behind the token when true.
    metrics_need_token: bool = False
    # Slow and idle clients. A connection must deliver a complete request head within
    # head_timeout_s of opening or of its previous response (else it is closed); a body may
    # pause at most body_timeout_s between chunks and, after that long, must average at
    # least body_min_rate_kb_s (408); all uploads in flight together may
    # hold at most max_buffered_mb (503 with Retry-After beyond it); at most
    # max_connections connections are served at once (uvicorn answers 503 beyond it);
    # an idle keep-alive connection is closed after keep_alive_s.
    head_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_min_rate_kb_s: float = 16.0
    max_buffered_mb: float = 200.0
    max_connections: int = 512
    keep_alive_s: float = 5.0
    # Live streams (WebSocket /stream): at most max_streams at once (close 1013 beyond);
    # a session carries at most stream_max_s of audio and stays open at most
    # stream_max_s + stream_idle_s of wall time (4413), and is closed after
    # stream_idle_s without audio (4408; empty messages do not count); one message holds at most
    # stream_max_message_kb (1009), and the server reads a stream's messages only as fast
    # as it scores them, so a fast sender waits instead of filling the server's memory.
    # Once its body is read, a request waits at most request_timeout_s for its scores
    # (504 after; the body's own time is bounded by the body limits above); `knd cloud
    # deploy` sets it just under Cloud Run's request timeout. SIGTERM: in-flight requests
    # get shutdown_timeout_s to finish (deploy: 5 s, as Cloud Run kills 10 s after
    # SIGTERM and the log upload comes after it).
    request_timeout_s: float = 60.0
    shutdown_timeout_s: float = 20.0
    max_streams: int = 32
    stream_max_s: float = 3600.0
    stream_idle_s: float = 10.0
    stream_max_message_kb: int = 256


@dataclass
class DriftConfig:
    min_samples: int = 30
    p_value: float = 0.05
    max_drifted_share: float = 0.3
    # A column drifts when its test is significant AND its 0..1 statistic (KS, or total
    # variation for categories) reaches min_effect; one column at severe_effect is drift alone.
    min_effect: float = 0.25
    severe_effect: float = 0.9


@dataclass
class RobustnessConfig:
    """The conditions `knd evaluate --robustness` scores; each list holds one's levels.

    An empty list leaves that condition out. The babble comes from clips of speakers the
    evaluated split does not contain (the prepared set's other splits).
    """

    seed: int = 0
    white_snr_db: list[float] = field(default_factory=lambda: [30.0, 20.0, 10.0, 5.0, 0.0])
    pink_snr_db: list[float] = field(default_factory=lambda: [20.0, 10.0, 0.0])
    brown_snr_db: list[float] = field(default_factory=lambda: [10.0])
    babble_snr_db: list[float] = field(default_factory=lambda: [20.0, 10.0, 5.0])
    rt60_s: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9, 1.5])
    rooms_per_level: int = 6
    telephone: list[str] = field(default_factory=lambda: ["mulaw", "alaw", "gsm"])
    mp3_kbps: list[float] = field(default_factory=lambda: [64.0, 32.0, 16.0])
    opus_kbps: list[float] = field(default_factory=lambda: [12.0])
    lowpass_hz: list[float] = field(default_factory=lambda: [4000.0, 2000.0])
    clipping_drive_db: list[float] = field(default_factory=lambda: [12.0])


@dataclass
class CloudConfig:
    project: str = ""
    region: str = "us-central1"
    train_image: str = ""
    serve_image: str = ""
    machine: str = "n1-highcpu-32"
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 1
    spot: bool = False
    timeout: str = "24h"
    service_account: str = ""
    # Where a training job's model and checkpoints go: each `knd cloud submit` writes to
    # base_output_dir/<run>-<timestamp> (AIP_MODEL_DIR = .../model, AIP_CHECKPOINT_DIR =
    # .../checkpoints); empty: gs://<bucket>/runs. One of the two is required: without a
    # base output directory Vertex AI gives the job nowhere durable to write.
    base_output_dir: str = ""
    bucket: str = ""
    service: str = "knd"
    cpu: str = "2"
    memory: str = "2Gi"
    min_instances: int = 0
    max_instances: int = 10
    concurrency: int = 32
    request_timeout_s: int = 60


@dataclass
class KndConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    timeline: TimelineConfig = field(default_factory=TimelineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    labels: list[str] = field(default_factory=lambda: list(LABELS))


# The environment variables that set config keys: the one place knd reads configuration
# from the environment. They apply after config files and before the command line.
ENV_KEYS: dict[str, str] = {
    "KND_PROJECT": "cloud.project",
    "KND_REGION": "cloud.region",
    "KND_RUN_NAME": "train.run_name",  # set by `knd train` for the DDP processes it starts
    "PORT": "serve.port",  # Cloud Run
    "KND_ALLOW_NO_TOKEN": "serve.allow_no_token",  # set by `knd cloud deploy` (IAM guards)
    "KND_REQUEST_TIMEOUT_S": "serve.request_timeout_s",  # set by `knd cloud deploy`
    "KND_SHUTDOWN_TIMEOUT_S": "serve.shutdown_timeout_s",  # set by `knd cloud deploy`
    "KND_MIN_CONFIDENCE": "inference.min_confidence",  # set by `knd cloud deploy`
    "AIP_MODEL_DIR": "train.model_dir",  # Vertex AI, with a base output directory
    "AIP_CHECKPOINT_DIR": "train.checkpoint_dir",
}


def load_config(
    files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> KndConfig:
    """Merge files (later wins), `ENV_KEYS`, `key=value` overrides and flag `values`.

    `values` maps dotted keys to already-typed values (a command's flags). Without files
    or overrides there is nothing to parse, so the schema is filled directly and omegaconf
    (80 ms to import) stays off `knd predict`'s path, environment or not.
    """
    env = _env_values(os.environ if environ is None else environ)
    values = {k: _plain(v) for k, v in (values or {}).items() if v is not None}
    if not files and not overrides:
        cfg = KndConfig()
        for name, text in env.items():
            _assign(cfg, ENV_KEYS[name], _from_text(cfg, ENV_KEYS[name], name, text))
        for key, value in values.items():
            _assign(cfg, key, value)
    else:
        cfg = _merged(files or [], env, overrides or [], values)
    check_config(cfg)
    return cfg


def _merged(
    files: list[str | Path], env: dict[str, str], overrides: list[str], values: dict[str, Any]
) -> KndConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf.register_resolver("oc.env", _env_but_no_secret, replace=True)
    merged = OmegaConf.structured(KndConfig)
    for file in files:
        merged = _merge(merged, _read_yaml(Path(file)), source=str(file))
    for name, text in env.items():
        merged = _merge(merged, _nested({ENV_KEYS[name]: text}), source=f"environment {name}")
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"--set {bad[0]!r} is not of the form key=value")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"--set: {_describe(exc)}") from None
        merged = _merge(merged, dotlist, source="--set")
    if values:
        merged = _merge(merged, _nested(values), source="command line")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None


# Environment variables a config may not copy: a value resolved into a config is printed
# by `knd config show` and --print-config, and lands in run names, W&B and bundles.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY", re.I)


def _env_but_no_secret(name: str, *default: Any) -> Any:
    """OmegaConf's `${oc.env:NAME[,default]}`, refusing names that hold secrets: a config
    file from someone else could otherwise copy KND_API_TOKEN into a run name."""
    from omegaconf.resolvers.oc import env

    if _SECRET_NAME.search(name):
        raise ValueError(
            f"${{oc.env:{name}}}: a config may not copy {name}, which looks like a secret "
            "(configs are printed and stored with runs); knd reads its secrets itself"
        )
    return env(name, *default)


def _env_values(environ: Any) -> dict[str, str]:
    return {name: environ[name] for name in ENV_KEYS if environ.get(name)}


def _plain(value: Any) -> Any:
    """Flag values as the schema holds them: paths as strings."""
    return str(value) if isinstance(value, Path) else value


def _nested(values: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    tree: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return OmegaConf.create(tree)


def _from_text(cfg: KndConfig, key: str, name: str, text: str) -> Any:
    """An environment variable's text as the type of the key it sets (str, int, float or
    bool: the kinds ENV_KEYS holds), without omegaconf."""
    current: Any = cfg
    for part in key.split("."):
        current = getattr(current, part)
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"environment {name}: key '{key}': {text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, int | float):
        try:
            return type(current)(text)
        except ValueError:
            raise ConfigError(
                f"environment {name}: key '{key}': {text!r} is not a number"
            ) from None
    return text


def _assign(cfg: KndConfig, key: str, value: Any) -> None:
    """Set one dotted key on the schema (flags are typed by the CLI; the key must exist)."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part)
    if not is_dataclass(node) or leaf not in {f.name for f in fields(node)}:
        raise ConfigError(f"unknown key '{key}'")
    setattr(node, leaf, value)


def to_yaml(cfg: KndConfig) -> str:
    """The resolved configuration as YAML, as `knd config show` prints it."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- checks
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Mi|Gi)$")
# Cloud Run: whole CPUs allowed and the most memory each may have (GiB).
_RUN_CPU_MAX_GIB = {1.0: 4, 2.0: 8, 4.0: 16, 6.0: 24, 8.0: 32}
_RUN_CPU_MIN_GIB = {4.0: 2, 6.0: 4, 8.0: 4}


def parse_duration(text: str, key: str = "cloud.timeout") -> int:
    """Seconds in '90s', '30m', '24h', '2d' or a bare number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"key '{key}': {text!r} is not a duration like 3600, 90m, 24h or 2d")
    seconds = int(
        float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    )
    if seconds <= 0:
        raise ConfigError(f"key '{key}': {text!r} must be positive")
    return seconds


def memory_gib(text: str, key: str = "cloud.memory") -> float:
    """Cloud Run memory ('512Mi', '2Gi') in GiB."""
    match = _MEMORY.match(str(text))
    if not match:
        hint = " (Cloud Run counts in Mi or Gi: 2Gi, not 2GB)" if "B" in str(text) else ""
        raise ConfigError(f"key '{key}': {text!r} is not a memory size like 512Mi or 2Gi{hint}")
    amount = float(match.group(1))
    return amount / 1024 if match.group(2) == "Mi" else amount


def check_min_confidence(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"key 'inference.min_confidence': a confidence in [0, 1), got {value}")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"key '{key}': {value!r} is not valid ({what})")


def _check_trainer(t: TrainerConfig) -> None:
    _require(
        str(t.precision) in PRECISIONS,
        "train.trainer.precision",
        t.precision,
        "choose one of " + ", ".join(PRECISIONS),
    )
    _require(
        t.accelerator in ACCELERATORS,
        "train.trainer.accelerator",
        t.accelerator,
        "choose one of " + ", ".join(ACCELERATORS),
    )
    _require(t.max_epochs >= 1, "train.trainer.max_epochs", t.max_epochs, "at least 1")
    _require(t.num_nodes >= 1, "train.trainer.num_nodes", t.num_nodes, "at least 1")
    for name in ("limit_train_batches", "limit_val_batches"):
        value = getattr(t, name)
        _require(value > 0, f"train.trainer.{name}", value, "a fraction in (0, 1] or a count")
    _require(
        t.max_time_minutes >= 0,
        "train.trainer.max_time_minutes",
        t.max_time_minutes,
        "0 for no limit, or minutes",
    )


def check_audio(a: AudioConfig) -> None:
    """The `audio:` values: the limits `audio.decode` applies in prepare, predict and serve."""
    checks = {
        "max_duration_s": (a.max_duration_s > 0, "positive"),
        "max_file_mb": (a.max_file_mb > 0, "positive"),
        "min_sample_rate": (a.min_sample_rate >= 1, "at least 1 Hz"),
        "max_sample_rate": (
            a.max_sample_rate >= a.min_sample_rate,
            "at least audio.min_sample_rate",
        ),
        "max_channels": (1 <= a.max_channels <= 1024, "1 to 1024, libsndfile's most"),
        "max_samples": (a.max_samples >= a.max_channels, "at least audio.max_channels"),
        "formats": (len(a.formats) > 0, "at least one format"),
        "sample_rate": (
            a.min_sample_rate <= a.sample_rate <= a.max_sample_rate,
            "within audio.min_sample_rate and audio.max_sample_rate",
        ),
    }
    for name, (ok, what) in checks.items():
        _require(ok, f"audio.{name}", getattr(a, name), what)
    for entry in a.formats:
        fmt, slash, subtype = str(entry).partition("/")
        _require(
            fmt in SOUNDFILE_FORMATS
            and (not slash or re.fullmatch(r"[A-Z0-9_]+", subtype) is not None),
            "audio.formats",
            entry,
            "FORMAT or FORMAT/SUBTYPE, FORMAT one of " + ", ".join(SOUNDFILE_FORMATS),
        )


STORE_DTYPES = ("int16", "float32")  # how a prepared set stores samples (data/store.py)


def check_data(d: DataConfig) -> None:
    """The `data:` values that need no dataset to judge; prepare calls it again for
    DataConfigs built in code."""
    _require(d.store_dtype in STORE_DTYPES, "data.store_dtype", d.store_dtype, "int16 or float32")
    split = d.split
    if split.val_speakers or split.test_speakers:
        return  # the speaker lists decide; the fractions are not used
    for name in ("val_fraction", "test_fraction"):
        value = getattr(split, name)
        _require(0.0 <= value < 1.0, f"data.split.{name}", value, "a fraction in [0, 1)")
    _require(
        split.val_fraction + split.test_fraction < 1.0,
        "data.split.test_fraction",
        split.test_fraction,
        f"with val_fraction {split.val_fraction:g}, below 1 so speakers are left to train on",
    )


def check_drift(d: DriftConfig) -> None:
    """The `drift:` thresholds, checked before any audio is scored or log read."""
    for name in ("p_value", "min_effect", "severe_effect", "max_drifted_share"):
        _require(0.0 <= getattr(d, name) <= 1.0, f"drift.{name}", getattr(d, name), "0 to 1")
    _require(d.min_samples >= 1, "drift.min_samples", d.min_samples, "at least 1")


def check_timeline(t: TimelineConfig) -> None:
    """The `timeline:` values of `knd predict --timeline`."""
    checks = {
        "max_duration_s": (t.max_duration_s > 0, "positive seconds"),
        "max_file_mb": (t.max_file_mb > 0, "positive"),
        "vad_mode": (t.vad_mode in (0, 1, 2, 3), "0, 1, 2 or 3"),
        "min_silence_s": (t.min_silence_s >= 0.03, "at least one 30 ms VAD frame"),
        "min_speech_s": (t.min_speech_s >= 0, "0 or seconds"),
        "pad_s": (0 <= t.pad_s <= t.min_silence_s, "0 to timeline.min_silence_s"),
        "max_segment_s": (t.max_segment_s >= 1, "at least 1 s"),
    }
    for name, (ok, what) in checks.items():
        _require(ok, f"timeline.{name}", getattr(t, name), what)


def check_serve(s: ServeConfig, section: str = "serve") -> None:
    """The `serve:` values; ServeSettings (a ServeConfig) runs it again before it starts."""
    checks = {
        "port": (0 <= s.port <= 65535, "0 to 65535"),
        "workers": (s.workers >= 1, "at least 1"),
        "max_body_mb": (s.max_body_mb > 0, "positive"),
        "max_duration_s": (s.max_duration_s > 0, "positive"),
        "max_batch_files": (s.max_batch_files >= 1, "at least 1"),
        "max_batch_size": (s.max_batch_size >= 1, "at least 1"),
        "max_wait_ms": (s.max_wait_ms >= 0, "0 or more"),
        "head_timeout_s": (s.head_timeout_s > 0, "positive seconds"),
        "body_timeout_s": (s.body_timeout_s > 0, "positive seconds"),
        "body_min_rate_kb_s": (s.body_min_rate_kb_s > 0, "positive KB per second"),
        "max_buffered_mb": (s.max_buffered_mb >= s.max_body_mb, "at least serve.max_body_mb"),
        "max_connections": (s.max_connections >= 1, "at least 1"),
        "keep_alive_s": (s.keep_alive_s > 0, "positive seconds"),
        "request_timeout_s": (s.request_timeout_s > 0, "positive seconds"),
        "shutdown_timeout_s": (s.shutdown_timeout_s > 0, "positive seconds"),
        "max_streams": (s.max_streams >= 0, "0 (no streams) or more"),
        "stream_max_s": (s.stream_max_s > 0, "positive seconds"),
        "stream_idle_s": (s.stream_idle_s > 0, "positive seconds"),
        "stream_max_message_kb": (s.stream_max_message_kb >= 1, "at least 1"),
        "scoring_timeout_s": (s.scoring_timeout_s > 0, "positive seconds"),
        "log_flush_s": (s.log_flush_s >= 0, "0 (no background upload) or more seconds"),
        "log_timeout_s": (s.log_timeout_s > 0, "positive seconds"),
        "log_spool_mb": (s.log_spool_mb > 0, "positive"),
        "scoring_processes": (
            s.scoring_processes == "auto"
            or (isinstance(s.scoring_processes, int) and s.scoring_processes >= 0),
            "'auto' or a number of processes, 0 for none",
        ),
    }
    for name, (ok, what) in checks.items():
        _require(ok, f"{section}.{name}", getattr(s, name), what)


def _check_cloud(c: CloudConfig) -> None:
    parse_duration(c.timeout, "cloud.timeout")
    try:
        cpu = float(c.cpu)
    except ValueError:
        cpu = -1.0
    _require(
        0.08 <= cpu < 1 or cpu in _RUN_CPU_MAX_GIB,
        "cloud.cpu",
        c.cpu,
        "Cloud Run takes 1, 2, 4, 6 or 8 CPUs, or a fraction of one from 0.08",
    )
    memory = memory_gib(c.memory)
    most = _RUN_CPU_MAX_GIB.get(cpu, 1)
    least = _RUN_CPU_MIN_GIB.get(cpu, 0.125)
    _require(
        least <= memory <= most,
        "cloud.memory",
        c.memory,
        f"with cloud.cpu={c.cpu} Cloud Run allows {least:g} to {most:g} GiB",
    )
    _require(
        cpu >= 1 or c.concurrency == 1,
        "cloud.concurrency",
        c.concurrency,
        "Cloud Run serves one request at a time below 1 CPU: set it to 1",
    )
    _require(1 <= c.concurrency <= 1000, "cloud.concurrency", c.concurrency, "1 to 1000")
    _require(
        1 <= c.request_timeout_s <= 3600,
        "cloud.request_timeout_s",
        c.request_timeout_s,
        "1 to 3600 seconds",
    )
    _require(c.min_instances >= 0, "cloud.min_instances", c.min_instances, "0 or more")
    _require(
        c.max_instances >= max(1, c.min_instances),
        "cloud.max_instances",
        c.max_instances,
        "at least 1 and at least cloud.min_instances",
    )
    _require(c.replicas >= 1, "cloud.replicas", c.replicas, "at least 1")
    _require(c.accelerator_count >= 0, "cloud.accelerator_count", c.accelerator_count, "0 or more")


def check_config(cfg: KndConfig) -> None:
    """Value checks the types cannot express; each error names its key."""
    _check_trainer(cfg.train.trainer)
    _check_augment(cfg.train.augment)
    _require(
        cfg.train.trim_method in TRIM_METHODS,
        "train.trim_method",
        cfg.train.trim_method,
        " or ".join(TRIM_METHODS),
    )
    inf = cfg.inference
    _require(inf.backend in BACKENDS, "inference.backend", inf.backend, "onnx or torch")
    check_min_confidence(inf.min_confidence)
    _require(inf.window_s >= 0, "inference.window_s", inf.window_s, "0 or seconds")
    _require(inf.hop_s >= 0, "inference.hop_s", inf.hop_s, "0 or seconds")
    _require(inf.batch_size >= 1, "inference.batch_size", inf.batch_size, "at least 1")
    automatic = "0 (one per core) or a number of workers"
    _require(cfg.data.workers >= 0, "data.workers", cfg.data.workers, automatic)
    _require(inf.workers >= 0, "inference.workers", inf.workers, automatic)
    loaders = cfg.train.num_workers
    _require(loaders >= 0, "train.num_workers", loaders, "0 (load in the training process) or more")
    check_data(cfg.data)
    check_audio(cfg.audio)
    check_drift(cfg.drift)
    check_timeline(cfg.timeline)
    check_serve(cfg.serve)
    _check_cloud(cfg.cloud)
    _check_encoder(cfg.model)


def _check_augment(a: AugmentConfig) -> None:
    """The waveform augmentations; the degradation chain is checked by `perturb`."""
    key = "train.augment"
    _require(a.gain_db >= 0, f"{key}.gain_db", a.gain_db, "0 (off) or the +- range in dB")
    _require(a.mixup_alpha >= 0, f"{key}.mixup_alpha", a.mixup_alpha, "0 (off) or more")
    for speed in a.speeds:
        _require(0.5 <= speed <= 2.0, f"{key}.speeds", speed, "speeds from 0.5 to 2.0")


ENCODER_MODES = ("frozen", "partial", "full")


def _check_encoder(m: ModelConfig) -> None:
    """The pretrained-encoder keys (models/ssl.py), checked before anything loads."""
    if m.name == "ssl" and not m.encoder:
        raise ConfigError(
            "key 'model.encoder': model.name=ssl needs an encoder: a directory in the "
            "save_pretrained layout or a Hugging Face model id in the local cache"
        )
    _require(
        m.encoder_mode in ENCODER_MODES,
        "model.encoder_mode",
        m.encoder_mode,
        ", ".join(ENCODER_MODES),
    )
    _require(m.encoder_lr > 0, "model.encoder_lr", m.encoder_lr, "a positive learning rate")
    _require(0 < m.layer_decay <= 1, "model.layer_decay", m.layer_decay, "in (0, 1]")
    _require(m.head_dim >= 1, "model.head_dim", m.head_dim, "at least 1")
    _require(m.feature_cache_gb >= 0, "model.feature_cache_gb", m.feature_cache_gb, "0 or more")


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf
    from yaml import YAMLError

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except (YAMLError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(loaded, type(OmegaConf.create({}))):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded


def _merge(base: Any, update: Any, source: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as exc:
        message = _describe(exc)
        key = getattr(exc, "full_key", None)
        if type(exc).__name__ == "ConfigKeyError" and key:
            value = OmegaConf.select(update, str(key), default=None, throw_on_missing=False)
            if value is not None and not OmegaConf.is_config(value):
                message += f" (value {value!r})"
            message += f"; valid keys of '{str(key).rpartition('.')[0] or 'top level'}': "
            message += ", ".join(_valid_keys(base, str(key).rpartition(".")[0]))
        raise ConfigError(f"{source}: {message}") from None


def _valid_keys(base: Any, parent: str) -> list[str]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(base, parent) if parent else base
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def _describe(exc: Exception) -> str:
    """Turn OmegaConf's multi-line messages into one line naming key and value."""
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    name = type(exc).__name__
    if name == "ConfigKeyError" and key:
        return f"unknown key '{key}'"
    if name == "ValidationError" and key:
        return f"key '{key}': {message}"
    return f"key '{key}': {message}" if key else message
