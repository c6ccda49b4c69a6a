"""The course-project baseline that knd replaces, rebuilt for side-by-side measurement.

VGG19 (torchvision, no pretrained weights) on a 3-channel 128-mel spectrogram image of 3 s
of audio at 48 kHz; the ~560 MB checkpoint is read from disk for every prediction, as the
course service did. Commands (each is one process, so cold start is whole-process time):

    python -m bench.course make-checkpoint CKPT
    python -m bench.course predict CKPT WAV            # one clip, cold
    python -m bench.course predict-each CKPT WAV...    # reload per clip; JSON seconds per clip
    python -m bench.course serve CKPT PORT             # minimal HTTP handler on 127.0.0.1
    python -m bench.course prepare RAW OUT             # sequential decode + resample loop
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 48000
CLIP_SAMPLES = 3 * SAMPLE_RATE
N_CLASSES = 8
N_MELS = 128


def build_vgg19() -> Any:
    import torchvision

    return torchvision.models.vgg19(weights=None, num_classes=N_CLASSES)


def make_checkpoint(path: Path) -> Path:
    """Write a VGG19 state dict once (the size of the course checkpoint); reused afterwards."""
    import torch

    path = Path(path)
    if path.is_file() and path.stat().st_size > 100_000_000:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.manual_seed(0)
    torch.save(build_vgg19().state_dict(), tmp)
    tmp.replace(path)
    return path


def load_48k(source: str | Path | bytes) -> np.ndarray:
    """Mono float32 at 48 kHz, cropped or zero-padded to 3 s, as the course loader did."""
    import soundfile as sf

    data, rate = sf.read(
        io.BytesIO(source) if isinstance(source, bytes) else str(source),
        dtype="float32",
        always_2d=True,
    )
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    out = np.zeros(CLIP_SAMPLES, np.float32)
    out[: min(len(mono), CLIP_SAMPLES)] = mono[:CLIP_SAMPLES]
    return out


class MelImage:
    """Waveform batch -> (batch, 3, 128, frames) dB mel image, normalised per clip."""

    def __init__(self) -> None:
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=2048, hop_length=512, n_mels=N_MELS
        )
        self.db = torchaudio.transforms.AmplitudeToDB(top_db=80)

    def __call__(self, waves: Any) -> Any:
        spec = self.db(self.mel(waves))
        mean = spec.mean(dim=(-2, -1), keepdim=True)
        std = spec.std(dim=(-2, -1), keepdim=True)
        return ((spec - mean) / (std + 1e-5)).unsqueeze(1).repeat(1, 3, 1, 1)


def predict_one(checkpoint: Path, source: str | Path | bytes) -> dict[str, Any]:
    """The course request path: build VGG19, read the checkpoint, mel, forward."""
    import torch

    model = build_vgg19()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        image = MelImage()(torch.from_numpy(load_48k(source))[None])
        probs = torch.softmax(model(image), dim=-1)[0]
    best = int(probs.argmax())
    return {"class": best, "confidence": float(probs[best])}


def train_steps(waves: list[np.ndarray], steps: int, batch_size: int) -> list[dict[str, float]]:
    """A few SGD steps of VGG19 on mel images of real clips: data and compute per step."""
    import torch

    torch.manual_seed(0)
    model = build_vgg19().train()
    mel = MelImage()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        chosen = rng.integers(0, len(waves), batch_size)
        x = mel(torch.from_numpy(np.stack([waves[i] for i in chosen])))
        y = torch.from_numpy(rng.integers(0, N_CLASSES, batch_size))
        ready = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(
            {
                "data_s": ready - start,
                "compute_s": time.perf_counter() - ready,
                "samples": batch_size,
            }
        )
    return out


def prepare_sequential(raw: Path, out: Path, sample_rate: int = 16000) -> int:
    """Naive prepare: one process, soundfile read + soxr resample per file, one array out."""
    import soundfile as sf
    import soxr

    paths = sorted(p for p in Path(raw).rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    clips = []
    for path in paths:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        clips.append(soxr.resample(data.mean(axis=1), rate, sample_rate, quality="HQ"))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "waveforms.npy", np.concatenate(clips).astype(np.float32))
    (out / "lengths.json").write_text(json.dumps([len(c) for c in clips]))
    return len(paths)


def serve(checkpoint: Path, port: int) -> None:
    """A minimal single-threaded HTTP handler that reloads the checkpoint per request."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch  # noqa: F401  (the course service imported its stack before listening)
    import torchaudio  # noqa: F401
    import torchvision  # noqa: F401

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200 if self.path == "/ready" else 404, {"ok": self.path == "/ready"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                self._send(200, predict_one(checkpoint, body))
            except Exception as exc:  # the baseline answers errors, it does not die
                self._send(500, {"error": str(exc)})

        def log_message(self, *args: Any) -> None:
            pass

    class Server(HTTPServer):
        # Queue all 16 load clients instead of resetting connections past the default 5:
        # the baseline is then measured on its per-request reload, not on its backlog.
        request_queue_size = 64

    Server(("127.0.0.1", port), Handler).serve_forever()


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "make-checkpoint":
        print(make_checkpoint(Path(args[0])))
    elif command == "predict":
        print(json.dumps(predict_one(Path(args[0]), args[1])))
    elif command == "predict-each":
        seconds = []
        for clip in args[1:]:
            start = time.perf_counter()
            predict_one(Path(args[0]), clip)
            seconds.append(time.perf_counter() - start)
        print(json.dumps(seconds))
    elif command == "serve":
        serve(Path(args[0]), int(args[1]))
    elif command == "prepare":
        print(prepare_sequential(Path(args[0]), Path(args[1])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
