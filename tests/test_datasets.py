"""Data set download: registry, checksum, zip extraction, Bitext cleaning, CLI.

Downloads go to a local http.server on 127.0.0.1 (or file:// URLs); nothing leaves the machine.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLOTHING_CSV, INTENTS_CSV, require_shared_data

from lorafed.cli import main
from lorafed.data.download import (
    DATASETS,
    ChecksumError,
    CsvCleaning,
    DatasetError,
    DatasetSource,
    DownloadError,
    UnknownDatasetError,
    clean_csv,
    download,
    fetch,
    get_dataset,
)

INTENTS_RAW = INTENTS_CSV.with_name("bitext_customer_service_intents.raw.csv")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served on 127.0.0.1 by a thread for the test's duration; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _QuietHandler(*a, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source(payload: bytes, **kw: object) -> DatasetSource:
    fields: dict[str, object] = {
        "name": "toy",
        "filename": "toy.csv",
        "url": "http://127.0.0.1:9/unused",
        "sha256": _sha(payload),
        "licence": "CC0",
        "citation": "nobody",
        "description": "toy",
    }
    fields.update(kw)
    return DatasetSource(**fields)  # type: ignore[arg-type]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


PAYLOAD = b"text,label\nlove it,1\nreturned it,0\n" * 50


def test_http_download_with_right_checksum(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    (root / "toy.csv").write_bytes(PAYLOAD)
    out = fetch(_source(PAYLOAD), tmp_path / "data", f"{base}/toy.csv", progress=False, timeout=5)
    assert out == tmp_path / "data" / "toy" / "toy.csv"
    assert out.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path / "data") == ["toy.csv"]  # no .part files


def test_http_download_with_wrong_checksum_raises_and_leaves_no_file(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = http_root
    tampered = PAYLOAD + b"tampered,1\n"
    (root / "toy.csv").write_bytes(tampered)
    url = f"{base}/toy.csv"
    with pytest.raises(ChecksumError, match=rf"expected {_sha(PAYLOAD)}, received {_sha(tampered)}"):
        fetch(_source(PAYLOAD), tmp_path / "data", url, progress=False, timeout=5)
    with pytest.raises(ChecksumError, match=re.escape(url)):
        fetch(_source(PAYLOAD), tmp_path / "data", url, progress=False, timeout=5)
    assert _leftovers(tmp_path / "data") == []


def test_existing_file_with_wrong_checksum_is_not_replaced_by_a_bad_download(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = http_root
    (root / "toy.csv").write_bytes(b"bad")
    final = tmp_path / "data" / "toy" / "toy.csv"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        fetch(_source(PAYLOAD), tmp_path / "data", f"{base}/toy.csv", progress=False, timeout=5)
    assert final.read_bytes() == b"old"
    assert _leftovers(tmp_path / "data") == ["toy.csv"]


def test_verified_file_in_place_is_kept_without_network(tmp_path: Path) -> None:
    final = tmp_path / "toy" / "toy.csv"
    final.parent.mkdir()
    final.write_bytes(PAYLOAD)
    # The URL cannot be fetched, so success proves nothing was downloaded.
    assert fetch(_source(PAYLOAD), tmp_path, "file:///nonexistent/toy.csv", progress=False) == final


def test_file_url_download(tmp_path: Path) -> None:
    src = tmp_path / "src.csv"
    src.write_bytes(PAYLOAD)
    out = fetch(_source(PAYLOAD), tmp_path / "data", src.as_uri(), progress=False)
    assert out.read_bytes() == PAYLOAD


def test_http_404_is_a_download_error(http_root: tuple[Path, str], tmp_path: Path) -> None:
    _, base = http_root
    with pytest.raises(DownloadError, match=r"missing\.csv: HTTP 404"):
        fetch(_source(PAYLOAD), tmp_path / "data", f"{base}/missing.csv", progress=False, timeout=5)
    assert list((tmp_path / "data").iterdir()) == []  # not even the empty data set folder


def test_silent_server_times_out(tmp_path: Path) -> None:
    # A listening socket that never answers: the connection is accepted by the kernel backlog.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/toy.csv"
        with pytest.raises(DownloadError, match=r"timed out"):
            fetch(_source(PAYLOAD), tmp_path, url, progress=False, timeout=0.3)
    assert _leftovers(tmp_path) == []


def test_size_limit(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    (root / "toy.csv").write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match=rf"announces {len(PAYLOAD):,} bytes, more than the limit 100"):
        fetch(_source(PAYLOAD), tmp_path, f"{base}/toy.csv", progress=False, timeout=5, max_bytes=100)


def test_unsupported_url(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"not a URL lorafed can download"):
        fetch(_source(PAYLOAD), tmp_path, "nonsense-without-scheme", progress=False)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_member_extraction(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    (root / "a.zip").write_bytes(_zip({"readme.txt": b"hi", "sub/Toy Reviews.csv": PAYLOAD, "other.csv": b"x,y\n"}))
    source = _source(PAYLOAD, archive_member="Toy Reviews.csv")
    out = fetch(source, tmp_path / "data", f"{base}/a.zip", progress=False, timeout=5)
    assert out.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path / "data") == ["toy.csv"]  # the archive itself is not kept


def test_zip_single_csv_is_taken_when_member_name_differs(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"notes.txt": b"hi", "renamed.csv": PAYLOAD}))
    out = fetch(_source(PAYLOAD, archive_member="Toy.csv"), tmp_path / "data", archive.as_uri(), progress=False)
    assert out.read_bytes() == PAYLOAD


def test_zip_member_checksum_mismatch(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"Toy.csv": b"other"}))
    with pytest.raises(ChecksumError, match=r"zip member 'Toy.csv'.*expected " + _sha(PAYLOAD)):
        fetch(_source(PAYLOAD, archive_member="Toy.csv"), tmp_path / "data", archive.as_uri(), progress=False)
    assert _leftovers(tmp_path / "data") == []


def test_zip_without_the_member_lists_members(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"a.csv": b"1", "b.csv": b"2"}))
    with pytest.raises(DownloadError, match=r"no single member 'Toy.csv' \(members: 'a.csv', 'b.csv'\)"):
        fetch(_source(PAYLOAD, archive_member="Toy.csv"), tmp_path / "data", archive.as_uri(), progress=False)
    assert _leftovers(tmp_path / "data") == []


def test_not_a_zip(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match=r"not a zip archive"):
        fetch(_source(PAYLOAD, archive_member="Toy.csv"), tmp_path / "data", archive.as_uri(), progress=False)


# --- cleaning -------------------------------------------------------------------------------

STUFFED = (
    b"flags,utterance,category,intent\r\n"
    b"B,cancel my order,ORDER,cancel_order\r\n"
    b'"BL,""cancel it, please"",ORDER,cancel_order"\r\n'
    b"B,hi,HELLO,saying_hello\r\n"
    b"BI,how are you?, SOFT, soft_skills\r\n"
    b"B,refund?,REFUND,track_refund\r\n"
)
CLEANING = CsvCleaning(resplit_stuffed_rows=True, drop_values=(("category", ("HELLO", "SOFT")),))


def test_clean_csv_by_hand() -> None:
    expected = (
        b"flags,utterance,category,intent\n"
        b"B,cancel my order,ORDER,cancel_order\n"
        b'BL,"cancel it, please",ORDER,cancel_order\n'
        b"B,refund?,REFUND,track_refund\n"
    )
    assert clean_csv(STUFFED, CLEANING) == expected


def test_clean_csv_errors() -> None:
    with pytest.raises(DatasetError, match=r"column 'cat' to clean is not in the header"):
        clean_csv(STUFFED, CsvCleaning(drop_values=(("cat", ("X",)),)))
    with pytest.raises(DatasetError, match=r"row 2 has 1 fields, expected 4"):
        clean_csv(STUFFED, CsvCleaning())  # stuffed rows are not re-split
    with pytest.raises(DatasetError, match=r"row 1 has 3 fields, expected 4"):
        clean_csv(b'a,b,c,d\n"x,y,z"\n', CsvCleaning(resplit_stuffed_rows=True))
    with pytest.raises(DatasetError, match=r"empty CSV"):
        clean_csv(b"", CLEANING)
    with pytest.raises(DatasetError, match=r"not a UTF-8 CSV"):
        clean_csv(b"\xff\xfe,a\n", CLEANING)


def test_cleaning_reproduces_shared_bitext_file_byte_for_byte() -> None:
    require_shared_data()
    if not INTENTS_RAW.is_file():
        pytest.skip(f"{INTENTS_RAW} not found")
    cleaned = clean_csv(INTENTS_RAW.read_bytes(), get_dataset("bitext-retail-intents").cleaning)
    assert _sha(cleaned) == DATASETS["bitext-retail-intents"].sha256
    assert cleaned == INTENTS_CSV.read_bytes()
    raw_rows = list(csv.reader(io.StringIO(INTENTS_RAW.read_text(encoding="utf-8"), newline="")))
    assert sum(len(r) == 1 for r in raw_rows) == 87  # the README's count of stuffed rows
    assert len(raw_rows) - cleaned.count(b"\n") == 8  # and of dropped greeting rows


def test_registry_entries_end_to_end_over_http(http_root: tuple[Path, str], tmp_path: Path) -> None:
    """Both real entries, served locally: the raw Bitext file is cleaned, the clothing CSV comes from a zip."""
    require_shared_data()
    if not INTENTS_RAW.is_file():
        pytest.skip(f"{INTENTS_RAW} not found")
    root, base = http_root
    (root / "bitext.csv").write_bytes(INTENTS_RAW.read_bytes())
    out = download("bitext-retail-intents", tmp_path / "data", f"{base}/bitext.csv", progress=False, timeout=5)
    assert out.read_bytes() == INTENTS_CSV.read_bytes()
    assert (out.parent / "bitext_customer_service_intents.raw.csv").read_bytes() == INTENTS_RAW.read_bytes()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.write(CLOTHING_CSV, "Womens Clothing E-Commerce Reviews.csv")
    (root / "clothing.zip").write_bytes(buf.getvalue())
    out = download("womens-clothing-reviews", tmp_path / "data", f"{base}/clothing.zip", progress=False, timeout=5)
    assert out == tmp_path / "data" / "womens-clothing-reviews" / "womens_clothing_ecommerce_reviews.csv"
    assert out.stat().st_size == CLOTHING_CSV.stat().st_size
    assert _leftovers(tmp_path / "data") == [
        "bitext_customer_service_intents.csv",
        "bitext_customer_service_intents.raw.csv",
        "womens_clothing_ecommerce_reviews.csv",
    ]


def test_bitext_raw_checksum_is_checked_before_cleaning(tmp_path: Path) -> None:
    raw = tmp_path / "raw.csv"
    raw.write_bytes(STUFFED)
    with pytest.raises(ChecksumError, match=r"bitext-retail-intents: sha256 mismatch \(download\)"):
        download("bitext-retail-intents", tmp_path / "data", raw.as_uri(), progress=False)
    assert _leftovers(tmp_path / "data") == []


# --- registry and CLI -----------------------------------------------------------------------


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError, match=r"unknown data set 'imdb'; known: bitext-retail-intents, womens-"):
        download("imdb", tmp_path)


def test_registry_pins_commits_and_checksums() -> None:
    for source in DATASETS.values():
        assert source.url.startswith("https://raw.githubusercontent.com/")
        commit = source.url.split("/")[5]
        assert len(commit) == 40 and int(commit, 16) >= 0, source.url
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0


def test_cli_download_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "imdb", "--dir", str(tmp_path)]) == 2
    assert "unknown data set 'imdb'; known: bitext-retail-intents, womens-clothing-reviews" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"x")
    args = ["download", "bitext-retail-intents", "--dir", str(tmp_path / "d"), "--url", bad.as_uri(), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"expected {DATASETS['bitext-retail-intents'].raw_sha256}, received {_sha(b'x')}" in err
    assert _leftovers(tmp_path / "d") == []


def test_cli_download_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_shared_data()
    if not INTENTS_RAW.is_file():
        pytest.skip(f"{INTENTS_RAW} not found")
    args = ["download", "bitext-retail-intents", "--dir", str(tmp_path), "--url", INTENTS_RAW.as_uri(), "--no-progress"]
    assert main(args) == 0
    assert "(sha256 verified)" in capsys.readouterr().out
    assert (tmp_path / "bitext-retail-intents" / INTENTS_CSV.name).read_bytes() == INTENTS_CSV.read_bytes()


def test_cli_help_lists_datasets_with_source_and_licence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    out = capsys.readouterr().out
    for source in DATASETS.values():
        assert source.name in out and source.url in out and source.licence in out
