"""An OS or network failure is worded as its typed error by every front end (sd35hub.failures.typed_error):
the CLI's one line and exit code, the notebook's error display, the Space's visitor message."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import requests

from sd35hub.errors import DiskFullError, FileWriteError, HubRequestError
from sd35hub.failures import typed_error

ROOT = Path(__file__).resolve().parents[1]


def _disk_full(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except Exception as final:
        return final


def _unreachable() -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries")


def test_typed_error_in_core() -> None:
    full = typed_error(_chained(RuntimeError("save failed"), _disk_full("/data/out/adapter.safetensors")))
    assert isinstance(full, DiskFullError) and full.path == "/data/out/adapter.safetensors"
    assert isinstance(typed_error(PermissionError(errno.EACCES, "Permission denied", "/root/x")), FileWriteError)
    net = typed_error(_unreachable())
    assert isinstance(net, HubRequestError) and "Could not reach the Hub at " in net.message
    assert "ConnectionError: HTTPSConnectionPool" in net.message
    plain = ValueError("boom")
    assert typed_error(plain) is plain and typed_error(full) is full


def test_the_cli_words_them() -> None:
    from sd35hub.frontends.cli import format_error

    message, code = format_error(_disk_full("/data/out/a.png"))
    assert code == 13 and message.startswith("Error: No space left on /data/out/a.png") and "Free some space" in message
    message, code = format_error(_unreachable())
    assert code == 10 and message.startswith("Error: Could not reach the Hub at ")


NOTEBOOK_CELLS = """
import errno, json, os, sys
from IPython.core.interactiveshell import InteractiveShell
import requests
from sd35hub.frontends import colab as nb

shell = InteractiveShell.instance()
nb.setup()  # what the notebook's first cell calls: registers the error display
cells = {
    "disk": "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/content/out/adapter.safetensors')",
    "hub": "raise RuntimeError('load failed') from requests.exceptions.ConnectionError('Max retries exceeded')",
    "bug": "raise ValueError('a bug')",
}
shell.user_ns.update(errno=errno, os=os, requests=requests)
shown = {}
for name, code in cells.items():
    result = shell.run_cell(code)
    shown[name] = type(result.error_in_exec).__name__
print("RESULT " + json.dumps(shown))
"""


def test_the_notebook_shows_them_typed_and_keeps_tracebacks_for_the_rest(tmp_path: Path) -> None:
    """The error display nb.setup() installs, in a real IPython shell (its own process: the shell is global)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(NOTEBOOK_CELLS)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert results == {"disk": "OSError", "hub": "RuntimeError", "bug": "ValueError"}  # the cells still fail
    lines = done.stderr.splitlines()
    disk = [line for line in lines if line.startswith("DiskFullError: No space left on /content/out/adapter.safetensors")]
    assert len(disk) == 1 and "Free some space" in disk[0]
    hub = [line for line in lines if line.startswith("HubRequestError: Could not reach the Hub at ")]
    assert len(hub) == 1 and "ConnectionError: Max retries exceeded" in hub[0]
    assert "Traceback" not in done.stderr  # typed errors: one line, no traceback
    tracebacks = done.stdout.split("RESULT ", 1)[0]  # IPython prints its tracebacks to stdout
    assert "ValueError" in tracebacks and "a bug" in tracebacks  # anything else: IPython's traceback as before
    assert "OSError" not in tracebacks and "RuntimeError" not in tracebacks


def test_the_space_words_them_for_a_visitor() -> None:
    from sd35hub.frontends.space import support as space

    full = space.friendly_error(_chained(RuntimeError("write failed"), _disk_full("/srv/cache/sd35hub/x.png")))
    assert full.startswith("No space left on x.png") and "Free some space" in full  # no server path
    assert "Something went wrong" not in full
    hub = space.friendly_error(_unreachable(), loading_base=True)
    assert hub.startswith("Could not reach the Hub at ") and "Check your network" in hub
    assert space.friendly_error(ValueError("x")).startswith("Something went wrong (ValueError)")  # unchanged
