"""#15 item 17: a command that loads diffusers prints no torchao / torch pytree / torchvision import warnings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NOISE = ("torchao", "_pytree", "Failed to load", "torchvision", "Enum subclass")


@pytest.mark.slow
def test_generate_prints_no_library_import_noise(tmp_path) -> None:
    env = {**os.environ, "SD35HUB_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-m", "sd35hub", "generate", "--model", "tiny", "-p", "a cat", "--steps", "1",
                           "-o", "out"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [n for n in NOISE if n in proc.stderr] == [], proc.stderr
    assert list((tmp_path / "out").glob("*.png"))
