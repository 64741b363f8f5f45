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
``onnx`` when the export has ``model.onnx`` (``lorafed export`` writes it unless ``--no-onnx``) and
onnxruntime is installed. The start-up log line and ``GET /metadata`` name the backend and why.

Start it with :func:`serve` (binds 127.0.0.1 by default; uvicorn stops cleanly on SIGTERM/SIGINT).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lorafed.serve.batcher import Batcher
from lorafed.serve.export import EXPORT_INFO
from lorafed.serve.infer import ServingModel, load_serving_model
from lorafed.serve.limits import DEFAULT_PORT, RequestError, ServeError, ServeLimits, _too_large, parse_predict
from lorafed.threads import use_threads

logger = logging.getLogger("lorafed.serve.http")


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
        "backend_reason": sm.backend_reason,
        "onnx_max_abs_diff": info.get("onnx_max_abs_diff"),
        "limits": asdict(limits),
    }


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
            "serving %s (%d labels) on the %s backend (%s) with limits %s",
            model_dir,
            len(sm.labels),
            sm.backend,
            sm.backend_reason or "given",
            asdict(limits),
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
    if not logging.getLogger("lorafed").handlers:  # the CLI's handler already shows them: one line per request
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    # This process's share of the cores among the lorafed processes on the machine (torch, and
    # onnxruntime's intra-op pool, which is fixed when its session starts); see lorafed.threads.
    threads = use_threads(0).threads
    app = create_app(model_dir, limits, sm=load_serving_model(model_dir, backend, threads), backend=backend)
    uvicorn.run(app, host=host, port=int(port), access_log=False, log_level=log_level.lower())
