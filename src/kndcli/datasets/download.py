"""`knd data download`: fetch a dataset archive, verify its md5, extract it without surprises.

The archive is streamed to `<out>/<file>.part` (resumed with an HTTP Range request when a
partial file is there), checked against its md5 before anything is unpacked, and extracted
into a temporary folder inside `out` that is renamed into place only when every member
was written. Members that could escape the folder (absolute paths, `..`, links, devices)
and archives whose members are too many or too large refuse to extract.

A URL may carry secrets (a password, a signed query): messages and the files written name
it only as `shown_url` gives it, without them. The archive and its `.part` remember that
name in `<archive>.source`, so a file fetched from somewhere else is fetched again rather
than resumed or reused.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import zipfile
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

from kndcli import __version__
from kndcli.errors import KndError, UsageError

MAX_MEMBERS = 100_000
MAX_TOTAL_BYTES = 20 * 10**9
CHUNK = 1 << 20
MARKER = ".knd-download.json"


@dataclass(frozen=True)
class KnownArchive:
    """Where a public dataset's archive lives and the md5 its publisher (or mirror) lists."""

    url: str | None
    md5: str | None
    note: str = ""


KNOWN_ARCHIVES: dict[str, KnownArchive] = {
    # Zenodo record 1188976 (the authors' own upload): 208,468,073 bytes.
    "ravdess": KnownArchive(
        url="https://zenodo.org/records/1188976/files/Audio_Speech_Actors_01-24.zip?download=1",
        md5="bc696df654c87fed845eb13823edef8a",
    ),
    # The authors publish TESS on Borealis (doi:10.5683/SP2/E8H2MF) one file at a time; this
    # single-zip mirror and its md5 are the ones PaddlePaddle's audio datasets use.
    "tess": KnownArchive(
        url="https://bj.bcebos.com/paddleaudio/datasets/TESS_Toronto_emotional_speech_set.zip",
        md5="1465311b24d1de704c4c63e4ccc470c7",
    ),
    # CREMA-D lives in a Git LFS repository with no archive to download in one request.
    "cremad": KnownArchive(
        url=None,
        md5=None,
        note=(
            "CREMA-D has no single public archive (github.com/CheyneyComputerScience/CREMA-D "
            "stores each WAV in Git LFS): clone it with git-lfs and point data.raw at AudioWAV/, "
            "or pass --url to a zip or tar of AudioWAV you host"
        ),
    ),
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def download_dataset(
    name: str,
    *,
    out: Path,
    url: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    progress: bool = True,
) -> Path:
    """Download, verify and extract dataset `name` into `out/<name>`; returns that folder."""
    name = name.strip().lower()
    known = KNOWN_ARCHIVES.get(name)
    if url is None:
        if known is None:
            raise UsageError(
                f"unknown dataset {name!r}: choose one of {', '.join(KNOWN_ARCHIVES)}, "
                "or pass --url to an archive"
            )
        if known.url is None:
            raise UsageError(f"{name}: pass --url. {known.note}")
        url = known.url
    elif not _NAME.match(name):
        raise UsageError(f"dataset name {name!r} must be lower-case letters, digits, '-' or '_'")
    if md5 is None and known is not None and url == known.url:
        md5 = known.md5
    if md5 is not None:
        md5 = md5.strip().lower()
        if not _MD5.match(md5):
            raise UsageError(f"--md5 {md5!r} is not an md5 (32 hexadecimal digits)")
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise UsageError(
            f"cannot download {shown_url(url)}: only http:// and https:// URLs are supported"
        )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    if target.exists() and not (target / MARKER).is_file():
        raise KndError(
            f"{target} exists and was not made by 'knd data download': "
            "remove it or choose another --out"
        )
    archive = out / archive_filename(url, name)
    shown = shown_url(url)
    part = archive.with_name(archive.name + ".part")
    _forget_other_sources(archive, part, url, md5)
    actual = _reuse_archive(archive, md5)
    if actual is None:
        record = _source_record(archive)
        record.write_text(json.dumps(source_of(url)))
        try:
            fetch(url, part, timeout=timeout, progress=progress)
        finally:
            if not part.exists():  # nothing fetched to remember the source of
                record.unlink(missing_ok=True)
        actual = file_md5(part)
        if md5 is not None and actual != md5:
            part.unlink()
            record.unlink()
            raise KndError(
                f"md5 mismatch for {shown}: expected {md5}, got {actual}; "
                "the download was removed and nothing was extracted"
            )
        part.replace(archive)
    if md5 is None:
        print(
            f"warning: no md5 to check {shown} against; the archive's md5 is {actual} "
            f"(pass --md5 {actual} to pin it)",
            file=sys.stderr,
        )
    if _marker_md5(target) == actual:
        return target
    extract_archive(
        archive,
        target,
        max_members=max_members,
        max_total_bytes=max_total_bytes,
        marker={"dataset": name, "url": shown, "md5": actual, "archive": archive.name},
    )
    return target


def archive_filename(url: str, name: str) -> str:
    """The archive's file name from the URL path, made safe to use inside `out`, and never
    the dataset's own folder name (a URL ending in /ravdess for the dataset ravdess)."""
    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    last = re.sub(r"[^A-Za-z0-9._\-]", "_", last).lstrip(".")
    return last if last and last.lower() != name else f"{name}.archive"


def shown_url(url: str) -> str:
    """The URL without what may be secret: user and password, and the query (a signed
    URL's signature or a token); a query left out shows as `?...`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: urlopen refuses it, the message need not show it
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?..." if parts.query else "")


def _source_record(archive: Path) -> Path:
    return archive.with_name(archive.name + ".source")


def source_of(url: str) -> dict[str, str]:
    """What `<archive>.source` holds: the URL as shown, and a digest of all of it but the
    user and password, so two URLs that differ only in their query (?id=A, ?id=B) differ.
    A re-signed URL differs too: its `.part` is fetched again rather than resumed."""
    parts = urlsplit(url)
    whole = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return {"url": shown_url(url), "sha256": hashlib.sha256(whole.encode()).hexdigest()}


def _forget_other_sources(archive: Path, part: Path, url: str, md5: str | None) -> None:
    """Remove a `.part`, and an archive with no md5 to check it by, that were fetched from
    another URL: resuming would splice two files, and reusing would unpack another
    dataset under this name. (Files from before the record existed are kept.)"""
    record = _source_record(archive)
    try:
        before = json.loads(record.read_text())
        source, digest = str(before["url"]), before["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = source_of(url)
    if digest == now["sha256"]:
        return
    stale = [part] + ([archive] if md5 is None else [])
    for path in stale:
        if path.is_file():
            print(
                f"{path} came from another URL ({source}) than {now['url']}: downloading again",
                file=sys.stderr,
            )
            path.unlink()


def file_md5(path: Path) -> str:
    """md5 of a file, read in chunks so a 200 MB archive does not sit in memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _reuse_archive(archive: Path, md5: str | None) -> str | None:
    """The md5 of an archive already downloaded, or None when it must be (re)downloaded."""
    if not archive.is_file():
        return None
    # Only a complete download is ever renamed from .part, so without an md5 it is trusted.
    actual = file_md5(archive)
    if md5 is not None and actual != md5:
        print(f"{archive} has md5 {actual}, not {md5}: downloading again", file=sys.stderr)
        archive.unlink()
        return None
    return actual


def _marker_md5(target: Path) -> str | None:
    try:
        return json.loads((target / MARKER).read_text())["md5"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- fetch


def fetch(url: str, part: Path, *, timeout: float = 60.0, progress: bool = True) -> None:
    """Stream url into `part`, continuing from its current size when the server allows it."""
    shown = shown_url(url)
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"knd/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(_request(url, headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and have:
            # The partial file is no prefix of what the server holds now: start again.
            part.unlink()
            return fetch(url, part, timeout=timeout, progress=progress)
        if exc.url != url and "Redirection to url" in str(exc.reason):
            # urllib refuses a redirect to another scheme (file:, gopher:) and quotes the
            # target whole, signed query and all.
            raise KndError(
                f"download failed: {shown} redirected to {shown_url(exc.url)}, "
                "which is not an http, https or ftp URL"
            ) from None
        raise KndError(f"download failed: {shown} answered HTTP {exc.code} {exc.reason}") from exc
    except (http.client.InvalidURL, ValueError):  # its message quotes the whole URL
        raise KndError(
            f"cannot download {shown}: not a valid URL (a space or control character in it?)"
        ) from None
    except (URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KndError(f"cannot download {shown}: {reason}") from exc
    if response.status == 206 and _range_start(response) != have:
        # Bytes from some other offset cannot be appended: start the file again.
        response.close()
        part.unlink()
        return fetch(url, part, timeout=timeout, progress=progress)
    with response:
        start = have if response.status == 206 else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        # A 200 to a Range request means the server sends everything: overwrite, don't append.
        written = start
        try:
            with (
                part.open("ab" if start else "wb") as sink,
                _progress_bar(progress, url, total, start) as advance,
            ):
                while chunk := response.read(CHUNK):
                    sink.write(chunk)
                    written += len(chunk)
                    advance(len(chunk))
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise KndError(
                f"download of {shown} stopped after {written} bytes ({exc}); "
                f"run the command again to resume from {part}"
            ) from exc
    if total is not None and written < total:
        raise KndError(
            f"download of {shown} stopped after {written} of {total} bytes; "
            f"run the command again to resume from {part}"
        )


def _request(url: str, headers: dict[str, str]) -> Request:
    """A GET for `url`; a user and password in it (https://user:pass@host/...) become HTTP
    Basic authentication (urllib would take them for part of the host). Stricter than
    curl, which keeps them for redirects to the same host: no redirect carries them."""
    parts = urlsplit(url)
    if parts.username is None:
        return Request(url, headers=headers)
    login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    request = Request(
        parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), headers=headers
    )
    request.add_unredirected_header("Authorization", "Basic " + b64encode(login.encode()).decode())
    return request


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


@contextmanager
def _progress_bar(enabled: bool, url: str, total: int | None, done: int) -> Iterator:
    """A rich progress bar on stderr when it is a terminal; otherwise a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    label = urlsplit(url).path.rsplit("/", 1)[-1] or shown_url(url)
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


# ----------------------------------------------------------------------------- extract


def extract_archive(
    archive: Path,
    target: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    marker: dict | None = None,
) -> int:
    """Extract a zip or tar(.gz/.bz2/.xz) into `target`, all or nothing; returns files written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
    try:
        if zipfile.is_zipfile(archive):
            count = _extract_zip(archive, work, max_members, max_total_bytes)
        elif tarfile.is_tarfile(archive):
            count = _extract_tar(archive, work, max_members, max_total_bytes)
        else:
            raise KndError(f"{archive} is neither a zip nor a tar archive")
        (work / MARKER).write_text(json.dumps(marker or {"archive": archive.name}, indent=2))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.replace(old / target.name)
            work.replace(target)
            shutil.rmtree(old)
        else:
            work.replace(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return count


def member_path(name: str, archive: Path) -> PurePosixPath | None:
    """The member's relative path, None for the archive root, or KndError if it could escape."""
    if "\x00" in name:
        raise KndError(f"{archive}: member {name!r} has a NUL byte in its name")
    # Windows tools sometimes write backslashes; treat them as separators so '..\\x' is caught.
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise KndError(f"{archive}: member {name!r} has an absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise KndError(f"{archive}: member {name!r} points outside the extraction folder (..)")
    return PurePosixPath(*parts) if parts else None


def _check_totals(archive: Path, count: int, total: int, max_members: int, max_total: int) -> None:
    if count > max_members:
        raise KndError(f"{archive}: more than {max_members} members; refusing to extract")
    if total > max_total:
        raise KndError(
            f"{archive}: members declare {total} bytes uncompressed, over the "
            f"{max_total}-byte limit; refusing to extract"
        )


def _check_space(archive: Path, work: Path, total: int) -> None:
    free = shutil.disk_usage(work).free
    if total > free:
        raise KndError(f"{archive}: needs {total} bytes uncompressed but {work} has {free} free")


def _copy_limited(
    source: IO[bytes], dest: Path, declared: int, budget: int, archive: Path, name: str
) -> int:
    """Copy one member, stopping as soon as it writes more than it declared or than the budget."""
    written = 0
    with dest.open("xb") as sink:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise KndError(
                    f"{archive}: member {name!r} expands past its declared {declared} bytes "
                    "(a zip bomb?); refusing to extract"
                )
            if written > budget:
                raise KndError(f"{archive}: uncompressed data passes the size limit at {name!r}")
            sink.write(chunk)
    return written


def zip_declared_entries(archive: Path) -> int | None:
    """Entry count from the end-of-central-directory record, read before zipfile lists them all."""
    with archive.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - (65535 + 22)))
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        entries = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        if entries != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
            return entries
        # Zip64: the locator before the record points at a record with a 64-bit count.
        offset = struct.unpack("<Q", tail[at - 12 : at - 4])[0]
        handle.seek(offset)
        record = handle.read(56)
        if record[:4] != b"PK\x06\x06" or len(record) < 40:
            return None
        return struct.unpack("<Q", record[32:40])[0]


_S_IFMT = 0o170000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000


def _extract_zip(archive: Path, work: Path, max_members: int, max_total: int) -> int:
    declared_entries = zip_declared_entries(archive)
    if declared_entries is not None and declared_entries > max_members:
        raise KndError(f"{archive}: more than {max_members} members; refusing to extract")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_totals(
                archive, len(infos), sum(i.file_size for i in infos), max_members, max_total
            )
            plan: list[tuple[zipfile.ZipInfo, PurePosixPath | None]] = []
            for info in infos:
                rel = member_path(info.filename, archive)
                mode = info.external_attr >> 16
                kind = mode & _S_IFMT
                if kind == 0o120000:
                    raise KndError(f"{archive}: member {info.filename!r} is a symbolic link")
                if kind not in (0, _S_IFREG, _S_IFDIR):
                    raise KndError(f"{archive}: member {info.filename!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise KndError(f"{archive}: member {info.filename!r} is encrypted")
                plan.append((info, rel))
            _check_space(archive, work, sum(i.file_size for i in infos))
            budget = max_total
            count = 0
            for info, rel in plan:
                if rel is None:
                    continue
                dest = work.joinpath(*rel.parts)
                if info.is_dir() or (info.external_attr >> 16) & _S_IFMT == _S_IFDIR:
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as source:
                        budget -= _copy_limited(
                            source, dest, info.file_size, budget, archive, info.filename
                        )
                except zipfile.BadZipFile as exc:
                    # zipfile stops at the declared size, so a member that expands further
                    # (a zip bomb with lying headers) ends here with a bad CRC.
                    raise KndError(
                        f"{archive}: member {info.filename!r} does not match its header "
                        f"({exc}): damaged, or a zip bomb; refusing to extract"
                    ) from exc
                count += 1
            return count
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise KndError(f"{archive}: damaged or unsupported zip: {exc}") from exc
    except FileExistsError as exc:
        raise KndError(f"{archive}: member written twice: {exc.filename}") from exc
    except OSError as exc:
        raise KndError(f"{archive}: cannot extract: {exc}") from exc


def _extract_tar(archive: Path, work: Path, max_members: int, max_total: int) -> int:
    try:
        with tarfile.open(archive, "r:*") as tf:
            total = 0
            # Pass 1, headers only: stop counting as soon as a cap is passed.
            for count, member in enumerate(tf, start=1):
                total += member.size if member.isreg() else 0
                _check_totals(archive, count, total, max_members, max_total)
                member_path(member.name, archive)
                if member.issym() or member.islnk():
                    raise KndError(f"{archive}: member {member.name!r} is a link")
                if not (member.isreg() or member.isdir()):
                    raise KndError(f"{archive}: member {member.name!r} is not a regular file")
            _check_space(archive, work, total)
            budget = max_total
            files = 0
            for member in tf.getmembers():
                rel = member_path(member.name, archive)
                if rel is None:
                    continue
                dest = work.joinpath(*rel.parts)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tf.extractfile(member)
                if source is None:
                    raise KndError(f"{archive}: member {member.name!r} has no data")
                with source:
                    budget -= _copy_limited(source, dest, member.size, budget, archive, member.name)
                files += 1
            return files
    except (tarfile.TarError, EOFError) as exc:
        raise KndError(f"{archive}: damaged or unsupported tar: {exc}") from exc
    except FileExistsError as exc:
        raise KndError(f"{archive}: member written twice: {exc.filename}") from exc
    except OSError as exc:
        raise KndError(f"{archive}: cannot extract: {exc}") from exc
