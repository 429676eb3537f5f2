"""Live-server plumbing shared by the browser and client tests (``test_web``, ``test_web_apps``,
``test_docs_clients``) and ``benchmarks/web_demo.py``: the app under uvicorn on 127.0.0.1, a free
port, in a thread; Debian's headless ``/usr/bin/chromium`` (``.ci/chromium.sh``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app: Any, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread; yields its base URL, stops it on exit
    (``RuntimeError`` when it does not start in time)."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def launch_chromium(playwright: Any) -> Any:
    """Headless chromium from a ``sync_playwright()`` context; in tests, a chromium that does
    not start skips (a broken local chromium is an environment problem)."""
    try:
        return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    except Exception as exc:
        import pytest

        pytest.skip(f"chromium does not start: {exc}")
