"""Resumable, verified downloads from a local server, and safe one-time archive extraction."""
import hashlib
import io
import tarfile
import zipfile

import pytest

from pipeline.datasets.download import (DownloadError, UnsafeArchiveError, download,
                                        download_and_extract, extract)

DATA = bytes(range(256)) * 4000  # ~1 MB


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("checksum", [f"md5:{md5(DATA)}", hashlib.sha256(DATA).hexdigest()])
def test_download_verifies_the_checksum_and_renames_into_place(file_server, tmp_path, checksum):
    file_server.files["/data.bin"] = DATA
    dest = download(f"{file_server.url}/data.bin", tmp_path / "data.bin", checksum=checksum)
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "data.bin.part").exists()


def test_download_resumes_a_truncated_part_file_with_a_range_request(file_server, tmp_path):
    file_server.files["/data.bin"] = DATA
    (tmp_path / "data.bin.part").write_bytes(DATA[:1000])
    dest = download(f"{file_server.url}/data.bin", tmp_path / "data.bin", checksum=md5(DATA))
    assert file_server.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == DATA


def test_checksum_mismatch_names_the_file_and_discards_the_download(file_server, tmp_path):
    file_server.files["/data.bin"] = DATA
    with pytest.raises(DownloadError, match=r"data\.bin\.part: md5 is .* expected 0+"):
        download(f"{file_server.url}/data.bin", tmp_path / "data.bin", checksum="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_downloading(file_server, tmp_path):
    (tmp_path / "data.bin").write_bytes(DATA)
    download(f"{file_server.url}/data.bin", tmp_path / "data.bin", checksum=md5(DATA))
    assert file_server.ranges == []


def test_http_errors_name_the_url(file_server, tmp_path):
    with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:\d+/missing\.bin: HTTP 404"):
        download(f"{file_server.url}/missing.bin", tmp_path / "missing.bin")


def make_tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("name, make", [("a.tgz", make_tar), ("a.zip", make_zip)])
def test_extract_unpacks_once(tmp_path, name, make):
    archive = tmp_path / name
    archive.write_bytes(make({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    target = tmp_path / "out"
    extract(archive, target)
    assert (target / "top" / "sub" / "y.txt").read_bytes() == b"y"
    (target / "top" / "x.txt").unlink()
    extract(archive, target)  # already done: nothing is unpacked again
    assert not (target / "top" / "x.txt").exists()


@pytest.mark.parametrize("name, make", [("evil.tar", make_tar), ("evil.zip", make_zip)])
def test_extract_refuses_members_that_escape_the_target(tmp_path, name, make):
    archive = tmp_path / name
    archive.write_bytes(make({"../escaped.txt": b"!"}))
    with pytest.raises(UnsafeArchiveError, match=rf"{name}: member '\.\./escaped\.txt'"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_extract_refuses_symlinks_that_point_outside(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc"
        tar.addfile(link)
    (tmp_path / "links.tar").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchiveError, match="links.tar: member"):
        extract(tmp_path / "links.tar", tmp_path / "out")


def test_download_and_extract_skips_the_download_once_extracted(file_server, tmp_path):
    data = make_tar({"top/x.txt": b"x"})
    file_server.files["/a.tgz"] = data
    download_and_extract(f"{file_server.url}/a.tgz", tmp_path, checksum=md5(data))
    (tmp_path / "a.tgz").unlink()  # e.g. removed to save space
    download_and_extract(f"{file_server.url}/a.tgz", tmp_path, checksum=md5(data))
    assert len(file_server.ranges) == 1
    assert (tmp_path / "top" / "x.txt").read_bytes() == b"x"
