"""`uadct data fetch`: download from a local HTTP server, resume, checksum, unpack. No outside network."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import pytest
from typer.testing import CliRunner

from uadct.cli import app
from uadct.datasets import DownloadError, dataset_archive, download, fetch_dataset, unpack_tar
from uadct.errors import UadctError


def _make_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Server:
    """A 127.0.0.1 server of one archive that honours Range and can cut its first answer short."""

    def __init__(self, payload: bytes, cut_first_at: int | None = None) -> None:
        self.payload = payload
        self.cut_first_at = cut_first_at
        self.requests: list[str | None] = []  # the Range header of each request
        self.bytes_sent = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                ranged = self.headers.get("Range")
                owner.requests.append(ranged)
                start = int(ranged.removeprefix("bytes=").rstrip("-")) if ranged else 0
                body = owner.payload[start:]
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(len(body)))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(owner.payload) - 1}/{len(owner.payload)}")
                self.end_headers()
                if owner.cut_first_at is not None and len(owner.requests) == 1:
                    body = body[: owner.cut_first_at]  # the connection drops mid-transfer
                self.wfile.write(body)
                owner.bytes_sent += len(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/IXI-T1.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MEMBERS = {f"IXI{i:03d}-Guys-{i:04d}-T1.nii.gz": bytes(range(256)) * (200 + i) for i in range(3)}


def test_interrupted_download_resumes_with_range(tmp_path):
    payload = _make_tar(MEMBERS)
    md5 = hashlib.md5(payload).hexdigest()
    target = tmp_path / "IXI-T1.tar"
    with _Server(payload, cut_first_at=len(payload) // 3) as server:
        with pytest.raises(DownloadError, match="interrupted after .* run again to resume"):
            download(server.url, target, md5)
        partial = tmp_path / "IXI-T1.tar.part"
        assert partial.stat().st_size == len(payload) // 3 and not target.exists()
        seen: list[tuple[int, int | None]] = []
        download(server.url, target, md5, progress=lambda done, total: seen.append((done, total)))
    assert server.requests == [None, f"bytes={len(payload) // 3}-"]
    assert server.bytes_sent == len(payload)  # the second request sent only the rest
    assert target.read_bytes() == payload and not partial.exists()
    assert seen[-1] == (len(payload), len(payload)) and seen[0][0] > len(payload) // 3


def test_checksum_mismatch_removes_the_partial_file(tmp_path):
    payload = _make_tar(MEMBERS)
    with _Server(payload) as server:
        with pytest.raises(DownloadError, match="checksum mismatch"):
            download(server.url, tmp_path / "a.tar", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_broken_or_unsafe_archives_leave_nothing(tmp_path):
    whole = _make_tar(MEMBERS)
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DownloadError, match="broken tar archive"):
        unpack_tar(tmp_path / "cut.tar", tmp_path / "out")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (tmp_path / "link.tar").write_bytes(buffer.getvalue())
    with pytest.raises(DownloadError, match="not a plain file"):
        unpack_tar(tmp_path / "link.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_fetch_unpacks_and_cli_prints_the_licence(tmp_path):
    payload = _make_tar({f"sub/{name}": data for name, data in MEMBERS.items()})
    md5 = hashlib.md5(payload).hexdigest()
    with _Server(payload) as server:
        result = CliRunner().invoke(app, ["data", "fetch", "ixi", "--modality", "T1", "-o", str(tmp_path / "data"),
                                          "--url", server.url, "--md5", md5])
        assert result.exit_code == 0, result.output
        assert "CC BY-SA 3.0" in result.output and "3 files unpacked" in result.output
        folder = tmp_path / "data" / "ixi" / "T1"
        assert sorted(p.name for p in folder.iterdir()) == sorted(MEMBERS)
        assert (folder / next(iter(MEMBERS))).read_bytes() == next(iter(MEMBERS.values()))
        assert not (tmp_path / "data" / ".downloads" / "IXI-T1.tar").exists()  # removed after unpacking
        again = fetch_dataset(dataset_archive("ixi", "T1", url=server.url, md5=md5), tmp_path / "data")
        assert again.skipped and len(server.requests) == 1


def test_official_archive_and_unknown_names():
    archive = dataset_archive("ixi", "t1")
    assert archive.url == "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-T1.tar"
    assert archive.md5 == "34901a0593b41dd19c1a1f746eac2d58" and archive.file_name == "IXI-T1.tar"
    with pytest.raises(UadctError, match="available: T1, T2, PD, MRA"):
        dataset_archive("ixi", "FLAIR")
    with pytest.raises(UadctError, match="unknown dataset 'oasis'"):
        dataset_archive("oasis", "T1")


def test_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(DownloadError, match="cannot connect .* needs the internet"):
        download("http://127.0.0.1:9/none.tar", tmp_path / "x.tar", timeout=2)
    assert list(tmp_path.iterdir()) == []  # nothing written before the server answered
