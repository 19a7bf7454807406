"""Hub faults (#22 class 3) with the real huggingface_hub / datasets clients against the local Hub's
fault injection: single transient faults are retried everywhere, a Hub that never answers ends in a
typed timeout naming the request, faults that never stop end in a typed error, publish never
commits twice. The waits are real code with short settings (fast fixture)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hubserver import HubServer
from training_output import make_training_output

from sd35hub.errors import HubConnectionError, HubRequestError, HubTimeoutError

BASE = "stabilityai/stable-diffusion-3.5-medium"
CARD = f"""---
base_model: {BASE}
base_model_relation: adapter
library_name: diffusers
instance_prompt: fault style
tags: [lora]
---
# an adapter
"""


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fast(hub_faults: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """Backoff waits of 10 ms (Retry-After is still honoured as sent); timeouts stay the defaults."""
    import sd35hub.hub.publish as publish
    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(hubhttp, "BASE_WAIT_S", 0.01)
    monkeypatch.setattr(publish, "RETRY_BASE_WAIT_S", 0.01)
    hubhttp.install()
    return hub_faults


@pytest.fixture
def short_timeouts(fast: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """1 s answer timeouts (huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT and sd35hub's
    write timeout), for the faults that never answer."""
    from huggingface_hub import constants

    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(hubhttp, "WRITE_TIMEOUT_S", 1.0)
    return fast


@pytest.fixture(scope="module")
def repos(hub: HubServer, hub_datasets: dict[str, str], tmp_path_factory) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save

    adapter = save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 8), np.float32)})
    author = unique("faulty")
    hub.add_user(author, f"hf_test_{author}_000000000000", role="write")
    repo = f"{author}/adapter"
    hub.seed_repo(repo, {"README.md": CARD, "pytorch_lora_weights.safetensors": adapter},
                  owner_token=f"hf_test_{author}_000000000000")
    hub.seed_repo(f"alice/{unique('model')}", {"model_index.json": "{}"})
    return {"adapter": repo, "author": author, "dataset": hub_datasets["parquet"],
            "out": make_training_output(tmp_path_factory.mktemp("faults") / "out")}


def op_check_access(r: dict[str, Any]) -> Any:
    from sd35hub.access import check_read_access

    return check_read_access(r["adapter"])


def op_whoami(r: dict[str, Any]) -> Any:
    from sd35hub.access import check_write_access

    assert check_write_access("alice/some-lora") == "alice"


def op_list_adapters(r: dict[str, Any]) -> Any:
    from sd35hub.hub.discovery import list_adapters

    found = list_adapters(BASE, author=r["author"])
    assert [a.repo_id for a in found] == [r["adapter"]] and found[0].trigger_words == ["fault style"]


def op_download(r: dict[str, Any]) -> Any:
    from sd35hub.hub.discovery import download_adapter

    assert download_adapter(r["adapter"], revision="main").stat().st_size > 0


def op_dataset(r: dict[str, Any]) -> Any:
    from sd35hub.data.readers import read_hub

    rows = list(read_hub(r["dataset"], "train", None, None, None))
    assert len(rows) == 6 and all(row.image_bytes for row in rows)


def op_publish(r: dict[str, Any]) -> Any:
    from sd35hub.hub.publish import publish

    repo = f"alice/{unique('pub')}"
    result = publish(r["out"], repo)
    assert result.commit_url and len(r["hub"].commits(repo)) == 2  # the Hub's initial commit + ours
    return result


# operation -> (the request its fault hits: path part, method)
OPERATIONS: dict[str, tuple[Callable[[dict[str, Any]], Any], str, str]] = {
    "check-access": (op_check_access, "/auth-check", "GET"),
    "whoami": (op_whoami, "/api/whoami-v2", "GET"),
    "list-adapters": (op_list_adapters, "/api/models", "GET"),
    "download": (op_download, "/resolve/", "GET"),
    "dataset-info": (op_dataset, "/api/datasets/", "GET"),
    "dataset-files": (op_dataset, "/resolve/", "GET"),
    "publish-preupload": (op_publish, "/preupload/", "POST"),
    "publish-commit": (op_publish, "/commit/", "POST"),
}
TRANSIENT = {
    "503": dict(status=503),
    "429-retry-after": dict(status=429, retry_after=0.4),
    "dropped": dict(action="drop"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault_name", list(TRANSIENT))
@pytest.mark.parametrize("op_name", list(OPERATIONS))
def test_a_single_transient_fault_is_retried(fast: HubServer, repos, op_name: str, fault_name: str) -> None:
    op, path, method = OPERATIONS[op_name]
    if op_name == "download":  # a fresh cache each time: the file must really be fetched
        repos = {**repos, "adapter": _copy_repo(fast, repos["adapter"])}
    fast.clear_requests()
    fault = fast.inject(path, method, **TRANSIENT[fault_name])
    op({**repos, "hub": fast})
    assert fault.hits == 1
    hits = [r for r in fast.api_calls(path, method) if r.fault is not None]
    assert len(hits) == 1
    if fault_name == "429-retry-after":  # the next request to that endpoint came after the asked pause
        later = [r for r in fast.api_calls(path, method) if r.time > hits[0].time]
        assert later and later[0].time - hits[0].time >= 0.4


def _copy_repo(hub: HubServer, repo_id: str) -> str:
    copy = f"{repo_id.split('/')[0]}/{unique('copy')}"
    hub.seed_repo(copy, hub.files(repo_id), owner_token=f"hf_test_{repo_id.split('/')[0]}_000000000000")
    return copy


def test_a_single_5xx_on_the_file_metadata_head_is_retried_by_huggingface_hub(fast: HubServer, repos) -> None:
    """hf_hub_download's HEAD is retried by huggingface_hub itself (with its 1 s backoff) when nothing is cached."""
    repos = {**repos, "adapter": _copy_repo(fast, repos["adapter"])}
    fault = fast.inject("/resolve/", "HEAD", status=503)
    op_download(repos)
    assert fault.hits == 1


# operation -> the first request it makes (the one that gets no answer)
NEVER_ANSWERING = {
    "check-access": ("GET", "/auth-check"),
    "whoami": ("GET", "/api/whoami-v2"),
    "list-adapters": ("GET", "/api/models"),
    "download": ("GET", "/revision/main"),
    "dataset-info": ("GET", "/api/datasets/"),
    "publish-commit": ("GET", "/api/whoami-v2"),
}


@pytest.mark.parametrize("op_name", [
    pytest.param(name, marks=pytest.mark.slow) if name == "list-adapters" else name for name in NEVER_ANSWERING])
@pytest.mark.slow
def test_a_hub_that_never_answers_is_a_timeout_naming_the_request(short_timeouts: HubServer, repos,
                                                                  op_name: str) -> None:
    """Every endpoint accepts the request and never answers (like hubserver.faults.SilentListener)."""
    op = OPERATIONS[op_name][0]
    method, path = NEVER_ANSWERING[op_name]
    short_timeouts.inject("", "*", action="hang", times=None)
    start = time.monotonic()
    with pytest.raises(HubTimeoutError) as info:
        op({**repos, "hub": short_timeouts})
    # list_models pages go through huggingface_hub's own http_backoff: 6 tries and ~23 s of its waits
    assert time.monotonic() - start < (45 if op_name == "list-adapters" else 15)
    message = str(info.value)
    assert f"did not answer {method} {short_timeouts.endpoint}/" in message and path in message
    within = "within 1 s, then 1 s on each repeat (after huggingface_hub's retries)" if op_name == "list-adapters" \
        else "within 1 s (2 attempts)"
    assert within in message and "HF_HUB_DOWNLOAD_TIMEOUT" in message
    assert info.value.exit_code == 10


@pytest.mark.parametrize("op_name", ["check-access", pytest.param("list-adapters", marks=pytest.mark.slow), "download",
                                     "dataset-info", "publish-commit"])
def test_a_fault_that_never_stops_ends_in_a_typed_error_after_the_budget(fast: HubServer, repos,
                                                                         op_name: str) -> None:
    import sd35hub.hub.publish as publish
    import sd35hub.hubhttp as hubhttp

    op, path, method = OPERATIONS[op_name]
    fault = fast.inject(path, method, status=503, times=None)
    with pytest.raises(HubRequestError, match="HTTP 503") as info:
        op({**repos, "hub": fast})
    assert info.value.exit_code == 10 and f"{method} {fast.endpoint}/" in str(info.value)
    # list_models pages: huggingface_hub's own http_backoff (5 retries, ~23 s of waits), not both budgets
    budget = {"publish-commit": publish.COMMIT_ATTEMPTS, "list-adapters": 6}.get(op_name, hubhttp.RETRIES + 1)
    assert fault.hits == budget


@pytest.mark.parametrize("action", ["drop", pytest.param("truncate", marks=pytest.mark.slow)])  # ~5 s each
def test_downloads_that_always_fail_are_a_typed_connection_error(fast: HubServer, repos, action: str) -> None:
    """Not LocalEntryNotFoundError "Internal error": huggingface_hub's own resume attempts end, then a
    HubConnectionError says what happened."""
    repos = {**repos, "adapter": _copy_repo(fast, repos["adapter"])}
    fast.inject("/resolve/", "GET", action=action, times=None)
    with pytest.raises(HubConnectionError) as info:
        op_download(repos)
    assert info.value.exit_code == 10 and repos["adapter"] in str(info.value)


def test_the_whole_metadata_head_failing_is_a_typed_error_not_local_entry_not_found(fast: HubServer, repos) -> None:
    repos = {**repos, "adapter": _copy_repo(fast, repos["adapter"])}
    fast.inject("/resolve/", "HEAD", action="drop", times=None)
    from huggingface_hub import hf_hub_download

    from sd35hub.access import hub_errors

    with pytest.raises(HubConnectionError, match="HEAD"):
        with hub_errors(repos["adapter"], what="downloading"):
            hf_hub_download(repos["adapter"], "README.md", revision="main")


def test_a_rate_limit_longer_than_sd35hub_waits_is_reported_with_the_wait(fast: HubServer, repos) -> None:
    fault = fast.inject("/auth-check", "GET", status=429, retry_after=3600, times=None)
    start = time.monotonic()
    with pytest.raises(HubRequestError, match="asks to wait 3600 s"):
        op_check_access(repos)
    assert time.monotonic() - start < 5 and fault.hits == 1


def test_an_unreachable_hub_is_a_connection_error(fast: HubServer, repos, monkeypatch) -> None:
    """Connection refused (nothing listens): retried, then HubConnectionError naming the endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(HubConnectionError, match=r"http://127\.0\.0\.1:1.*4 attempts.*Connection refused"):
        op_whoami(repos)


def test_requests_huggingface_hub_retries_itself_are_not_retried_again(fast: HubServer, repos) -> None:
    """Inside huggingface_hub's http_backoff (listings, preupload, LFS, HfFileSystem) its own budget is
    the budget: 2 retries asked -> 3 requests, not 3 x 4."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import http_backoff

    fault = fast.inject("/api/whoami-v2", "GET", status=503, times=None)
    with pytest.raises(HfHubHTTPError):
        http_backoff("GET", f"{fast.endpoint}/api/whoami-v2", max_retries=2, base_wait_time=0.01,
                     headers={"Authorization": f"Bearer {fast.token}"})
    assert fault.hits == 3


def test_the_hubs_ratelimit_header_is_honoured(fast: HubServer, repos) -> None:
    fault = fast.inject("/auth-check", "GET", status=429, headers={"RateLimit": '"api";r=0;t=1'})
    op_check_access(repos)
    hits = fast.api_calls("/auth-check", "GET")
    faulted = [r for r in hits if r.fault == "status"][-1]
    later = [r for r in hits if r.time > faulted.time]
    assert fault.hits == 1 and later[0].time - faulted.time >= 1.0


def test_huggingface_hubs_repeats_to_a_silent_host_do_not_each_wait_the_full_timeout(fast: HubServer,
                                                                                    monkeypatch) -> None:
    """After one full timeout, the repeats of huggingface_hub's own backoff wait REPEAT_TIMEOUT_S: a
    listing against a Hub that never answers ends in ~timeout + 5 x REPEAT_TIMEOUT_S, not 6 x timeout."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import http_backoff

    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(hubhttp, "REPEAT_TIMEOUT_S", 0.2)
    fault = fast.inject("/api/whoami-v2", "GET", action="hang", times=None)
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        http_backoff("GET", f"{fast.endpoint}/api/whoami-v2", max_retries=3, base_wait_time=0.01)
    elapsed = time.monotonic() - start
    assert fault.hits == 4 and 2 <= elapsed < 4  # 2 s + 3 x 0.2 s (would be 8 s with the full timeout each time)
