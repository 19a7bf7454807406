"""What the user is told about Hub failures (#15 items 2, 3, 10; #22 class 3), through the real CLI
in-process and the real huggingface_hub client against the local Hub's fault injection."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cli_helpers import run_cli
from hubserver import HubServer
from hubserver.faults import SilentListener

from sd35hub.access import check_read_access
from sd35hub.errors import InvalidTokenError, LicenseNotAcceptedError, RevisionNotFoundError

GATED = "stabilityai/stable-diffusion-3.5-large-turbo"
INVALID = "hf_not_a_valid_token_at_all_00000000"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fast(hub_faults: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    import sd35hub.hub.publish as publish
    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(hubhttp, "BASE_WAIT_S", 0.01)
    monkeypatch.setattr(publish, "RETRY_BASE_WAIT_S", 0.01)
    return hub_faults


@pytest.fixture(scope="module")
def gated(hub: HubServer) -> str:
    if not hub.repo_exists(GATED):
        hub.seed_repo(GATED, {"model_index.json": "{}"}, gated=True, owner_token=hub.other_token)
    hub.add_user("gina", "hf_test_gina_write_000000000000000000", role="write")
    return GATED


# ------------------------------------------------------------------ #15 item 3: invalid token, missing revision
def test_an_invalid_token_is_not_license_not_accepted(fast: HubServer, gated: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", INVALID)
    code, _, err = run_cli(["check-access", gated], capsys)
    assert code == 4 and "rejected your Hugging Face token" in err and "License" not in err
    assert INVALID not in err
    # A Hub that answers an unknown token like an anonymous visitor of a gated repo (401 GatedRepo):
    # the token is checked with whoami before "accept the license" is said.
    fast.inject("/auth-check", "GET", status=401, code="GatedRepo",
                message=f"Access to model {gated} is restricted. You must have access to it and be authenticated.")
    with pytest.raises(InvalidTokenError) as info:
        check_read_access(gated)
    assert info.value.exit_code == 4


def test_a_valid_token_without_the_license_is_still_license_not_accepted(fast: HubServer, gated: str) -> None:
    token = "hf_test_gina_write_000000000000000000"
    fast.inject("/auth-check", "GET", status=401, code="GatedRepo", message="restricted, be authenticated")
    with pytest.raises(LicenseNotAcceptedError):
        check_read_access(gated, token=token)
    with pytest.raises(LicenseNotAcceptedError):  # the Hub's usual 403 for a signed-in user
        check_read_access(gated, token=token)


def test_a_missing_revision_is_a_revision_error(hub: HubServer, capsys) -> None:
    repo = f"alice/rev-{uuid.uuid4().hex[:8]}"
    hub.seed_repo(repo, {"a.txt": "a"})
    with pytest.raises(RevisionNotFoundError, match="has no revision 'no-such-branch'") as info:
        check_read_access(repo, revision="no-such-branch")
    assert "does not exist" not in str(info.value)
    code, _, err = run_cli(["check-access", repo, "--revision", "v9"], capsys)
    assert code == 5 and "has no revision 'v9'" in err and "does not exist" not in err


# ------------------------------------------------------------------ #15 item 2: unreachable Hub opening a dataset
def test_data_check_on_an_unreachable_hub_exits_10(fast: HubServer, hub_datasets, capsys, monkeypatch) -> None:
    fast.inject("", "*", action="drop", times=None)  # every connection closes without an answer
    code, _, err = run_cli(["data", "check", hub_datasets["parquet"]], capsys)
    assert code == 10 and "Could not reach the Hub" in err and "Internal error" not in err
    fast.clear_faults()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    code, _, err = run_cli(["data", "check", hub_datasets["parquet"]], capsys)
    assert code == 10 and "Connection refused" in err and "http://127.0.0.1:1" in err


def test_data_check_on_a_hub_that_never_answers_exits_10(fast: HubServer, hub_datasets, capsys,
                                                         monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    fast.inject("", "*", action="hang", times=None)
    code, _, err = run_cli(["data", "check", hub_datasets["parquet"]], capsys)
    assert code == 10 and "did not answer GET" in err and "/api/datasets/" in err


# ------------------------------------------------------------------ CLI commands on a Hub that never answers
@pytest.mark.parametrize("args", [["check-access", "alice/whatever"], ["check-access", "alice/x", "--write", "alice/y"],
                                  ["publish", "{out}", "--repo", "alice/never"]])
def test_commands_on_a_hub_that_never_answers_exit_10_naming_the_request(fast: HubServer, capsys, monkeypatch,
                                                                         tmp_path: Path, args: list[str]) -> None:
    from huggingface_hub import constants
    from training_output import make_training_output

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    out = make_training_output(tmp_path / "out")
    fast.inject("", "*", action="hang", times=None)
    start = time.monotonic()
    code, _, err = run_cli([a.replace("{out}", str(out)) for a in args], capsys)
    assert code == 10 and "did not answer GET " in err and "within 1 s" in err
    assert time.monotonic() - start < 15


@pytest.mark.slow  # a fresh interpreter (~5-10 s on the shared test machine) plus 2 x 2 s of timeouts
def test_check_access_against_a_listener_that_never_answers(tmp_path: Path) -> None:
    with SilentListener() as silent:
        env = {**os.environ, "HF_ENDPOINT": silent.endpoint, "HF_HUB_DOWNLOAD_TIMEOUT": "2",
               "HF_HUB_ETAG_TIMEOUT": "2", "PYTHONPATH": str(ROOT)}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "sd35hub", "check-access", "alice/model"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 10, proc.stderr
        assert f"did not answer GET {silent.endpoint}/api/models/alice/model/auth-check within 2 s" in proc.stderr
        assert silent.accepted >= 2 and time.monotonic() - start < 60


# ------------------------------------------------------------------ #15 item 10: a failed checkpoint push
@pytest.mark.slow  # trains the tiny model for 4 steps
def test_a_failed_checkpoint_push_warns_and_training_goes_on(fast: HubServer, tmp_path: Path, caplog) -> None:
    import sd35hub.hub.publish as publish
    from sd35hub.config import Config, DataSpec, HubSpec, LoraSpec, ModelSpec, TrainSpec
    from sd35hub.train import recipe

    repo = f"alice/ckpt-{uuid.uuid4().hex[:8]}"
    config = Config(
        model=ModelSpec(name="tiny"),
        data=DataSpec(source="sample", resolution=64, max_samples=6, holdout=0, cache_dir=str(tmp_path / "cache")),
        lora=LoraSpec(rank=4, alpha=4.0),
        train=TrainSpec(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, checkpoint_every=2,
                        validation_every=0, log_every=1, seed=3),
        hub=HubSpec(repo_id=repo, push_checkpoints=True),
    )
    # every attempt of the first push fails; the second checkpoint's push goes through
    fault = fast.inject(f"/api/models/{repo}/commit/", "POST", status=503, times=publish.COMMIT_ATTEMPTS)
    trainer = recipe.Trainer(config, log=lambda s: None, progress=False)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.state.step == 4 and fault.hits == publish.COMMIT_ATTEMPTS
    assert "Could not push the checkpoint of step 2" in caplog.text and "Training continues" in caplog.text
    titles = [c["title"] for c in fast.commits(repo, revision="checkpoints")]
    assert titles[0] == "Checkpoint adapter at step 4" and "Checkpoint adapter at step 2" not in titles
