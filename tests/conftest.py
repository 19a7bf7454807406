"""Test-session setup. Runs before any test module imports huggingface_hub or datasets.

Everything is offline: the Hub is the local test server in tests/hubserver (HF_ENDPOINT points at
it), caches live in a per-session temp dir, and the tiny SD3.5 model is built into SD35HUB_CACHE.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="sd35hub-tests-"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# HF_ENDPOINT is read when huggingface_hub is imported (datasets copies it): set it now, before any
# test module imports them. The hub fixture starts the local server on this port.
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_DIR / "hf_datasets")
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_DATASETS_OFFLINE", None)
os.environ["SD35HUB_CACHE"] = str(_SESSION_DIR / "sd35hub_cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# --- local Hub test server (tests/hubserver, docs/testing.md) -------------------------------------
# Fixed tokens so they are known before the server starts; HF_TOKEN makes alice's write token the one
# huggingface_hub resolves by itself (no patching of the client).
from hub_tokens import HUB_ORG, HUB_OTHER_TOKEN, HUB_READ_TOKEN, HUB_TOKEN  # noqa: E402

os.environ["HF_TOKEN"] = HUB_TOKEN

import pytest  # noqa: E402
from hubserver import HubServer  # noqa: E402


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The local Hub on HF_ENDPOINT: users alice (HUB_TOKEN, member of sd35hub-org) and bob."""
    server = HubServer.start(HUB_PORT, HUB_TOKEN, HUB_READ_TOKEN, HUB_OTHER_TOKEN, org=HUB_ORG)
    yield server
    server.stop()


@pytest.fixture
def hub_faults(hub: HubServer) -> HubServer:
    """The local Hub, with every injected fault removed (and hanging requests ended) after the test."""
    hub.clear_faults()
    yield hub
    hub.clear_faults()


@pytest.fixture(scope="session")
def hub_datasets(hub: HubServer) -> dict[str, str]:
    """Two seeded dataset repos (6 generated images each, mixed sizes, captions), by layout:
    "parquet" (naruto-blip-captions style: image + text columns) and "imagefolder" (PNG + metadata.jsonl)."""
    from hubserver.seed_data import seed_imagefolder_dataset, seed_naruto_dataset

    repos = {"parquet": f"{HUB_ORG}/naruto-style-captions", "imagefolder": f"{HUB_ORG}/imagefolder-captions"}
    seed_naruto_dataset(hub, repos["parquet"])
    seed_imagefolder_dataset(hub, repos["imagefolder"])
    return repos


@pytest.fixture(autouse=True)
def _own_data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty run cache (latents/embeddings, base grids: sd35hub.data.cache_key), so
    a test that counts encoder loads never sees another test's cache; tests about reuse run twice inside one test."""
    monkeypatch.setenv("SD35HUB_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))
