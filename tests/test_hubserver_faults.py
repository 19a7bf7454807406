"""Fault injection of the local Hub (tests/hubserver/faults.py), seen through a plain httpx2 client
(huggingface_hub's HTTP library, without sd35hub's retries: sd35hub.hubhttp) with explicit timeouts,
and through HfApi for the lost commit answer: each fault does what it says."""

from __future__ import annotations

import time
import uuid

import httpx2
import pytest
from hubserver import HubServer
from hubserver.faults import SilentListener

_CLIENT = httpx2.Client()


def get_session() -> httpx2.Client:
    return _CLIENT


def _repo(hub: HubServer) -> str:
    repo_id = f"alice/faults-{uuid.uuid4().hex[:8]}"
    hub.seed_repo(repo_id, {"f.txt": "0123456789" * 10})
    return repo_id


def _get(hub: HubServer, path: str, timeout: float = 5.0) -> httpx2.Response:
    return get_session().get(f"{hub.endpoint}{path}", headers={"Authorization": f"Bearer {hub.token}"},
                             timeout=timeout)


def test_status_fault_n_times_then_ok_with_retry_after_and_error_code(hub_faults: HubServer) -> None:
    hub, repo_id = hub_faults, _repo(hub_faults)
    fault = hub.inject(f"/api/models/{repo_id}", "GET", status=429, times=2, retry_after=3, code="RateLimited")
    first = _get(hub, f"/api/models/{repo_id}")
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    assert first.headers["X-Error-Code"] == "RateLimited"
    assert _get(hub, f"/api/models/{repo_id}").status_code == 429
    assert _get(hub, f"/api/models/{repo_id}").status_code == 200  # used up after 2
    assert fault.hits == 2
    records = hub.api_calls(f"/api/models/{repo_id}")[-3:]
    assert [(r.status, r.fault) for r in records] == [(429, "status"), (429, "status"), (200, None)]


def test_any_endpoint_any_method_skip_and_forever(hub_faults: HubServer) -> None:
    hub, repo_id = hub_faults, _repo(hub_faults)
    hub.inject(status=500, times=None, skip=1)  # every endpoint, after one request goes through
    assert _get(hub, f"/api/models/{repo_id}").status_code == 200
    assert _get(hub, "/api/whoami-v2").status_code == 500
    assert _get(hub, f"/{repo_id}/resolve/main/f.txt").status_code == 500
    hub.clear_faults()
    assert _get(hub, "/api/whoami-v2").status_code == 200


def test_drop_closes_the_connection_without_an_answer(hub_faults: HubServer) -> None:
    hub, repo_id = hub_faults, _repo(hub_faults)
    hub.inject("/api/whoami-v2", action="drop")
    with pytest.raises(httpx2.RemoteProtocolError):
        _get(hub, "/api/whoami-v2")
    assert hub.api_calls("/api/whoami-v2")[-1].fault == "drop"
    assert _get(hub, f"/api/models/{repo_id}").status_code == 200


def test_hang_answers_never_until_released(hub_faults: HubServer) -> None:
    hub = hub_faults
    hub.inject("/api/whoami-v2", action="hang")
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        _get(hub, "/api/whoami-v2", timeout=0.5)
    assert 0.4 < time.monotonic() - start < 5
    hub.release_hangs()
    assert _get(hub, "/api/whoami-v2").status_code == 200


def test_lost_commit_response_lands_the_commit(hub_faults: HubServer) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    hub, repo_id = hub_faults, _repo(hub_faults)
    hub.inject("/commit/", "POST", action="lose_response")
    with pytest.raises(httpx2.RemoteProtocolError):
        HfApi().create_commit(repo_id, [CommitOperationAdd("g.txt", b"g")], commit_message="lost")
    assert hub.files(repo_id)["g.txt"] == b"g"  # the commit happened; only its answer was lost
    assert hub.commits(repo_id)[0]["title"] == "lost"
    assert hub.api_calls("/commit/")[-1].fault == "lose_response"


def test_hang_after_and_truncate(hub_faults: HubServer) -> None:
    hub, repo_id = hub_faults, _repo(hub_faults)
    hub.inject(f"/{repo_id}/resolve/", "GET", action="truncate")
    with pytest.raises(httpx2.RemoteProtocolError):
        _get(hub, f"/{repo_id}/resolve/main/f.txt").read()
    hub.inject("/api/repos/create", "POST", action="hang_after")
    with pytest.raises(httpx2.ReadTimeout):
        get_session().post(f"{hub.endpoint}/api/repos/create", json={"name": "made-while-hanging"},
                           headers={"Authorization": f"Bearer {hub.token}"}, timeout=0.5)
    assert hub.repo_exists("alice/made-while-hanging")


def test_silent_listener_accepts_and_never_answers() -> None:
    with SilentListener() as silent:
        with pytest.raises(httpx2.ReadTimeout):
            get_session().get(f"{silent.endpoint}/api/whoami-v2", timeout=0.3)
        assert silent.accepted >= 1


def test_extra_routes_hook(hub_faults: HubServer) -> None:
    def ping(handler, method, segments, token):
        if segments == ["api", "ping"] and method == "GET":
            return handler._json({"pong": token.user if token else None})
        return None

    hub_faults.add_routes(ping)
    try:
        assert _get(hub_faults, "/api/ping").json() == {"pong": "alice"}
        assert _get(hub_faults, "/api/pong").status_code == 404
    finally:
        hub_faults.extra_routes.remove(ping)
