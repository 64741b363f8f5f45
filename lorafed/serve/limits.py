"""What a request to ``lorafed serve`` may be: the limits, and parsing a /predict body against them.

Every refusal names the limit it hit (413 for size, 422 for shape), so a caller can fix its request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorafed.errors import LorafedError

DEFAULT_PORT = 8000


class ServeError(LorafedError):
    """The server cannot start (bad limits, unloadable model, port in use)."""


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of the HTTP server.

    Attributes:
        max_body_bytes: Largest request body (413 above).
        max_texts: Most texts (or pairs) per request (422 above).
        max_text_chars: Longest text, in characters, each side of a pair (422 above).
        max_explain_texts: Most texts per request with ``explain: true`` (422 above).
        max_batch: Most texts the worker runs in one forward pass.
        max_wait_ms: How long the worker waits for more jobs to fill a batch.
        max_queue: Jobs (requests) waiting for the worker; the next answers 503.
        request_timeout_s: A request not answered in this time answers 504.
        explain_steps: Integration steps of the attributions.
    """

    max_body_bytes: int = 1_000_000
    max_texts: int = 64
    max_text_chars: int = 10_000
    max_explain_texts: int = 4
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 60.0
    explain_steps: int = 16

    def __post_init__(self) -> None:
        bad = [
            f"{name}={getattr(self, name)} must be >= 1"
            for name in ("max_body_bytes", "max_texts", "max_text_chars", "max_batch", "max_queue")
            if getattr(self, name) < 1
        ]
        if self.explain_steps < 2:
            bad.append(f"explain_steps={self.explain_steps} must be >= 2")
        if self.max_explain_texts < 0:
            bad.append(f"max_explain_texts={self.max_explain_texts} must be >= 0")
        if not self.max_wait_ms >= 0:
            bad.append(f"max_wait_ms={self.max_wait_ms} must be >= 0")
        if not self.request_timeout_s > 0:
            bad.append(f"request_timeout_s={self.request_timeout_s} must be > 0")
        if bad:
            raise ServeError("invalid serving limits: " + "; ".join(bad))


class RequestError(Exception):
    """A request the server refuses: HTTP status, machine code, the limit concerned, a message."""

    def __init__(
        self, status: int, code: str, message: str, limit: str | None = None, allowed: Any = None, received: Any = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.allowed, self.received = limit, allowed, received

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            err.update(limit=self.limit, allowed=self.allowed, received=self.received)
        return {"error": err}


def parse_predict(body: bytes, limits: ServeLimits) -> tuple[list[str], list[str] | None, bool]:
    """Validate a ``/predict`` body: ``{"texts": [...]}`` or ``{"pairs": [[a, b], ...]}``, optional ``explain``.

    Raises:
        RequestError: 413 for the body size, 422 for anything else (naming the limit where one applies).
    """
    if len(body) > limits.max_body_bytes:
        raise _too_large(len(body), limits)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(422, "invalid_json", f"the body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(422, "invalid_request", 'the body must be an object: {"texts": [...]} or {"pairs": [...]}')
    unknown = sorted(set(obj) - {"texts", "pairs", "explain"})
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown field(s) {unknown}; expected texts or pairs, explain")
    if ("texts" in obj) == ("pairs" in obj):
        raise RequestError(422, "invalid_request", 'give exactly one of "texts" or "pairs"')
    explain = obj.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(422, "invalid_request", '"explain" must be true or false')
    items = obj.get("texts", obj.get("pairs"))
    key = "texts" if "texts" in obj else "pairs"
    if not isinstance(items, list) or not items:
        raise RequestError(422, "invalid_request", f'"{key}" must be a non-empty list')
    if len(items) > limits.max_texts:
        raise RequestError(
            422,
            "too_many_texts",
            f"{len(items)} {key} in one request; at most {limits.max_texts} (max_texts)",
            "max_texts",
            limits.max_texts,
            len(items),
        )
    if explain and len(items) > limits.max_explain_texts:
        raise RequestError(
            422,
            "too_many_explanations",
            f"explain on {len(items)} texts; at most {limits.max_explain_texts} (max_explain_texts)",
            "max_explain_texts",
            limits.max_explain_texts,
            len(items),
        )
    texts: list[str] = []
    pairs: list[str] | None = None if key == "texts" else []
    for i, item in enumerate(items):
        if key == "texts":
            parts = [item]
        elif isinstance(item, list) and len(item) == 2:
            parts = item
        else:
            raise RequestError(422, "invalid_request", f"pairs[{i}] must be a [text, second text] list")
        for part in parts:
            if not isinstance(part, str):
                raise RequestError(422, "invalid_request", f"{key}[{i}] must hold strings")
            if len(part) > limits.max_text_chars:
                raise RequestError(
                    422,
                    "text_too_long",
                    f"{key}[{i}] has {len(part)} characters; at most {limits.max_text_chars} (max_text_chars)",
                    "max_text_chars",
                    limits.max_text_chars,
                    len(part),
                )
        if not parts[0].strip():
            raise RequestError(422, "empty_text", f"{key}[{i}] is empty")
        texts.append(parts[0])
        if pairs is not None:
            pairs.append(parts[1])
    return texts, pairs, explain


def _too_large(size: int, limits: ServeLimits) -> RequestError:
    return RequestError(
        413,
        "body_too_large",
        f"the body has {size} bytes; at most {limits.max_body_bytes} (max_body_bytes)",
        "max_body_bytes",
        limits.max_body_bytes,
        size,
    )
