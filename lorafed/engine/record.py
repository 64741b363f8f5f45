"""The run folder every engine writes, with one ``metrics.jsonl`` schema, and resume.

Layout::

    config.yaml                      the resolved config
    metrics.jsonl                    one line per completed round (round 0: the untrained adapter)
    rounds/global_rN.safetensors     the global adapter after N rounds
    rounds/rN/<client>.safetensors   the updates averaged in round N, as received
    rounds/server_opt_rN.safetensors FedAdam/FedYogi moments after round N
    rounds/claims_rN.json            each client's pinned num_examples claim after round N
    summary.json, metrics.png        written at the end

Each global adapter's header records its lineage under ``metrics``: ``run`` (this run's id, kept
across resumes), ``parent_round`` and ``parent`` (the sha256 of the global adapter it was
aggregated from), so ``lorafed inspect --lineage`` can walk a chain back to round 0, across
resumed runs with new clients or data.

Every file goes through a temporary name and a rename, and a round's global adapter is written
before its metrics line, so a line in ``metrics.jsonl`` means the round is complete on disk.

A ``metrics.jsonl`` row has the same keys in every engine (:data:`ROW_KEYS`); scores are
``null`` where the engine has no test rows (a file-drop coordinator, a Flower server without
``server-eval``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorafed.errors import LorafedError
from lorafed.files import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from lorafed.metrics import EvalResult
from lorafed.server.claims import load_claims, save_claims
from lorafed.server.server_opt import ServerOptState, load_server_opt, save_server_opt
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.reader import load_payload

logger = logging.getLogger(__name__)

#: The keys of every ``metrics.jsonl`` row, in every engine.
ROW_KEYS = (
    "round",
    "clients",
    "test_loss",
    "accuracy",
    "macro_f1",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "global_bytes",
    "shares",
    "weight_lowered",
    "update_norms",
    "clipped",
    "rejected",
    "failed",
    "attempts",
    "seconds",
    "record_epsilon",
)


def metrics_row(r: int, scores: EvalResult | None, **fields: Any) -> dict[str, Any]:
    """A ``metrics.jsonl`` row with every key of :data:`ROW_KEYS` (``privacy`` added under DP)."""
    row: dict[str, Any] = {
        "round": r,
        "clients": [],
        "test_loss": scores.loss if scores else None,
        "accuracy": scores.accuracy if scores else None,
        "macro_f1": scores.macro_f1 if scores else None,
        "train_loss": None,
        "bytes_up": 0,
        "bytes_down": 0,
        "global_bytes": 0,
        "shares": {},
        "weight_lowered": {},
        "update_norms": {},
        "clipped": [],
        "rejected": [],
        "failed": [],
        "attempts": 0,
        "seconds": {},
        "record_epsilon": None,
    }
    unknown = set(fields) - set(ROW_KEYS) - {"privacy"}
    if unknown:
        raise ValueError(f"unknown metrics.jsonl keys {sorted(unknown)}")
    row.update(fields)
    row["seconds"] = {k: round(v, 3) for k, v in row["seconds"].items()}
    return row


class RunRecord:
    """The run folder of one federation (see the module docstring).

    Args:
        out: The run folder.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.rows: list[dict[str, Any]] = []
        #: This run's id, written in every global adapter's lineage (kept across resumes).
        self.run_id = uuid.uuid4().hex[:12]

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def global_path(self, r: int) -> Path:
        """Where the global adapter after ``r`` rounds is kept."""
        return self.out / "rounds" / f"global_r{r}.safetensors"

    def server_opt_path(self, r: int) -> Path:
        """Where the server optimizer state after ``r`` rounds is kept."""
        return self.out / "rounds" / f"server_opt_r{r}.safetensors"

    def claims_path(self, r: int) -> Path:
        """Where the clients' pinned claims after ``r`` rounds are kept (see :mod:`lorafed.server.claims`)."""
        return self.out / "rounds" / f"claims_r{r}.json"

    def read_claims(self, r: int) -> dict[str, float]:
        """The clients' pinned claims after round ``r`` (none for a run recorded before they were kept).

        Raises:
            LorafedError: The claims file is malformed.
        """
        return load_claims(self.claims_path(r))

    def fresh(self) -> None:
        """Start from nothing: remove what an earlier run left here."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path.unlink(missing_ok=True)
        (self.out / "summary.json").unlink(missing_ok=True)
        if (self.out / "rounds").exists():
            shutil.rmtree(self.out / "rounds")
        self.rows = []

    def resume(
        self, spec: UpdateSpec, with_server_opt: bool
    ) -> tuple[dict[str, torch.Tensor] | None, ServerOptState | None]:
        """Load the completed rounds; return the last global adapter (``None``: nothing done yet).

        ``metrics.jsonl`` rows must be rounds 0, 1, ..., k and ``rounds/global_rk.safetensors``
        must match ``spec``. Files of rounds after k (an interrupted round) are removed so that
        round is redone from scratch.

        Raises:
            LorafedError: Rounds out of order, or a global adapter missing or not matching the config.
        """
        if not self.metrics_path.is_file():  # killed before round 0 was recorded
            logger.info("%s: no round completed yet; starting from round 0", self.out)
            self.fresh()
            return None, None
        rows = read_metrics(self.metrics_path)
        for i, row in enumerate(rows):
            if row.get("round") != i:
                raise LorafedError(
                    f"{self.metrics_path}: line {i + 1} is round {row.get('round')!r}, expected round {i}"
                )
        if not rows:
            self.fresh()
            return None, None
        last = rows[-1]["round"]
        g_path = self.global_path(last)
        payload = load_payload(g_path)
        validate_update(payload, spec, str(g_path))
        self._remove_rounds_after(last)
        opt = load_server_opt(self.server_opt_path(last)) if with_server_opt and last > 0 else None
        self.rows = rows
        self.run_id = str(payload.meta.metrics.get("run") or self.run_id)
        logger.info("resuming %s after round %d", self.out, last)
        return {k: v.to(torch.float32) for k, v in payload.decoded().items()}, opt

    def write_global(
        self,
        r: int,
        data: bytes,
        server_opt: ServerOptState | None = None,
        claims: Mapping[str, float] | None = None,
    ) -> Path:
        """Keep the global adapter after round ``r`` (and first the server optimizer state and the pinned claims)."""
        if server_opt is not None:
            save_server_opt(self.server_opt_path(r), server_opt)
        if claims is not None:
            save_claims(self.claims_path(r), claims)
        return atomic_write_bytes(self.global_path(r), data)

    def write_updates(self, r: int, payloads: Mapping[str, bytes]) -> None:
        """Keep the updates averaged in round ``r``, named by client id, as received."""
        folder = self.out / "rounds" / f"r{r}"
        if folder.exists():
            shutil.rmtree(folder)
        for cid, data in payloads.items():
            atomic_write_bytes(folder / f"{_safe(cid)}.safetensors", data)

    def append(self, row: dict[str, Any]) -> None:
        """Record a completed round (after its global adapter is on disk)."""
        self.rows.append(row)
        atomic_write_jsonl(self.metrics_path, self.rows)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` and ``metrics.png``; log the table of rounds."""
        from lorafed.plots import plot_rounds

        atomic_write_json(self.out / "summary.json", summary)
        if any(r.get("macro_f1") is not None for r in self.rows):
            plot_rounds(self.rows, self.out / "metrics.png")
            logger.info("\n%s", format_final_table(self.rows))
        return summary

    def _remove_rounds_after(self, last: int) -> None:
        rounds = self.out / "rounds"
        for p in rounds.iterdir() if rounds.exists() else ():
            m = re.fullmatch(r"(?:global_|server_opt_|claims_)?r(\d+)(?:\.safetensors|\.json)?", p.name)
            if m and int(m.group(1)) > last:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _safe(name: str) -> str:
    """A file name from a client id or drop name (no folders, no odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1])[:128] or "_"


def format_final_table(rows: list[dict[str, Any]]) -> str:
    """A text table of the rounds' global metrics."""
    cols = ("round", "clients", "test loss", "accuracy", "macro-F1", "KB up", "seconds")
    head = "  ".join(f"{c:>{w}}" for c, w in zip(cols, (5, 7, 9, 8, 8, 8, 7), strict=True))
    lines = [head, "-" * len(head)]

    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    for row in rows:
        secs = sum(row["seconds"].values())
        lines.append(
            f"{row['round']:>5}  {len(row['clients']):>7}  {num(row['test_loss']):>9}  {num(row['accuracy']):>8}  "
            f"{num(row['macro_f1']):>8}  {row['bytes_up'] / 1024:>8.1f}  {secs:>7.1f}"
        )
    if len(rows) > 1 and rows[-1]["accuracy"] is not None and rows[0]["accuracy"] is not None:
        d_acc = rows[-1]["accuracy"] - rows[0]["accuracy"]
        d_f1 = rows[-1]["macro_f1"] - rows[0]["macro_f1"]
        lines.append(f"final vs round 0: accuracy {d_acc:+.4f}, macro-F1 {d_f1:+.4f}")
    return "\n".join(lines)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl``.

    Raises:
        LorafedError: A line that is not a JSON object (naming the line).
    """
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafedError(f"{path}: line {i} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise LorafedError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def lineage(path: str | Path, search: list[str | Path] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """The chain of global adapters from ``path`` back to its run's round 0 (or as far as files are found).

    Parents are found by their sha256 among the ``.safetensors`` files of ``path``'s folder and of
    ``search`` (each global's header names its parent's digest, see the module docstring).

    Returns:
        ``(file, lineage fields)`` from ``path`` back to the oldest ancestor found.
    """
    from lorafed.wire.payload import payload_digest
    from lorafed.wire.reader import load_payload

    folders = [Path(path).parent, *(Path(d) for d in search or [])]
    by_digest: dict[str, Path] = {}
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            by_digest.setdefault(payload_digest(f.read_bytes()), f)
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None and current not in seen:
        seen.add(current)
        meta = load_payload(current).meta
        fields = {
            "round": meta.round,
            "kind": meta.kind,
            **{k: meta.metrics.get(k) for k in ("run", "parent_round", "parent")},
        }
        chain.append((current, fields))
        parent = meta.metrics.get("parent")
        current = by_digest.get(parent) if isinstance(parent, str) else None
    return chain
