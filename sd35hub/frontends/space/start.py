"""The Space container's entry point: put the caches on the persistent disk when one is mounted, start
downloading the base models at once (not when the first visitor arrives), then run Streamlit.

    python -m sd35hub.frontends.space.start streamlit run space/app.py --server.port 8501 ...   (space/Dockerfile)

* Persistent storage: Hugging Face Spaces mount it at /data (`SD35HUB_SPACE_DATA` moves it; an empty
  value turns this off). When that folder exists and is writable, HF_HOME and SD35HUB_CACHE point into it,
  so a restart does not download the bases again.
* Warm-up: a background process downloads every offered base into the cache (with the Space's own
  HF_TOKEN: the bases are gated) while Streamlit starts; a failure is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("sd35hub.space")
DATA_ENV = "SD35HUB_SPACE_DATA"
DEFAULT_DATA = "/data"


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


def main(argv: list[str]) -> None:
    os.environ.update(storage_env())
    if argv and argv[0] == "--warm-up":
        logging.basicConfig(level=logging.INFO)
        raise SystemExit(warm_up())
    if not argv:
        raise SystemExit("usage: python -m sd35hub.frontends.space.start [--warm-up | COMMAND ...]")
    subprocess.Popen([sys.executable, "-m", "sd35hub.frontends.space.start", "--warm-up"])  # noqa: S603
    os.execvp(argv[0], argv)  # noqa: S606 - Streamlit replaces this process (signals reach it)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
