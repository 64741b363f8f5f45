"""Partitioning: deal row positions to clients (natural column, IID, or Dirichlet label skew).

Each scheme is a pure function of the labels (or a column), the settings and a seed, and
returns row positions; the same seed always gives the same clients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from lorafed.data.clean import LabeledData
from lorafed.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lorafed.config import PartitionConfig

#: How rows are dealt to clients.
Scheme = Literal["natural", "iid", "dirichlet"]

_MAX_DIRICHLET_DRAWS = 1000


@dataclass(frozen=True)
class Partition:
    """Clients and their row positions.

    Attributes:
        client_ids: One id per client, safe to use in file names.
        indices: Row positions of each client, sorted.
        notes: What was left out and why (rows without a partition value, tiny groups).
    """

    client_ids: list[str]
    indices: list[np.ndarray]
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> list[int]:
        """Number of rows of each client."""
        return [len(i) for i in self.indices]


def partition_columns(cfg: PartitionConfig) -> list[str]:
    """The data columns a partition needs besides text and label (the natural scheme's column)."""
    return [cfg.column] if cfg.scheme == "natural" and cfg.column else []


def partition(data: LabeledData, cfg: PartitionConfig, seed: int) -> Partition:
    """Deal the rows of ``data`` to clients according to ``cfg``.

    Raises:
        DataError: The natural column is missing from ``data.columns`` or leaves no client.
        ConfigError: More clients than rows, or no Dirichlet draw meets ``min_client_size``.
    """
    if cfg.scheme == "natural":
        if cfg.column is None or cfg.column not in data.columns:
            raise DataError("partition column was not loaded", path=data.path, field=cfg.column)
        return natural_partition(data.columns[cfg.column], cfg.min_client_size, data.path, cfg.column)
    if cfg.scheme == "iid":
        return iid_partition(len(data), cfg.num_clients, seed)
    if cfg.scheme == "dirichlet":
        return dirichlet_partition(data.labels, cfg.num_clients, cfg.alpha, cfg.min_client_size, seed)
    raise ConfigError([f"partition.scheme: unknown scheme {cfg.scheme!r}"])  # pragma: no cover


def natural_partition(values: np.ndarray, min_size: int, path: str = "", column: str | None = None) -> Partition:
    """One client per distinct value; rows without a value and groups below ``min_size`` are left out."""
    notes: list[str] = []
    missing = np.array([v is None for v in values])
    if missing.any():
        notes.append(f"{int(missing.sum())} rows with no {column!r} value left out")
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        if v is not None:
            groups.setdefault(str(v), []).append(i)
    ids: list[str] = []
    indices: list[np.ndarray] = []
    used: set[str] = set()
    for value in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        rows = groups[value]
        if len(rows) < min_size:
            notes.append(f"group {value!r} has {len(rows)} rows < min_client_size {min_size}; left out")
            continue
        cid = _client_id(value, used)
        ids.append(cid)
        indices.append(np.array(rows, dtype=np.int64))
    if not ids:
        raise DataError(f"no group has at least {min_size} rows", path=path, field=column)
    return Partition(ids, indices, notes)


def iid_partition(n_rows: int, num_clients: int, seed: int) -> Partition:
    """Shuffle all rows with ``seed`` and cut them into ``num_clients`` near-equal parts."""
    if num_clients > n_rows:
        raise ConfigError([f"partition.num_clients: {num_clients} clients but only {n_rows} rows"])
    perm = np.random.default_rng(seed).permutation(n_rows)
    parts = np.array_split(perm, num_clients)
    return Partition([f"client{i}" for i in range(num_clients)], [np.sort(p) for p in parts])


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int) -> Partition:
    """Label skew: for each class, split its rows over clients in Dir(alpha) proportions.

    Draws are repeated (from the same seeded generator) until every client holds at least
    ``min_size`` rows, so the result stays deterministic for a seed.
    """
    labels = np.asarray(labels)
    if num_clients * min_size > len(labels):
        raise ConfigError(
            [f"partition: {num_clients} clients x min_client_size {min_size} exceeds the {len(labels)} rows"]
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for k, part in enumerate(np.split(rows, cuts)):
                buckets[k].append(part)
        indices = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(i) for i in indices) >= min_size:
            return Partition([f"client{i}" for i in range(num_clients)], indices)
    raise ConfigError(
        [
            f"partition: no Dirichlet(alpha={alpha}) draw in {_MAX_DIRICHLET_DRAWS} gave every one of "
            f"{num_clients} clients >= {min_size} rows; raise alpha or lower min_client_size"
        ]
    )


def _client_id(value: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-.") or "client"
    cid, k = base, 2
    while cid in used:
        cid, k = f"{base}-{k}", k + 1
    used.add(cid)
    return cid


def client_table(part: Partition, labels: np.ndarray, label_names: tuple[str, ...], max_label_columns: int = 8) -> str:
    """A text table of client sizes and label histograms.

    With up to ``max_label_columns`` labels there is one column per label; with more, the
    number of distinct labels and the most common one are shown.
    """
    wide = len(label_names) <= max_label_columns
    head = ["client", "rows"] + ([str(n) for n in label_names] if wide else ["labels", "top label (rows)"])
    body: list[list[str]] = []
    for cid, idx in zip(part.client_ids, part.indices, strict=True):
        counts = np.bincount(labels[idx], minlength=len(label_names))
        if wide:
            cells = [str(int(c)) for c in counts]
        else:
            top = int(np.argmax(counts))
            cells = [str(int((counts > 0).sum())), f"{label_names[top]} ({int(counts[top])})"]
        body.append([cid, str(len(idx)), *cells])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in body]
    lines += [f"note: {n}" for n in part.notes]
    return "\n".join(lines)
