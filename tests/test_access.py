"""Access checks against the local Hub with the real huggingface_hub client: license, login, write scope."""

from __future__ import annotations

import os

import pytest
from cli_helpers import run_cli

from sd35hub.access import check_read_access, check_write_access
from sd35hub.errors import LicenseNotAcceptedError, NotLoggedInError, RepoNotFoundError, WritePermissionError

GATED = "stabilityai/stable-diffusion-3.5-medium"


@pytest.fixture(scope="module")
def gated_repo(hub):
    hub.seed_repo(GATED, {"model_index.json": "{}", "transformer/config.json": "{}"}, gated=True,
                  owner_token=hub.other_token)
    hub.add_user("carol", "hf_test_carol_write_00000000000000000", role="write")
    return GATED


def test_gated_not_accepted_names_the_url_and_downloads_nothing(hub, gated_repo) -> None:
    hub.clear_requests()
    with pytest.raises(LicenseNotAcceptedError) as info:
        check_read_access(gated_repo, token="hf_test_carol_write_00000000000000000")
    assert f"{hub.endpoint}/{gated_repo}" in str(info.value)
    assert info.value.exit_code == 3
    assert hub.downloads(gated_repo) == []
    assert [r for r in hub.requests if "/resolve/" in r.path] == []
    assert hub.api_calls("/auth-check")


def test_accepted_license_passes(hub, gated_repo) -> None:
    hub.add_user("dave", "hf_test_dave_write_000000000000000000", role="write")
    with pytest.raises(LicenseNotAcceptedError):
        check_read_access(gated_repo, token="hf_test_dave_write_000000000000000000")
    hub.grant(gated_repo, "dave")
    check_read_access(gated_repo, token="hf_test_dave_write_000000000000000000")


@pytest.fixture(scope="module")
def public_repo(hub) -> str:
    hub.seed_repo("alice/public-model", {"a.txt": "x"})
    return "alice/public-model"


def test_missing_repo_and_revision(hub, public_repo) -> None:
    with pytest.raises(RepoNotFoundError, match="does not exist or is private"):
        check_read_access("nobody/no-such-model")
    check_read_access(public_repo)
    with pytest.raises(RepoNotFoundError, match="revision"):
        check_read_access("alice/public-model", revision="no-such-branch")


def test_anonymous_on_gated_repo_says_how_to_log_in(hub, gated_repo, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NotLoggedInError, match="HF_TOKEN"):
        check_read_access(gated_repo)


def test_write_access_roles(hub) -> None:
    assert check_write_access("alice/new-lora") == "alice"  # HF_TOKEN: alice's write token
    assert check_write_access("sd35hub-org/new-lora") == "alice"  # member of the org
    with pytest.raises(WritePermissionError, match="read-only token"):
        check_write_access("alice/new-lora", token=hub.read_token)
    with pytest.raises(WritePermissionError, match="not a member"):
        check_write_access("alice/new-lora", token=hub.other_token)  # bob cannot write to alice's namespace
    hub.add_user("erin", "hf_test_erin_fine_000000000000000000", role="fineGrained",
                 scoped={"erin": ["repo.content.read"]})
    with pytest.raises(WritePermissionError, match="fine-grained"):
        check_write_access("erin/lora", token="hf_test_erin_fine_000000000000000000")
    hub.add_user("frank", "hf_test_frank_fine_00000000000000000", role="fineGrained",
                 scoped={"frank": ["repo.content.read", "repo.write"]})
    assert check_write_access("frank/lora", token="hf_test_frank_fine_00000000000000000") == "frank"


def test_write_access_without_or_with_invalid_token(hub, monkeypatch) -> None:
    with pytest.raises(NotLoggedInError, match="invalid"):
        check_write_access("alice/x", token="hf_not_a_real_token_000000000000000")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NotLoggedInError, match="hf auth login"):
        check_write_access("alice/x")


def test_cli_check_access_exit_codes(hub, gated_repo, public_repo, capsys, monkeypatch) -> None:
    hub.grant(gated_repo, "alice")
    code, out, err = run_cli(["check-access", gated_repo, "--write", "alice/my-lora"], capsys)
    assert code == 0, err
    assert f"OK  read {gated_repo}" in out and "OK  write alice/my-lora (as alice)" in out

    monkeypatch.setenv("HF_TOKEN", "hf_test_carol_write_00000000000000000")
    hub.clear_requests()
    code, out, err = run_cli(["check-access", gated_repo], capsys)
    assert code == 3 and f"{hub.endpoint}/{gated_repo}" in err
    assert hub.downloads(gated_repo) == []

    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    hub.clear_requests()
    code, out, err = run_cli(["check-access", "alice/public-model", "--write", "alice/my-lora"], capsys)
    assert code == 6 and "cannot write to alice/my-lora" in err and "read-only" in err
    assert hub.api_calls(method="POST") == [] and hub.api_calls(method="PUT") == []
    assert hub.read_token not in out + err

    code, _, err = run_cli(["check-access", "nobody/nothing"], capsys)
    assert code == 5 and "nobody/nothing" in err
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["check-access", "alice/public-model", "--write", "alice/x"], capsys)
    assert code == 4 and "hf auth login" in err
    assert os.environ.get("HF_TOKEN") is None


def test_403_means_write_only_when_writing(hub, public_repo) -> None:
    from huggingface_hub import HfApi

    from sd35hub.access import hub_errors

    hub.fail_next("GET", f"/api/models/{public_repo}", status=403)
    with pytest.raises(RepoNotFoundError, match="not allowed to read"):
        with hub_errors(public_repo, what="reading"):
            HfApi().model_info(public_repo)
    hub.fail_next("GET", f"/api/models/{public_repo}", status=403)
    with pytest.raises(WritePermissionError, match="cannot write"):
        with hub_errors(public_repo, what="publishing", write=True):
            HfApi().model_info(public_repo)


def test_a_run_checks_its_base_once(hub, public_repo) -> None:
    """#17: the trainer's own check, the config fetch and each component download all ask; inside
    checks_once() the Hub is asked once per (repo, revision, token). A failed check is asked again."""
    from sd35hub.access import checks_once

    hub.clear_requests()
    with checks_once():
        for _ in range(3):
            check_read_access(public_repo)
        with checks_once():  # nested: the same run
            check_read_access(public_repo)
        check_read_access(public_repo, token="hf_test_carol_write_00000000000000000")  # another token: asked
        for _ in range(2):
            with pytest.raises(RepoNotFoundError):
                check_read_access("nobody/no-such-model")
    assert len(hub.api_calls(f"/{public_repo}/auth-check")) == 2
    assert len(hub.api_calls("/nobody/no-such-model/auth-check")) >= 2
    hub.clear_requests()
    check_read_access(public_repo)  # outside a block: asked every time
    check_read_access(public_repo)
    assert len(hub.api_calls(f"/{public_repo}/auth-check")) == 2


def test_check_run_access_is_the_one_check_of_a_run(hub, gated_repo, public_repo) -> None:
    from sd35hub.config import load_config
    from sd35hub.workflows.checks import check_run_access

    local = load_config(None, ["model.name=tiny", "data.source=sample"])
    assert check_run_access(local) == ["tiny: local model, no license check needed"]
    publishing = load_config(None, [f"model.name={public_repo}", "hub.push_to_hub=true", "hub.repo_id=alice/run-out"])
    assert check_run_access(publishing) == [f"read access to {public_repo}: ok (license accepted)",
                                            "write access to alice/run-out: ok (as alice)"]
    with pytest.raises(LicenseNotAcceptedError):
        check_run_access(load_config(None, [f"model.name={gated_repo}"]), token="hf_test_carol_write_00000000000000000")
    with pytest.raises(WritePermissionError):
        check_run_access(publishing.replace(hub=publishing.hub.__class__(push_to_hub=True, repo_id="bob/x")))
