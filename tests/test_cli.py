"""The CLI: --help/--version, one-line errors with documented exit codes, tracebacks only with SD35HUB_DEBUG."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_helpers import run_cli

from sd35hub import __version__
from sd35hub.errors import (
    AdapterIncompatibleError,
    ConfigError,
    DatasetError,
    LicenseNotAcceptedError,
    NotLoggedInError,
    RepoNotFoundError,
    WritePermissionError,
)
from sd35hub.frontends.cli import format_error


def test_help_lists_the_commands_and_version(capsys) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("train", "publish", "check-access", "generate", "bench", "demo", "convert", "merge", "data"):
        assert command in out, command
    code, out, _ = run_cli(["--version"], capsys)
    assert (code, out.strip()) == (0, f"sd35hub {__version__}")


@pytest.mark.parametrize(
    ("error", "code", "needle"),
    [
        (ConfigError(["a", "b"]), 2, "2 problems"),
        (LicenseNotAcceptedError("stabilityai/stable-diffusion-3.5-large"), 3,
         "Accept it at https://huggingface.co/stabilityai/stable-diffusion-3.5-large"),
        (NotLoggedInError(), 4, "HF_TOKEN"),
        (RepoNotFoundError("x/y"), 5, "does not exist or is private"),
        (WritePermissionError("x/y"), 6, "'write' role"),
        (DatasetError("no usable samples"), 7, "no usable samples"),
        (AdapterIncompatibleError("a Flux LoRA on SD3.5"), 9, "Flux"),
        (ValueError("boom"), 1, "SD35HUB_DEBUG=1"),
    ],
)
def test_errors_map_to_messages_and_exit_codes(error, code, needle) -> None:
    message, exit_code = format_error(error)
    assert exit_code == code
    assert needle in message
    assert "Traceback" not in message


def test_a_bad_config_exits_2_with_one_message_and_no_traceback(tmp_path) -> None:
    env = {**os.environ, "SD35HUB_DEBUG": "0"}  # keeps the session's offline HF_ENDPOINT/caches
    proc = subprocess.run([sys.executable, "-m", "sd35hub", "train", "--model", "tiny", "lora.rank=0", "train.nope=1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: Invalid configuration (2 problems)")
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written, nothing loaded


def test_debug_shows_the_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sd35hub", "train", "--model", "tiny", "lora.rank=0"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "SD35HUB_DEBUG": "1"},
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
