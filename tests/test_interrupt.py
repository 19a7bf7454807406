"""Ctrl-C anywhere exits 130 with a message: a real `sd35hub` process gets a real SIGINT (#22 class 6).

Before, typer turned a KeyboardInterrupt outside the training loop into a returned 130 that the CLI
dropped: setup, caching and `generate` exited 0 without a word."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest


def interrupt(argv: list[str], cwd, marker: str | None, *, delay: float = 0.0, twice: bool = False,
              timeout: float = 240.0) -> tuple[int, str]:
    """Run the CLI, send SIGINT once ``marker`` appeared in its output (then ``delay`` s), return (code, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SD35HUB_DEBUG": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "sd35hub", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = bytearray()
    found = threading.Event()

    def pump() -> None:
        while chunk := proc.stdout.read1(4096):  # type: ignore[union-attr]
            seen.extend(chunk)
            if marker is None or marker.encode() in seen:
                found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert found.wait(timeout) or marker is None, bytes(seen).decode(errors="replace")[-2000:]
    time.sleep(delay)
    assert proc.poll() is None, f"finished before the interrupt: {bytes(seen).decode(errors='replace')[-2000:]}"
    proc.send_signal(signal.SIGINT)
    if twice:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout)
    reader.join(10)
    return code, bytes(seen).decode(errors="replace")


def _check(code: int, output: str) -> None:
    assert code == 130, output[-3000:]
    assert output.rstrip().endswith("Interrupted."), output[-3000:]
    assert "Traceback" not in output and "Internal error" not in output, output[-3000:]


TRAIN = ["train", "--model", "tiny", "--dataset", "sample", "--output", "run", "--steps", "50"]


@pytest.mark.slow
def test_ctrl_c_during_setup_exits_130(tmp_path) -> None:
    _check(*interrupt(TRAIN, tmp_path, "hardware profile"))


@pytest.mark.slow
def test_ctrl_c_twice_while_caching_exits_130(tmp_path) -> None:
    _check(*interrupt(TRAIN, tmp_path, "caching latents", delay=0.5, twice=True))


@pytest.mark.slow
def test_ctrl_c_during_generate_exits_130(tmp_path) -> None:
    # generate prints nothing before its images: interrupt it while it loads or denoises
    _check(*interrupt(["generate", "--model", "tiny", "-p", "a cat", "--steps", "1000", "--n", "16", "-o", "gen"], tmp_path,
                      None, delay=8.0))
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())
