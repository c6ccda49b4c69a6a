"""The drift report opens in real headless Chromium: no console errors, no network, pixels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ravdess_clips

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1280,1600",
    "--virtual-time-budget=15000",
    # Any name lookup fails, as it would in CI without internet.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def report(drift_bundle: Path, ravdess_root: Path, tmp_path_factory) -> Path:
    from kndcli.config import KndConfig
    from kndcli.monitoring.drift import run_drift, write_report

    folder = tmp_path_factory.mktemp("audio")
    for clip in ravdess_clips(ravdess_root, [13]):
        shutil.copy(clip, folder / clip.name)
    result = run_drift(drift_bundle, KndConfig(), audio=folder)
    out = tmp_path_factory.mktemp("report") / "drift.html"
    write_report(result, out, out.with_suffix(".json"))
    return out


def _page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked for; Chromium's own background fetches are 'not an origin'."""
    events = json.loads(net_log.read_text(errors="replace"))["events"]
    return sorted(
        {
            e["params"]["url"]
            for e in events
            if "url" in e.get("params", {})
            and e["params"].get("initiator") not in (None, "not an origin")
        }
    )


def test_report_renders_without_errors_or_network(
    chromium: str, report: Path, tmp_path: Path
) -> None:
    from PIL import Image

    html = report.read_text()
    # Evidently's JS and icon font are inlined: no tag points anywhere else.
    outside = re.findall(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)\s*=[^>]*>", html)
    assert outside == [], f"the report references files outside itself: {outside[:3]}"

    shot, net_log = tmp_path / "shot.png", tmp_path / "net.json"
    run = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--screenshot={shot}",
            f"--log-net-log={net_log}",
            report.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "console messages:\n" + "\n".join(console)
    assert "Uncaught" not in run.stderr

    external = [u for u in _page_requests(net_log) if not u.startswith(("file:", "data:", "blob:"))]
    assert external == [], f"the report fetched {external}"

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] >= 1000 and image.shape[1] >= 1000
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "screenshot is (nearly) one colour: nothing rendered"
    # The Evidently dashboard drew below the knd banner: the lower half is not blank either.
    lower = image[image.shape[0] // 2 :]
    assert (lower != lower[0, 0]).any(axis=2).mean() > 0.01
