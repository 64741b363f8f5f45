"""Load test of ``lorafed.serve.http``: a real server on 127.0.0.1, a real HTTP client, bounded.

Starts ``serve(MODEL)`` in a subprocess on a free port, waits for ``/health``, sends ``--requests``
``/predict`` requests from ``--concurrency`` client threads (stopping early after ``--max-seconds``),
then stops the server with SIGTERM and checks that it exits cleanly. Prints (and with ``--out``
writes as JSON) throughput, latency percentiles, status counts and the server's batch count.

Example::

    python scripts/bench_serve.py --model exported/ --requests 400 --concurrency 16 --texts-per-request 2
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

TEXTS = [
    "love this soft dress, fits perfectly",
    "awful itchy fabric, returned it the next day",
    "the color is okay but the size runs small",
    "do you have this top in a larger size?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Run the load test; returns 0 when every request succeeded and the server stopped cleanly."""
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="merged export directory")
    ap.add_argument("--requests", type=int, default=200, help="total /predict requests (default 200)")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.texts_per_request < 1:
        ap.error("--requests, --concurrency and --texts-per-request must be >= 1")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    code = f"from lorafed.serve.http import serve; serve({args.model!r}, port={port}, log_level='warning')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                print(f"server exited with {proc.returncode} before answering", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server did not become healthy within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)

        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        lock = threading.Lock()
        counter = iter(range(args.requests))
        stop_at = time.monotonic() + args.max_seconds

        def worker() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                while time.monotonic() < stop_at:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(args.texts_per_request)]
                    t0 = time.perf_counter()
                    try:
                        status = str(client.post("/predict", json={"texts": texts}).status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        statuses[status] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        health = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    lat = np.array(latencies) * 1000
    result = {
        "requests": len(latencies),
        "concurrency": args.concurrency,
        "texts_per_request": args.texts_per_request,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
        "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 2) for q in ("p50", "p95", "p99")}
        if len(lat)
        else {},
        "statuses": dict(statuses),
        "server_batches": health.get("batches"),
        "sigterm_exit_code": rc,  # -15: graceful shutdown, then uvicorn re-raised SIGTERM
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    clean = rc in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal
    return 0 if clean and set(statuses) == {"200"} else 1


if __name__ == "__main__":
    sys.exit(main())
