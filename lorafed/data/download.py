"""Download the public data sets of lorafed's configs, pinned to a commit and verified by sha256.

Each :class:`DatasetSource` names where a file comes from (a URL pinned to one commit, so the
bytes cannot change under us), the sha256 of the final file, and its licence and citation.
:func:`download` streams the file to a temporary name, extracts a zip member or cleans a CSV
when the source needs it, checks the sha256, and only then renames the result into place: a
file at the final path is always the verified one.

The layout mirrors ``../shared/data`` (``DIR/<folder>/<file>``), so ``--dir ../shared/data``
puts the files where ``configs/*.yaml`` look for them.

Why one module over 300 lines: the pinned sources, checksums and the streaming download
with its error messages are one concern; most of the length is the data sets' descriptions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorafed.errors import LorafedError
from lorafed.files import atomic_write_bytes
from lorafed.progress import progress_bar

CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT_S = 60.0
# Both sources are under 10 MB; a server sending 50x that is not the source we pinned.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
USER_AGENT = "lorafed-download/0.1 (python urllib)"


class DatasetError(LorafedError):
    """A data set cannot be fetched, extracted, cleaned or verified."""


class UnknownDatasetError(DatasetError):
    """The name is not in the registry; the message lists the known names."""


class DownloadError(DatasetError):
    """The transfer failed (network, HTTP status, timeout, size limit, bad archive)."""


class ChecksumError(DatasetError):
    """A file's sha256 differs from the pinned one. The bad file has been removed.

    Attributes:
        expected: The pinned sha256.
        actual: The sha256 of what was received (after extraction/cleaning when ``stage`` says so).
        url: Where the bytes came from.
        stage: Which file was checked (``"download"``, ``"zip member NAME"``, ``"cleaned"``).
    """

    def __init__(self, name: str, stage: str, expected: str, actual: str, url: str) -> None:
        self.name, self.stage, self.expected, self.actual, self.url = name, stage, expected, actual, url
        super().__init__(
            f"{name}: sha256 mismatch ({stage}) for {url}: expected {expected}, received {actual}; "
            "the file was removed (a changed or corrupted source, or a wrong --url)"
        )


@dataclass(frozen=True)
class CsvCleaning:
    """How a downloaded CSV is repaired before it is used.

    Attributes:
        resplit_stuffed_rows: Re-parse rows that hold the whole record as one quoted field
            (``"a,""b, c"",d"``) into their columns.
        drop_values: ``(column, values)`` pairs: rows whose stripped value in ``column`` is one of
            ``values`` are dropped.
        lineterminator: Line ending of the written file (fields are quoted only when needed).
    """

    resplit_stuffed_rows: bool = False
    drop_values: tuple[tuple[str, tuple[str, ...]], ...] = ()
    lineterminator: str = "\n"


@dataclass(frozen=True)
class DatasetSource:
    """One downloadable data set.

    Attributes:
        name: Registry key, also the sub-folder of the destination (as in ``../shared/data``).
        filename: The final file's name.
        url: Source URL, pinned to a commit.
        sha256: sha256 of the final file (after extraction and cleaning).
        licence: Licence of the data.
        citation: How to cite it.
        description: One line for ``--help``.
        archive_member: For a zip source, the member to extract (matched on its base name). If the
            archive has no such member but exactly one ``.csv``, that one is taken; the sha256
            check decides whether it is the right file.
        raw_sha256: For a cleaned source, the sha256 of the file as downloaded.
        raw_filename: For a cleaned source, the name the as-downloaded file is kept under.
        cleaning: How to clean the downloaded CSV, if it needs it.
    """

    name: str
    filename: str
    url: str
    sha256: str
    licence: str
    citation: str
    description: str
    archive_member: str | None = None
    raw_sha256: str | None = None
    raw_filename: str | None = None
    cleaning: CsvCleaning | None = None


_CLOTHING_COMMIT = "31a3d4bdcaf1499e4a8bfc74d4b935280a616d91"
_BITEXT_COMMIT = "204ba9f9098c28bcf3b2bfc4d46ce3ec86f9204e"

DATASETS: dict[str, DatasetSource] = {
    s.name: s
    for s in (
        DatasetSource(
            name="womens-clothing-reviews",
            filename="womens_clothing_ecommerce_reviews.csv",
            url=(
                "https://raw.githubusercontent.com/MichalSzopinski00/The-Best-Classifier/"
                f"{_CLOTHING_COMMIT}/womens-ecommerce-clothing-reviews.zip"
            ),
            archive_member="Womens Clothing E-Commerce Reviews.csv",
            sha256="bd93cc515747ad1f87b8bc863c9e40da758509e6db6506a96d06976e61e36ee0",
            licence="CC0 1.0 (public domain), as distributed on Kaggle",
            citation=(
                "Nick Brooks (2018). Women's E-Commerce Clothing Reviews. Kaggle, "
                "nicapotato/womens-ecommerce-clothing-reviews."
            ),
            description="23,486 reviews of an online women's clothing retailer (rating, recommended, department)",
        ),
        DatasetSource(
            name="bitext-retail-intents",
            filename="bitext_customer_service_intents.csv",
            url=(
                f"https://raw.githubusercontent.com/sanayech/finalproject/{_BITEXT_COMMIT}/"
                "Bitext_Sample_Customer_Service_Training_Dataset.csv"
            ),
            raw_sha256="f351ffcd09b36b01f01fdf2f59722ab2a6b5ff98d27ff63b87015200c3073dbf",
            raw_filename="bitext_customer_service_intents.raw.csv",
            sha256="ea4a502779557a81c5395305a82b499fe616f7bc2839d08b0f36e23528f597bb",
            # The copy's author stuffed 87 records into one quoted field and appended 8 greeting
            # rows (categories HELLO, BYE, SOFT) that are not part of Bitext's sample.
            cleaning=CsvCleaning(
                resplit_stuffed_rows=True,
                drop_values=(("category", ("HELLO", "BYE", "SOFT")),),
            ),
            licence="Bitext sample data, free use with attribution (believed CDLA-Sharing-1.0)",
            citation="Bitext Innovations. Bitext Sample Customer Service Training Dataset. https://www.bitext.com",
            description="8,175 shopper utterances, 27 customer-service intents in 11 categories",
        ),
    )
}


def get_dataset(name: str) -> DatasetSource:
    """The registry entry for ``name``.

    Raises:
        UnknownDatasetError: ``name`` is not registered (the message lists the known names).
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    name: str,
    dest_dir: str | Path,
    url: str | None = None,
    *,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Download, verify and place the registered data set ``name`` (see :func:`fetch`)."""
    return fetch(get_dataset(name), dest_dir, url, progress=progress, timeout=timeout, max_bytes=max_bytes)


def fetch(
    source: DatasetSource,
    dest_dir: str | Path,
    url: str | None = None,
    *,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Download ``source`` into ``dest_dir/<name>/<filename>`` and verify its sha256.

    A final file already there with the right sha256 is kept and nothing is downloaded.

    Args:
        source: What to fetch.
        dest_dir: Root folder; the file goes to its ``source.name`` sub-folder.
        url: A mirror to use instead of ``source.url`` (http(s) or file://); same checks apply.
        progress: Show a progress bar (on a terminal only, see :mod:`lorafed.progress`).
        timeout: Seconds to wait for a connection or for the next bytes.
        max_bytes: Refuse a download larger than this.

    Returns:
        The path of the verified file.

    Raises:
        DownloadError: The transfer or the archive failed.
        ChecksumError: A sha256 differs from the pinned one (nothing is left at the final path).
        DatasetError: The CSV cannot be cleaned as the source says.
    """
    folder = Path(dest_dir) / source.name
    final = folder / source.filename
    if final.is_file() and sha256_file(final) == source.sha256:
        return final
    src_url = url or source.url
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _temp_path(folder, source.filename) as fetched:
            got = _stream(src_url, fetched, desc=source.name, progress=progress, timeout=timeout, max_bytes=max_bytes)
            _place(source, fetched, got, final, src_url, max_bytes)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # leave no empty folder behind a failed first download
        raise
    return final


def _place(source: DatasetSource, fetched: Path, got: str, final: Path, url: str, max_bytes: int) -> None:
    """Extract, clean and verify the downloaded ``fetched`` (sha256 ``got``), then rename it to ``final``."""
    if source.archive_member is not None:
        with _temp_path(final.parent, final.name) as member:
            name = _extract_member(fetched, source.archive_member, member, url, max_bytes)
            _check(source, f"zip member {name!r}", source.sha256, sha256_file(member), url)
            os.replace(member, final)
    elif source.cleaning is not None:
        _check(source, "download", source.raw_sha256 or got, got, url)
        cleaned = clean_csv(fetched.read_bytes(), source.cleaning, source=url)
        _check(source, "cleaned", source.sha256, hashlib.sha256(cleaned).hexdigest(), url)
        if source.raw_filename:
            os.replace(fetched, final.parent / source.raw_filename)
        atomic_write_bytes(final, cleaned)
    else:
        _check(source, "download", source.sha256, got, url)
        os.replace(fetched, final)


def clean_csv(raw: bytes, cleaning: CsvCleaning, source: str = "<csv>") -> bytes:
    """Apply :class:`CsvCleaning` to UTF-8 CSV bytes and return the cleaned CSV bytes.

    Rows keep their order; fields are quoted only where needed (Python's ``csv`` minimal quoting).

    Raises:
        DatasetError: A drop column is not in the header, or a row (after re-splitting) does not
            have as many fields as the header.
    """
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{source}: not a UTF-8 CSV file: {exc}") from exc
    if not rows:
        raise DatasetError(f"{source}: empty CSV file")
    header, body = rows[0], rows[1:]
    drops: list[tuple[int, frozenset[str]]] = []
    for column, values in cleaning.drop_values:
        if column not in header:
            raise DatasetError(f"{source}: column {column!r} to clean is not in the header {header}")
        drops.append((header.index(column), frozenset(values)))
    out = [header]
    for number, row in enumerate(body, start=1):
        if cleaning.resplit_stuffed_rows and len(row) == 1 and len(header) > 1:
            row = next(csv.reader([row[0]]), [])
        if len(row) != len(header):
            raise DatasetError(f"{source}: row {number} has {len(row)} fields, expected {len(header)}: {row}")
        if any(row[i].strip() in values for i, values in drops):
            continue
        out.append(row)
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator=cleaning.lineterminator).writerows(out)
    return buf.getvalue().encode("utf-8")


def _check(source: DatasetSource, stage: str, expected: str, actual: str, url: str) -> None:
    if actual != expected:
        raise ChecksumError(source.name, stage, expected, actual, url)


@contextmanager
def _temp_path(folder: Path, name: str) -> Iterator[Path]:
    """A temporary file name next to the destination, removed on exit unless renamed away."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    os.close(fd)
    path = Path(tmp)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _stream(url: str, dest: Path, *, desc: str, progress: bool, timeout: float, max_bytes: int) -> str:
    """Stream ``url`` into ``dest`` (fsynced) and return its sha256."""
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as fh:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise DownloadError(f"{url}: server announces {total:,} bytes, more than the limit {max_bytes:,}")
            received = 0
            with progress_bar(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, enabled=progress
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    received += len(chunk)
                    if received > max_bytes:
                        raise DownloadError(f"{url}: more than {max_bytes:,} bytes received; aborted")
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(f"{url}: connection closed after {received:,} of {total:,} bytes")
            fh.flush()
            os.fsync(fh.fileno())
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: cannot connect: {exc.reason}") from exc
    except TimeoutError as exc:
        raise DownloadError(f"{url}: no data for {timeout:g} s (timed out)") from exc
    except ValueError as exc:  # urllib's "unknown url type"
        raise DownloadError(f"{url}: not a URL lorafed can download: {exc}") from exc
    except OSError as exc:
        raise DownloadError(f"{url}: download failed: {exc}") from exc
    return digest.hexdigest()


def _extract_member(archive: Path, member: str, dest: Path, url: str, max_bytes: int) -> str:
    """Copy the zip member whose base name is ``member`` (or the only ``.csv``) to ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            files = [i for i in zf.infolist() if not i.is_dir()]
            matches = [i for i in files if Path(i.filename).name == member]
            if not matches:
                matches = [i for i in files if i.filename.lower().endswith(".csv")]
            if len(matches) != 1:
                names = ", ".join(repr(i.filename) for i in files) or "none"
                raise DownloadError(f"{url}: zip has no single member {member!r} (members: {names})")
            info = matches[0]
            written = 0
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise DownloadError(f"{url}: zip member {info.filename!r} exceeds {max_bytes:,} bytes")
                    out.write(chunk)
            return info.filename
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{url}: not a zip archive: {exc}") from exc
