"""The Space container's entry point: put the caches on the persistent disk when one is mounted, load the
first base into memory and download the others at once (not when the first visitor arrives), then run
Streamlit in this same process.

    python -m sd35hub.frontends.space.start streamlit run space/app.py --server.port 8501 ...   (space/Dockerfile)

* Persistent storage: Hugging Face Spaces mount it at /data (`SD35HUB_SPACE_DATA` moves it; an empty
  value turns this off). When that folder exists and is writable, HF_HOME and SD35HUB_CACHE point into it,
  so a restart does not download the bases again.
* Warm-up in memory: a thread of the Streamlit process loads the first offered base into the engine
  registry (`engine(model)`, what space/app.py uses), so the first visitor finds the pipeline loaded.
  Every base is also downloaded by a background process (with the Space's own HF_TOKEN: the bases are
  gated). Failures are logged, never fatal: the app shows visitors its own message.
* A Hub outage at start: with the base in the cache, the loader uses the cached snapshot and logs
  that it did (sd35hub.models.load.model_dir).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sd35hub.blend.engine import BlendEngine

log = logging.getLogger("sd35hub.space")
DATA_ENV = "SD35HUB_SPACE_DATA"
DEFAULT_DATA = "/data"
MAX_ENGINES = 2  # bases held in memory at once (a third evicts the least recently used)

_engines: OrderedDict[str, BlendEngine] = OrderedDict()  # model -> its shared engine, LRU order
_engine_locks: dict[str, threading.Lock] = {}  # one load at a time per model; others wait for it
_registry_lock = threading.Lock()


def storage_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """HF_HOME and SD35HUB_CACHE under the persistent disk when it is mounted and writable, else {}."""
    environ = os.environ if environ is None else environ
    data = environ.get(DATA_ENV, DEFAULT_DATA)
    if not data or not Path(data).is_dir() or not os.access(data, os.W_OK):
        return {}
    return {"HF_HOME": str(Path(data) / "huggingface"), "SD35HUB_CACHE": str(Path(data) / "sd35hub")}


def warm_up() -> int:
    """Download (or build) every base the Space offers; 0 when all are ready, 1 if one failed."""
    from sd35hub.frontends.space.support import available_bases
    from sd35hub.models.load import ALL_COMPONENTS, model_dir, resolve_model

    status = 0
    for base in available_bases():
        try:
            folder = model_dir(resolve_model(base.model), ALL_COMPONENTS)
            log.warning("warm-up: %s ready in %s", base.model, folder)
        except Exception as exc:  # noqa: BLE001 - the app reports it to visitors; here only the log
            log.error("warm-up: %s not ready: %s", base.model, exc)
            status = 1
    return status


def engine(model: str) -> BlendEngine:
    """The one engine of `model` for the whole process (every visitor's session and the warm-up thread);
    loaded on first use, by one caller while the others wait for it."""
    from sd35hub.frontends.space.support import load_engine

    with _registry_lock:
        lock = _engine_locks.setdefault(model, threading.Lock())
    with lock:
        with _registry_lock:
            if model in _engines:
                _engines.move_to_end(model)
                return _engines[model]
        started = time.monotonic()
        loaded = load_engine(model)
        log.warning("engine of %s loaded in %.1f s (process %d)", model, time.monotonic() - started, os.getpid())
        with _registry_lock:
            _engines[model] = loaded
            while len(_engines) > MAX_ENGINES:
                evicted, _ = _engines.popitem(last=False)
                log.warning("engine of %s released (at most %d bases in memory)", evicted, MAX_ENGINES)
        return loaded


def is_loaded(model: str) -> bool:
    with _registry_lock:
        return model in _engines


def warm_in_memory(models: list[str]) -> threading.Thread:
    """Load `models` into the engine registry on a background thread (logged; a failure is not fatal)."""

    def run() -> None:
        for model in models:
            try:
                engine(model)
                log.warning("warm-up: %s is in memory (process %d)", model, os.getpid())
            except Exception as exc:  # noqa: BLE001 - the first visitor gets the app's message
                log.error("warm-up: %s could not be loaded: %s", model, exc)

    thread = threading.Thread(target=run, name="sd35hub-warm-up", daemon=True)
    thread.start()
    return thread


def sign_in_options(environ: Mapping[str, str] | None = None) -> list[str]:
    """Streamlit options for "Sign in with Hugging Face" when the Space has an OAuth app (hf_oauth: true):
    the [auth] secrets written to a private file (sd35hub.frontends.space.oauth); [] without one."""
    import tempfile

    from sd35hub.frontends.space import oauth

    section = oauth.auth_section(environ)
    if section is None:
        log.warning("sign-in with Hugging Face: off (no OAuth app: hf_oauth is not set, or not on Spaces)")
        return []
    path = oauth.write_secrets(section, Path(tempfile.mkdtemp(prefix="sd35hub-space-auth-")) / "secrets.toml")
    log.warning("sign-in with Hugging Face: on (redirect %s, scopes %s)", section["redirect_uri"],
                section["client_kwargs"]["scope"])  # fmt: skip
    return ["--secrets.files", str(path)]


def main(argv: list[str]) -> None:
    os.environ.update(storage_env())
    logging.basicConfig(level=logging.INFO)
    if argv and argv[0] == "--warm-up":
        raise SystemExit(warm_up())
    if not argv:
        raise SystemExit("usage: python -m sd35hub.frontends.space.start [--warm-up | COMMAND ...]")
    # The blend widgets pass `value=` and are also set through st.session_state (space/app.py says why).
    os.environ.setdefault("STREAMLIT_GLOBAL_DISABLE_WIDGET_STATE_DUPLICATION_WARNING", "true")
    subprocess.Popen([sys.executable, "-m", "sd35hub.frontends.space.start", "--warm-up"])  # noqa: S603
    if argv[:2] != ["streamlit", "run"]:
        os.execvp(argv[0], argv)  # noqa: S606 - another command replaces this process
    argv = [*argv, *sign_in_options()]
    from sd35hub.frontends.space.support import available_bases

    warm_in_memory([available_bases()[0].model])  # the first base: loaded in this, the server's, process
    from streamlit.web import cli

    sys.argv = argv
    cli.main()  # Streamlit runs in this process (its signal handlers in the main thread)


if __name__ == "__main__":  # pragma: no cover
    # Through the importable module, not this `__main__` copy: the engine registry must be the one that
    # space/app.py imports (`sd35hub.frontends.space.start`), or the warm-up would load a second engine.
    from sd35hub.frontends.space.start import main as _main

    _main(sys.argv[1:])
