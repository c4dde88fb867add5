"""Fetching public archives: resumable, checksum-verified downloads and safe, one-time extraction.

``download`` streams into ``<file>.part``, continues a ``.part`` left by an interrupted attempt
with an HTTP Range request, verifies the checksum and only then renames the file into place, so
a file under its final name is always whole. ``extract`` unpacks a tar or zip archive once
(a marker file records that it finished) and refuses members that would land outside the
target folder. ``download_and_extract`` chains the two and skips both once extracted.
"""
from __future__ import annotations

import http.client
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from weclip.files import CHUNK, file_digest

CHECKSUM_ALGORITHMS = {32: "md5", 64: "sha256"}  # hex digest length -> algorithm

# The stdlib's own tar guard where this Python has it (3.10.12+, 3.11.4+, 3.12+); the checks in
# _extract_tar refuse the same escapes on older versions.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DownloadError(RuntimeError):
    """A download failed or its checksum did not match; the message names the URL or file."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """'md5:<hex>', 'sha256:<hex>' or a bare md5/sha256 hex digest -> (algorithm, lowercase hex)."""
    algorithm, _, digest = checksum.strip().rpartition(":")
    algorithm = algorithm.lower() or CHECKSUM_ALGORITHMS.get(len(digest), "")
    if algorithm not in CHECKSUM_ALGORITHMS.values() or not digest:
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>', 'sha256:<hex>' "
                         "or a bare md5/sha256 hex digest")
    return algorithm, digest.lower()


def download(url: str, dest: str | Path, *, checksum: str | None = None,
             timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    An existing ``dest`` is kept (verified first when a checksum is given). An existing
    ``dest.part`` is continued from where it stopped. ``checksum`` is 'md5:<hex>',
    'sha256:<hex>' or a bare hex digest; None skips verification. Raises DownloadError.
    """
    dest = Path(dest)
    expected = parse_checksum(checksum) if checksum else None
    if dest.exists():
        if expected:
            _verify(dest, *expected, url, remove=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch(url, part, timeout)
    if expected:
        _verify(part, *expected, url, remove=True)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Stream ``url`` into ``part``, appending to what an earlier attempt left there."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # nothing left after ``offset``: the previous attempt got the whole file
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header and sends everything again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                     desc=part.name.removesuffix(".part")) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: connection lost after {f.tell()} bytes ({e}); "
                                    f"run again to resume into {part}") from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; "
                            f"run again to resume into {part}")


def _verify(path: Path, algorithm: str, expected: str, url: str, remove: bool) -> None:
    actual = file_digest(path, algorithm, progress=True)
    if actual == expected:
        return
    if remove:
        # A corrupt partial download cannot be resumed into a good one.
        path.unlink()
    raise DownloadError(f"{path}: {algorithm} is {actual}, expected {expected} (from {url}); "
                        + ("it was removed, run again to download it anew" if remove
                           else "delete it to download it again"))


def _marker(target: Path, archive_name: str) -> Path:
    return target / f".{archive_name}.extracted"


def extract(archive: str | Path, target: str | Path) -> Path:
    """Unpack a tar (any compression) or zip ``archive`` into ``target`` and return ``target``.

    Done once: a marker file in ``target`` records a finished extraction and later calls return
    at once. A member whose path (or link) would leave ``target`` raises UnsafeArchiveError.
    """
    archive, target = Path(archive), Path(target)
    marker = _marker(target, archive.name)
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise ValueError(f"{archive}: neither a tar nor a zip archive")
    marker.touch()
    return target


def _inside(target: Path, name: str, archive: Path) -> None:
    root = target.resolve()
    if not (root / name).resolve().is_relative_to(root):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside "
                                 f"{target}; refusing to extract")


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit=" files"):
            _inside(target, info.filename, archive)
            zf.extract(info, target)


def _extract_tar(archive: Path, target: Path) -> None:
    # Iterating (rather than getmembers() first) reads a compressed tar in a single pass.
    with tarfile.open(archive) as tar:
        for member in tqdm(tar, desc=f"extract {archive.name}", unit=" files"):
            _inside(target, member.name, archive)
            if member.issym():
                _inside(target, str(Path(member.name).parent / member.linkname), archive)
            elif member.islnk():
                _inside(target, member.linkname, archive)
            elif member.isdev():
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device file; "
                                         "refusing to extract")
            tar.extract(member, target, **_TAR_FILTER)


def download_and_extract(url: str, download_dir: str | Path, *, checksum: str | None = None,
                         filename: str | None = None) -> Path:
    """Download ``url`` into ``download_dir`` (as ``filename``, default: the URL's last part)
    and extract it there; both are skipped once the archive was extracted. Returns the folder."""
    download_dir = Path(download_dir)
    filename = filename or url.rsplit("/", 1)[-1]
    if _marker(download_dir, filename).exists():
        return download_dir
    archive = download(url, download_dir / filename, checksum=checksum)
    return extract(archive, download_dir)
