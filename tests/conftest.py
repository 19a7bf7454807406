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
