"""The shopping-guide page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A real uvicorn server on 127.0.0.1 serves a tiny merged export; the browser types a review,
submits, and the label shown must be /predict's label for the same text. Screenshot:
``results/serve_page.png``. Skipped when Playwright or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A uvicorn server in a thread on a free 127.0.0.1 port, serving a tiny merged export."""
    import uvicorn

    from lorafed.config import DataConfig
    from lorafed.serve.export import export_adapter
    from lorafed.serve.http import create_app
    from tests.helpers_adapter import random_adapter

    out = tmp_path_factory.mktemp("page") / "merged"
    data = DataConfig(path="x.csv", text_column="review", label_column="label", max_length=32)
    export_adapter(random_adapter(tiny_model_dir, seed=11), out, str(tiny_model_dir), data=data)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(out), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_page_shows_the_label_that_predict_gives(server_url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    text = "I love this dress, the fabric is soft and the color is beautiful"
    req = urllib.request.Request(
        f"{server_url}/predict",
        data=json.dumps({"texts": [text]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as res:
        expected = json.loads(res.read())["predictions"][0]
    shot = ROOT / "results" / "serve_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(server_url) else outside.append(r.url))
            page.goto(server_url + "/", wait_until="networkidle")
            page.fill("#text", text)
            page.click("#submit")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            shown = page.inner_text("#label").strip()
            bars = page.eval_on_selector_all(".bar", "els => els.map(e => e.getAttribute('data-label'))")
            widths = page.eval_on_selector_all(".bar .fill", "els => els.map(e => parseFloat(e.style.width))")
            highlighted = page.eval_on_selector_all("#words span.w", "els => els.map(e => e.textContent)")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shown == expected["label"]
    assert bars == list(expected["probabilities"])
    for lab, w in zip(bars, widths, strict=True):
        assert w == pytest.approx(100 * expected["probabilities"][lab], abs=0.06)
    assert {"love", "dress", "fabric"} <= {h.lower() for h in highlighted}
    assert outside == []  # no external assets
    assert shot.read_bytes()[:4] == b"\x89PNG"
