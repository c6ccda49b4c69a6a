"""Pool sizing follows the CPU quota and affinity, not the host's core count."""

from __future__ import annotations

from pathlib import Path

import pytest

from kndcli import cpus


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("garbage", None)],
)
def test_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text(text + "\n")
    monkeypatch.setattr(cpus, "_CGROUP_V2_MAX", limit)
    assert cpus._cgroup_quota() == expected


def test_usable_cpus_is_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text("100000 100000\n")
    monkeypatch.setattr(cpus, "_CGROUP_V2_MAX", limit)
    assert cpus.usable_cpus() == 1
    monkeypatch.setattr(cpus, "_CGROUP_V2_MAX", tmp_path / "missing")
    assert cpus.usable_cpus() >= 1
