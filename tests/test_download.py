"""`knd data download` against a real HTTP server on 127.0.0.1 serving archives built here."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kndcli.datasets.download import MARKER, archive_filename, download_dataset, extract_archive
from kndcli.errors import KndError


@dataclass
class Served:
    """What the test server holds and what it was asked for."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, then close
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # path, Range, sent
    auth: list[str | None] = field(default_factory=list)  # each GET's Authorization header
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location of a 302

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/").split("?")[0]
            served.auth.append(self.headers.get("Authorization"))
            if path in served.redirects:
                served.log.append((path, None, 0))
                self.send_response(302)
                self.send_header("Location", served.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = served.files.get(path)
            range_header = self.headers.get("Range")
            if body is None:
                served.log.append((path, range_header, 0))
                self.send_error(404, "Not Found")
                return
            start = 0
            if range_header and path not in served.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    served.log.append((path, range_header, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if path in served.cut_after:
                payload = payload[: served.cut_after.pop(path)]
                self.close_connection = True
            # Logged before writing: the client may finish reading before this thread resumes.
            served.log.append((path, range_header, len(payload)))
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[Served]:
    served = Served(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


# ----------------------------------------------------------------------------- archives

CLIPS = {
    "Actor_01/03-01-05-01-01-01-01.wav": b"RIFF" + b"\x01" * 3000,
    "Actor_02/03-01-03-02-02-01-02.wav": b"RIFF" + b"\x02" * 5000,
}


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER
    }


def leftovers(out: Path) -> list[str]:
    """Everything in out except archives: a failed extraction must leave none of it."""
    archives = (".zip", ".gz", ".part", ".source")  # .source: where an archive came from
    return sorted(p.name for p in out.iterdir() if not p.name.endswith(archives))


# ----------------------------------------------------------------------------- happy paths


def test_zip_is_downloaded_verified_and_extracted(server: Served, tmp_path: Path) -> None:
    data = make_zip(CLIPS)
    server.files["ravdess.zip"] = data
    target = download_dataset(
        "ravdess", out=tmp_path, url=server.url("ravdess.zip"), md5=md5(data), progress=False
    )
    assert target == tmp_path / "ravdess"
    assert tree(target) == CLIPS
    assert (tmp_path / "ravdess.zip").read_bytes() == data
    assert not list(tmp_path.glob(".*extracting*"))


def test_a_url_ending_in_the_dataset_s_name_is_downloaded_beside_its_folder(
    server: Served, tmp_path: Path
) -> None:
    """/files/ravdess for the dataset ravdess: the archive cannot be saved where the
    extracted folder goes, so it is kept as ravdess.archive beside it."""
    data = make_zip(CLIPS)
    server.files["ravdess"] = data
    url = server.url("ravdess")
    target = download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    assert target == tmp_path / "ravdess" and tree(target) == CLIPS
    assert (tmp_path / "ravdess.archive").read_bytes() == data
    again = download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    assert again == target and tree(target) == CLIPS
    # Case-insensitive file systems (macOS, Windows) would put /RAVDESS on the folder too.
    assert archive_filename("https://h/files/RAVDESS", "ravdess") == "ravdess.archive"


def test_tar_gz_is_extracted(server: Served, tmp_path: Path) -> None:
    data = make_tar(CLIPS)
    server.files["tess.tar.gz"] = data
    target = download_dataset(
        "tess", out=tmp_path, url=server.url("tess.tar.gz"), md5=md5(data), progress=False
    )
    assert tree(target) == CLIPS


def test_verified_archive_is_not_downloaded_again(server: Served, tmp_path: Path) -> None:
    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    url = server.url("x.zip")
    download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    server.log.clear()
    target = download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    assert server.log == []
    assert tree(target) == CLIPS


def test_without_md5_prints_the_computed_one(
    server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    download_dataset("mine", out=tmp_path, url=server.url("x.zip"), progress=False)
    err = capsys.readouterr().err
    assert "warning" in err
    assert f"--md5 {md5(data)}" in err


# ----------------------------------------------------------------------------- failures


def test_md5_mismatch_removes_download_and_extracts_nothing(server: Served, tmp_path: Path) -> None:
    server.files["x.zip"] = make_zip(CLIPS)
    wrong = "0" * 32
    with pytest.raises(KndError, match=f"expected {wrong}, got {md5(server.files['x.zip'])}"):
        download_dataset(
            "ravdess", out=tmp_path, url=server.url("x.zip"), md5=wrong, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_http_404_names_url_and_status(server: Served, tmp_path: Path) -> None:
    url = server.url("missing.zip")
    with pytest.raises(KndError, match=r"missing\.zip answered HTTP 404"):
        download_dataset("ravdess", out=tmp_path, url=url, md5="0" * 32, progress=False)


def test_unknown_dataset_and_cremad_without_url(tmp_path: Path) -> None:
    with pytest.raises(KndError, match="ravdess, tess, cremad"):
        download_dataset("iemocap", out=tmp_path)
    with pytest.raises(KndError, match="cremad: pass --url"):
        download_dataset("cremad", out=tmp_path)
    with pytest.raises(KndError, match="not an md5"):
        download_dataset("ravdess", out=tmp_path, url="http://127.0.0.1:1/x.zip", md5="abc")


def test_folder_not_made_by_download_is_left_alone(server: Served, tmp_path: Path) -> None:
    (tmp_path / "ravdess").mkdir()
    (tmp_path / "ravdess" / "mine.wav").write_bytes(b"x")
    server.files["x.zip"] = make_zip(CLIPS)
    with pytest.raises(KndError, match="not made by"):
        download_dataset("ravdess", out=tmp_path, url=server.url("x.zip"), progress=False)
    assert server.log == []


def test_secrets_in_the_url_are_used_but_never_shown_or_stored(
    server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password and a signed query reach the server (Basic auth, the query as sent) and
    appear in no message, marker or record; only scheme, host and path do."""
    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    host = server.base.removeprefix("http://")
    url = f"http://ann:pa%24s@{host}/x.zip?X-Goog-Signature=SIGSECRET"
    target = download_dataset("mine", out=tmp_path, url=url, progress=False)
    assert tree(target) == CLIPS
    assert server.auth == ["Basic " + base64.b64encode(b"ann:pa$s").decode()]
    with pytest.raises(KndError) as missing:
        download_dataset("other", out=tmp_path, url=url.replace("x.zip", "no.zip"))
    written = "".join(
        p.read_text() for p in tmp_path.rglob("*") if p.suffix in (".json", ".source")
    )
    shown = capsys.readouterr().err + str(missing.value) + written
    assert f"http://{host}/x.zip?..." in shown and f"http://{host}/no.zip?..." in str(missing.value)
    for secret in ("pa%24s", "pa$s", "ann:", "SIGSECRET"):
        assert secret not in shown


def test_an_archive_from_another_url_is_not_reused_without_an_md5(
    server: Served, tmp_path: Path
) -> None:
    """Two URLs whose archives share a file name: without an md5, the second is fetched,
    not answered with the first one's archive."""
    other = {"Actor_03/b.wav": b"RIFF" + b"\x03" * 900}
    first, second = make_zip(CLIPS), make_zip(other)
    server.files.update({"a/x.zip": first, "b/x.zip": second})
    download_dataset("mine", out=tmp_path, url=server.url("a/x.zip"), progress=False)
    target = download_dataset("mine", out=tmp_path, url=server.url("b/x.zip"), progress=False)
    assert [entry[0] for entry in server.log] == ["a/x.zip", "b/x.zip"]
    assert tree(target) == other


def test_urls_that_differ_only_in_their_query_are_different_sources(
    server: Served, tmp_path: Path
) -> None:
    """uc?id=A and uc?id=B (a file host's download links) share a file name and a shown
    URL; without an md5 the second is still fetched, not answered with the first."""
    server.files["uc"] = make_zip(CLIPS)
    download_dataset("one", out=tmp_path, url=server.url("uc?id=A"), progress=False)
    download_dataset("two", out=tmp_path, url=server.url("uc?id=B"), progress=False)
    assert [entry[0] for entry in server.log] == ["uc", "uc"]


def test_a_url_with_a_space_is_refused_without_quoting_its_query(tmp_path: Path) -> None:
    with pytest.raises(KndError) as refused:
        download_dataset(
            "mine", out=tmp_path, url="http://127.0.0.1:9/My File.zip?sig=SIGSECRET", progress=False
        )
    assert "not a valid URL" in str(refused.value) and "SIGSECRET" not in str(refused.value)


def test_a_redirect_to_another_scheme_is_refused_without_quoting_its_query(
    server: Served, tmp_path: Path
) -> None:
    server.redirects["x.zip"] = "file:///etc/x.zip?sig=SIGSECRET"
    with pytest.raises(KndError) as refused:
        download_dataset("mine", out=tmp_path, url=server.url("x.zip"), progress=False)
    message = str(refused.value)
    assert f"{server.base}/x.zip redirected to file:///etc/x.zip?..." in message
    assert "SIGSECRET" not in message and "not an http, https or ftp URL" in message


def test_a_partial_download_from_another_url_is_started_again(
    server: Served, tmp_path: Path
) -> None:
    """A .part cut off from one URL is not resumed from another: splicing the two would
    fail the md5 (or, without one, unpack a mix)."""
    first = make_zip({f"a/{i}.wav": os.urandom(4000) for i in range(10)})
    second = make_zip({f"b/{i}.wav": os.urandom(4000) for i in range(10)})
    server.files.update({"a/x.zip": first, "b/x.zip": second})
    server.cut_after["a/x.zip"] = len(first) // 2
    with pytest.raises(KndError, match="resume"):
        download_dataset("mine", out=tmp_path, url=server.url("a/x.zip"), progress=False)
    target = download_dataset(
        "mine", out=tmp_path, url=server.url("b/x.zip"), md5=md5(second), progress=False
    )
    assert server.log[-1][:2] == ("b/x.zip", None)  # from the start: no Range
    assert sorted(tree(target)) == [f"b/{i}.wav" for i in range(10)]


# ----------------------------------------------------------------------------- resume


def test_interrupted_download_resumes_with_range(server: Served, tmp_path: Path) -> None:
    data = make_zip({f"a/{i}.wav": os.urandom(4000) for i in range(20)})
    half = len(data) // 2
    server.files["x.zip"] = data
    server.cut_after["x.zip"] = half
    url = server.url("x.zip")
    with pytest.raises(KndError, match="run the command again to resume"):
        download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    part = tmp_path / "x.zip.part"
    assert part.stat().st_size == half
    assert not (tmp_path / "ravdess").exists()

    target = download_dataset("ravdess", out=tmp_path, url=url, md5=md5(data), progress=False)
    _, range_header, sent = server.log[-1]
    assert range_header == f"bytes={half}-"
    assert sent == len(data) - half
    assert len(tree(target)) == 20
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: Served, tmp_path: Path) -> None:
    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    server.ignore_range.add("x.zip")
    # A stale partial file of garbage: appending the full body to it would break the md5.
    (tmp_path / "x.zip.part").write_bytes(b"garbage" * 100)
    target = download_dataset(
        "ravdess", out=tmp_path, url=server.url("x.zip"), md5=md5(data), progress=False
    )
    assert server.log[-1][1] == "bytes=700-"
    assert server.log[-1][2] == len(data)
    assert tree(target) == CLIPS


def test_partial_longer_than_file_starts_over(server: Served, tmp_path: Path) -> None:
    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    (tmp_path / "x.zip.part").write_bytes(b"z" * (len(data) + 10))
    target = download_dataset(
        "ravdess", out=tmp_path, url=server.url("x.zip"), md5=md5(data), progress=False
    )
    assert [entry[1] for entry in server.log] == [f"bytes={len(data) + 10}-", None]
    assert tree(target) == CLIPS


# ----------------------------------------------------------------------------- hostile archives


def _zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.wav", b"fine")
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _tar_with_symlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("ok.wav")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"fine"))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


def _tar_with_hardlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("hard")
        link.type = tarfile.LNKTYPE
        link.linkname = "../../outside"
        tf.addfile(link)
    return buf.getvalue()


def _tar_with_device() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        dev = tarfile.TarInfo("null")
        dev.type = tarfile.CHRTYPE
        dev.devmajor, dev.devminor = 1, 3
        tf.addfile(dev)
    return buf.getvalue()


HOSTILE = {
    "dotdot_zip": (lambda: make_zip({"ok.wav": b"x", "../evil": b"x"}), r"outside"),
    "dotdot_tar": (lambda: make_tar({"a/../../evil": b"x"}), r"outside"),
    "backslash_zip": (lambda: make_zip({"..\\evil": b"x"}), r"outside"),
    "absolute_zip": (lambda: make_zip({"/tmp/evil": b"x"}), r"absolute"),
    "absolute_tar": (lambda: make_tar({"/tmp/evil": b"x"}), r"absolute"),
    "symlink_zip": (_zip_with_symlink, r"symbolic link"),
    "symlink_tar": (_tar_with_symlink, r"is a link"),
    "hardlink_tar": (_tar_with_hardlink, r"is a link"),
    "device_tar": (_tar_with_device, r"not a regular file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_leaves_nothing(
    case: str, server: Served, tmp_path: Path
) -> None:
    build, message = HOSTILE[case]
    data = build()
    server.files["x.zip"] = data
    with pytest.raises(KndError, match=message):
        download_dataset(
            "ravdess", out=tmp_path, url=server.url("x.zip"), md5=md5(data), progress=False
        )
    assert leftovers(tmp_path) == []
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_members(kind: str, tmp_path: Path) -> None:
    members = {f"{i}.wav": b"x" for i in range(11)}
    archive = tmp_path / f"many.{kind}"
    archive.write_bytes(make_zip(members) if kind == "zip" else make_tar(members))
    with pytest.raises(KndError, match="more than 10 members"):
        extract_archive(archive, tmp_path / "out", max_members=10)
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_large_by_headers(kind: str, tmp_path: Path) -> None:
    members = {"big.wav": b"\0" * 200_000}
    archive = tmp_path / f"big.{kind}"
    archive.write_bytes(make_zip(members) if kind == "zip" else make_tar(members))
    with pytest.raises(KndError, match="over the 100000-byte limit"):
        extract_archive(archive, tmp_path / "out", max_total_bytes=100_000)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]


def _lying_zip(real_size: int, claimed: int) -> bytes:
    """A deflated member whose local and central headers claim `claimed` bytes, not `real_size`."""
    data = bytearray(make_zip({"bomb.wav": b"\0" * real_size}))
    packed = struct.pack("<I", real_size)
    # Local header: size at offset 22; central directory: size at offset 24 after its signature.
    local = data.find(b"PK\x03\x04")
    assert data[local + 22 : local + 26] == packed
    data[local + 22 : local + 26] = struct.pack("<I", claimed)
    central = data.find(b"PK\x01\x02")
    assert data[central + 24 : central + 28] == packed
    data[central + 24 : central + 28] = struct.pack("<I", claimed)
    return bytes(data)


def test_zip_bomb_with_lying_headers_is_stopped(server: Served, tmp_path: Path) -> None:
    data = _lying_zip(real_size=5_000_000, claimed=1_000)
    assert len(data) < 20_000  # a tiny download that expands 250x
    server.files["bomb.zip"] = data
    with pytest.raises(KndError, match=r"'bomb\.wav' does not match its header"):
        download_dataset(
            "ravdess",
            out=tmp_path,
            url=server.url("bomb.zip"),
            md5=md5(data),
            max_total_bytes=100_000,
            progress=False,
        )
    assert leftovers(tmp_path) == []


def test_failed_reextraction_keeps_the_previous_copy(server: Served, tmp_path: Path) -> None:
    good = make_zip(CLIPS)
    server.files["good.zip"] = good
    download_dataset("ravdess", out=tmp_path, url=server.url("good.zip"), progress=False)
    server.files["evil.zip"] = make_zip({"../evil": b"x"})
    with pytest.raises(KndError):
        download_dataset("ravdess", out=tmp_path, url=server.url("evil.zip"), progress=False)
    assert tree(tmp_path / "ravdess") == CLIPS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- CLI


def test_cli_download_with_runner(server: Served, tmp_path: Path) -> None:
    from kndcli.cli.main import app

    data = make_zip(CLIPS)
    server.files["x.zip"] = data
    args = ["data", "download", "ravdess", "--url", server.url("x.zip")]
    args += ["--md5", md5(data), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "extracted" in result.output
    assert tree(tmp_path / "ravdess") == CLIPS


def test_cli_md5_mismatch_is_one_line_and_exit_3(server: Served, tmp_path: Path) -> None:
    server.files["x.zip"] = make_zip(CLIPS)
    knd = Path(sys.executable).parent / "knd"
    args = ["data", "download", "ravdess", "--url", server.url("x.zip"), "--md5", "f" * 32]
    proc = subprocess.run(
        [str(knd), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3  # a runtime failure: the bytes are not the expected ones
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: md5 mismatch")
    assert "Traceback" not in proc.stderr
