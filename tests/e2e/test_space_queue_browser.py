"""Two visitors on one Space in real browser pages (#16 item 10): the second sees its live place in the
queue while the first renders, and runs once the first cancels; the per-address limit (here 1 image per
10 minutes) counts the address the proxy appended to X-Forwarded-For, across sessions.

The pages reach the Space through small reverse proxies (one per simulated visitor address) that append
that address to X-Forwarded-For of every request, the websocket's included, as the Spaces proxy does;
that a client-written entry is ignored is tested in tests/test_space_queue.py (Chromium does not send
extra headers on a websocket handshake, so a page cannot forge one here)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from space_helpers import start_streamlit, stop_streamlit

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def limited_space_url(hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: ANN001
    """The tiny-model Space behind one (simulated) proxy, 1 image per address per 10 minutes."""
    env = {
        **os.environ, "HF_ENDPOINT": hub.endpoint, "SD35HUB_SPACE_MODEL": "tiny", "PYTHONUNBUFFERED": "1",
        "SD35HUB_SPACE_PROXY_HOPS": "1", "SD35HUB_SPACE_IMAGES_PER_10MIN_PER_IP": "1",
    }  # fmt: skip
    process, url = start_streamlit(env, tmp_path_factory.mktemp("space-queue") / "streamlit.log")
    yield url
    stop_streamlit(process)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _proxy(upstream: str, client_address: str) -> str:
    """A reverse proxy on a free port that appends `client_address` to X-Forwarded-For of the first request
    of each connection (Streamlit's page loads and its websocket each open their own); returns its URL."""
    host, port = urlsplit(upstream).hostname or "", urlsplit(upstream).port or 80
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
            head += chunk
        request, _, rest = head.partition(b"\r\n\r\n")
        lines = request.split(b"\r\n")
        forwarded = [line for line in lines[1:] if line.lower().startswith(b"x-forwarded-for:")]
        prior = forwarded[0].split(b":", 1)[1].strip() + b", " if forwarded else b""
        lines = [line for line in lines if line not in forwarded]
        lines.append(b"X-Forwarded-For: " + prior + client_address.encode())
        server = socket.create_connection((host, port))
        server.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
        threading.Thread(target=_pipe, args=(server, client), daemon=True).start()
        _pipe(client, server)

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def _visitor(browser, url: str, address: str):  # noqa: ANN001, ANN202
    """A page whose requests reach the Space through a proxy that says they came from `address`."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(_proxy(url, address))
    expect(page.get_by_role("button", name="Generate")).to_be_visible()
    return page


def _generate(page, steps: int) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    steps_box = page.get_by_label("Steps", exact=True)
    steps_box.fill(str(steps))
    steps_box.press("Enter")  # a number box applies on Enter: wait for the server to have it
    expect(steps_box).to_have_value(str(steps))
    page.get_by_role("button", name="Generate").click()


def test_queue_position_cancel_and_the_per_address_limit(chromium_browser, limited_space_url: str) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    first = _visitor(chromium_browser, limited_space_url, "203.0.113.7")
    second = _visitor(chromium_browser, limited_space_url, "198.51.100.1")
    _generate(first, 80)
    expect(first.get_by_test_id("stProgress")).to_contain_text("s left")  # the first one renders ...
    _generate(second, 1)
    expect(second.get_by_test_id("stProgress")).to_contain_text("Waiting: 1 image(s) ahead of yours")  # ... live
    if os.environ.get("SD35HUB_UPDATE_SCREENSHOT") == "1":  # docs/images/space-queue.png (docs/space.md)
        from PIL import Image

        target = Path(__file__).resolve().parents[2] / "docs" / "images" / "space-queue.png"
        second.get_by_test_id("stProgress").locator("xpath=../..").screenshot(path=str(target))
        with Image.open(target) as image:
            quantized = image.convert("RGB").quantize(colors=256)
        quantized.save(target, optimize=True)
    first.get_by_role("button", name="Cancel").click()
    expect(first.get_by_text("Cancelled: no image was made.")).to_be_visible()
    expect(second.get_by_test_id("stImage").filter(has_text="seed")).to_have_count(1)  # its turn came

    # A third session from the second one's address: over that address's limit of 1 (another session,
    # so the per-session limit is not what refuses it); the first address's cancelled run counted too.
    third = _visitor(chromium_browser, limited_space_url, "198.51.100.1")
    _generate(third, 1)
    expect(third.get_by_test_id("stAlert").filter(has_text="from your network address")).to_have_count(1)
    assert third.get_by_test_id("stImage").filter(has_text="seed").count() == 0
    _generate(first, 1)
    expect(first.get_by_test_id("stAlert").filter(has_text="from your network address")).to_have_count(1)
    for page in (first, second, third):
        page.context.close()
