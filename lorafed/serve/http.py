"""HTTP serving of a merged export: ``POST /predict``, ``GET /health``, ``GET /metadata``, a page at ``/``.

Requests are gathered into micro-batches: each ``/predict`` request becomes one job on a bounded
asyncio queue, and a single worker task takes jobs until they hold ``max_batch`` texts or
``max_wait_ms`` has passed, runs the model once per batch (in a thread, so the event loop keeps
accepting requests) and answers every job. A full queue answers 503 at once, a job not answered
within ``request_timeout_s`` answers 504: a request never hangs.

Inputs follow the training rule recorded by ``lorafed export`` (``pair`` or ``prefix``), exactly as
:func:`lorafed.serve.infer.predict_proba` applies it. Every limit breach answers a JSON error
naming the limit::

    {"error": {"code": "too_many_texts", "limit": "max_texts", "allowed": 64, "received": 65,
               "message": "..."}}

The model runs on the ``torch`` or ``onnx`` (onnxruntime) backend; ``auto`` (the default) takes
``onnx`` when the export has ``model.onnx`` (``lorafed export --format onnx``) and onnxruntime is
installed. ``GET /metadata`` names the backend in use.

Start it with :func:`serve` (binds 127.0.0.1 by default; uvicorn stops cleanly on SIGTERM/SIGINT).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lorafed.errors import LorafedError
from lorafed.serve.export import EXPORT_INFO
from lorafed.serve.infer import ServingModel, load_serving_model, predict_proba

logger = logging.getLogger("lorafed.serve.http")

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


@dataclass
class _Job:
    texts: list[str]
    pairs: list[str] | None
    explain: bool
    future: asyncio.Future[Any]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The bounded queue and its one worker task (started and stopped by the app's lifespan).

    Args:
        sm: The model.
        limits: Batch size, wait, queue bound.
    """

    def __init__(self, sm: ServingModel, limits: ServeLimits) -> None:
        self.sm, self.limits = sm, limits
        self.queue: asyncio.Queue[_Job] | None = None
        self.task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        """Create the queue and the worker on the running loop."""
        self.queue = asyncio.Queue(maxsize=self.limits.max_queue)
        self.task = asyncio.create_task(self._work(), name="lorafed-predict-worker")

    async def stop(self) -> None:
        """Cancel the worker and fail jobs still queued (503)."""
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RequestError(503, "shutting_down", "the server is stopping"))

    async def submit(self, texts: list[str], pairs: list[str] | None, explain: bool) -> dict[str, Any]:
        """Queue one request and wait for its result.

        Raises:
            RequestError: 503 when the queue is full or the server is stopping, 504 on timeout.
        """
        if self.queue is None or self.task is None or self.task.done():
            raise RequestError(503, "not_ready", "the prediction worker is not running")
        job = _Job(texts, pairs, explain, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise RequestError(
                503,
                "queue_full",
                f"the server is busy: {self.limits.max_queue} requests are waiting; retry later",
                "max_queue",
                self.limits.max_queue,
                self.queue.qsize(),
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.request_timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise RequestError(
                504,
                "timeout",
                f"no answer within {self.limits.request_timeout_s:g} s",
                "request_timeout_s",
                self.limits.request_timeout_s,
                None,
            ) from None

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].texts)
            deadline = time.perf_counter() + self.limits.max_wait_ms / 1000
            while size < self.limits.max_batch:
                wait = deadline - time.perf_counter()
                try:
                    job = self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                jobs.append(job)
                size += len(job.texts)
            jobs = [j for j in jobs if not j.future.done()]  # timed out while queued
            if not jobs:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, jobs)
            except Exception as exc:  # a model failure answers 500 to these jobs; the worker lives on
                logger.exception("prediction batch failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(RequestError(500, "internal", f"prediction failed: {exc}"))
                continue
            self.batches += 1
            for j, res in zip(jobs, results, strict=True):
                if not j.future.done():
                    j.future.set_result(res)

    def run_batch(self, jobs: Sequence[_Job]) -> list[dict[str, Any]]:
        """Probabilities for every job (texts with and without pairs run as separate passes), then attributions.

        Runs in a worker thread; the only place the model is called.
        """
        probs: list[np.ndarray | None] = [None] * len(jobs)
        for with_pairs in (False, True):
            idx = [i for i, j in enumerate(jobs) if (j.pairs is not None) == with_pairs]
            if not idx:
                continue
            texts = [t for i in idx for t in jobs[i].texts]
            pairs = [p for i in idx for p in (jobs[i].pairs or [])] if with_pairs else None
            out = predict_proba(self.sm, texts, pairs, batch_size=self.limits.max_batch)
            start = 0
            for i in idx:
                n = len(jobs[i].texts)
                probs[i] = out[start : start + n]
                start += n
        results = []
        for j, p in zip(jobs, probs, strict=True):
            assert p is not None
            preds = []
            for k, row in enumerate(p):
                top = int(np.argmax(row))
                rec: dict[str, Any] = {
                    "label": self.sm.labels[top],
                    "score": float(row[top]),
                    "probabilities": {lab: float(x) for lab, x in zip(self.sm.labels, row, strict=True)},
                }
                if j.explain:
                    from lorafed.serve.explain import token_attributions

                    pair = j.pairs[k] if j.pairs is not None else None
                    rec["attributions"] = token_attributions(
                        self.sm, j.texts[k], pair, target=top, steps=self.limits.explain_steps
                    )
                preds.append(rec)
            results.append({"predictions": preds})
        return results


def read_export_info(model_dir: str | Path) -> dict[str, Any]:
    """``lorafed_export.json`` of ``model_dir`` (``{}`` when absent or unreadable)."""
    path = Path(model_dir) / EXPORT_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_metadata(model_dir: str | Path, sm: ServingModel, limits: ServeLimits) -> dict[str, Any]:
    """What ``GET /metadata`` answers: labels, base, fingerprints, input rule, federation, limits."""
    info = read_export_info(model_dir)
    cfg_extra = getattr(sm.model.config, "lorafed", None) or {}
    fed = info.get("federation") or {}
    text = dict(sm.text)
    return {
        "labels": list(sm.labels),
        "base_model": info.get("base") or cfg_extra.get("base") or getattr(sm.model.config, "_name_or_path", None),
        "base_fingerprint": info.get("base_fingerprint") or cfg_extra.get("base_fingerprint"),
        "adapter_fingerprint": info.get("adapter_fingerprint") or cfg_extra.get("adapter_fingerprint"),
        "adapter": info.get("adapter"),
        "format": info.get("format", "merged"),
        "dtype": info.get("dtype"),
        "input": {
            "pair_mode": text.get("pair_mode", "pair"),
            "max_length": int(text.get("max_length") or 128),
            "text_column": text.get("text_column"),
            "text_pair_column": text.get("text_pair_column"),
            "pairs": "[text, second text]: second text joined by pair_mode",
        },
        "rounds": fed.get("rounds"),
        "final_metrics": fed.get("final_metrics"),
        "federation": fed or None,
        "parity_max_abs_diff": info.get("max_abs_diff"),
        "backend": sm.backend,
        "onnx_max_abs_diff": info.get("onnx_max_abs_diff"),
        "limits": asdict(limits),
    }


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


def page_html() -> str:
    """The shopping-guide page (``lorafed/serve/page.html``; no external assets)."""
    return importlib.resources.files("lorafed.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    model_dir: str | Path, limits: ServeLimits | None = None, sm: ServingModel | None = None, backend: str = "auto"
) -> FastAPI:
    """Build the FastAPI app serving the merged export at ``model_dir``.

    Args:
        model_dir: A merged export (``lorafed export --format merged|onnx``) or any HF sequence classifier.
        limits: Bounds (defaults: :class:`ServeLimits`).
        sm: An already loaded model (else loaded from ``model_dir``).
        backend: ``auto``, ``torch`` or ``onnx`` when loading (ignored when ``sm`` is given).

    Returns:
        The app; ``app.state.batcher`` is the micro-batcher, ``app.state.model`` the model.

    Raises:
        ModelError: ``model_dir`` is not a servable model (or has no ``model.onnx`` for ``onnx``).
        OnnxError: ``onnx`` without onnxruntime.
    """
    limits = limits or ServeLimits()
    sm = sm or load_serving_model(model_dir, backend)
    batcher = Batcher(sm, limits)
    meta = model_metadata(model_dir, sm, limits)
    page = page_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        logger.info(
            "serving %s (%d labels, %s backend) with limits %s", model_dir, len(sm.labels), sm.backend, asdict(limits)
        )
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="lorafed serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.model, app.state.limits = batcher, sm, limits

    @app.middleware("http")
    async def log_requests(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            logger.info(
                "%s %s %s %d %.1fms",
                request.client.host if request.client else "-",
                request.method,
                request.url.path,
                status,
                (time.perf_counter() - t0) * 1000,
            )

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.task is not None and not batcher.task.done()
        body = {
            "status": "ok" if ok else "unavailable",
            "queued": batcher.queue.qsize() if batcher.queue is not None else 0,
            "max_queue": limits.max_queue,
            "batches": batcher.batches,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metadata")
    async def metadata() -> JSONResponse:
        return JSONResponse(meta)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
                raise _too_large(int(declared), limits)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise _too_large(len(body), limits)
            texts, pairs, explain = parse_predict(bytes(body), limits)
            result = await batcher.submit(texts, pairs, explain)
        except RequestError as err:
            headers = {"Retry-After": "1"} if err.status == 503 else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)
        return JSONResponse({**result, "labels": list(sm.labels)})

    return app


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    limits: ServeLimits | None = None,
    log_level: str = "info",
    backend: str = "auto",
) -> None:
    """Serve ``model_dir`` over HTTP until SIGINT/SIGTERM (uvicorn stops cleanly, finishing open requests).

    Args:
        model_dir: A merged export.
        host: Interface to bind; ``127.0.0.1`` (this machine only) unless told otherwise.
        port: TCP port (0: any free port).
        limits: Bounds (defaults: :class:`ServeLimits`).
        log_level: ``debug``, ``info``, ``warning``...; one ``lorafed.serve.http`` line per request at ``info``.
        backend: ``auto`` (onnx when the export has ``model.onnx`` and onnxruntime imports), ``torch`` or ``onnx``.

    Raises:
        ModelError: ``model_dir`` is not a servable model.
        ServeError: Invalid port.
    """
    import uvicorn

    if not 0 <= int(port) <= 65535:
        raise ServeError(f"port {port} is not in 0..65535")
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise ServeError(f"log level {log_level!r} is not one of debug, info, warning, error")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    app = create_app(model_dir, limits, backend=backend)
    uvicorn.run(app, host=host, port=int(port), access_log=False, log_level=log_level.lower())
