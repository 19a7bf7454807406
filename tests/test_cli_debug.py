"""SD35HUB_DEBUG=1 shows tracebacks and the debug log, never a token (#22 class 7)."""

from __future__ import annotations

import os
import subprocess
import sys

from sd35hub.frontends.cli import format_error

TOKEN = "hf_" + "Zq3" * 11 + "x"  # the shape of a real token (hf_ + 34 letters and digits)


def _run(args: list[str], token: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SD35HUB_DEBUG": "1", "HF_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "sd35hub", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=180)


def test_debug_traceback_and_log_never_show_the_token(hub, tmp_path) -> None:
    token = hub.token  # a valid token of the local Hub (alice)
    # a token pasted where the repository id goes: the message, the traceback and the request log all hold it
    proc = _run(["check-access", f"alice/{token}"], token, tmp_path)
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" in proc.stderr  # debug output is there ...
    assert token not in proc.stderr + proc.stdout  # ... without the token
    assert "hf_***" in proc.stderr


def test_debug_output_of_failing_hub_commands_is_redacted(hub, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    for args in (["publish", "run", "--repo", f"bob/{TOKEN}"], ["list-adapters", "--search", TOKEN],
                 ["check-access", "alice/x", "--write", f"alice/{TOKEN}"]):
        proc = _run(args, TOKEN, tmp_path)  # an unknown token: the Hub rejects it
        assert proc.returncode != 0 and "Internal error" not in proc.stderr, proc.stderr
        assert TOKEN not in proc.stderr + proc.stdout, args


def test_messages_are_redacted_whatever_raised_them() -> None:
    for exc in (ValueError(f"request failed: Authorization: Bearer {TOKEN}"), RuntimeError(f"url ?token={TOKEN}"),
                ConnectionError(f"headers {{'authorization': 'Bearer {TOKEN}'}}")):
        message, _ = format_error(exc)
        assert TOKEN not in message and "hf_***" in message, message


def test_invalid_token_and_missing_revision_through_the_cli(hub, tmp_path) -> None:
    """#15 item 3: an invalid token was "License not accepted" (exit 3), a missing revision "does not exist"."""
    gated = "stabilityai/stable-diffusion-3.5-large-turbo"
    hub.seed_repo(gated, {"model_index.json": "{}"}, gated=True, owner_token=hub.other_token)
    hub.seed_repo("alice/rev-model", {"model_index.json": "{}"}, owner_token=hub.token)
    env = {**os.environ, "SD35HUB_DEBUG": "0"}
    for token in (TOKEN, "hf_revoked_or_mistyped_token"):
        proc = subprocess.run([sys.executable, "-m", "sd35hub", "check-access", gated], capture_output=True, text=True,
                              cwd=tmp_path, env={**env, "HF_TOKEN": token}, timeout=180)
        assert proc.returncode == 4, proc.stderr
        assert proc.stderr.startswith("Error: The Hub rejected your Hugging Face token") and "License" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sd35hub", "check-access", "alice/rev-model", "--revision", "v9"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert proc.returncode == 5 and "has no revision 'v9'" in proc.stderr, proc.stderr
