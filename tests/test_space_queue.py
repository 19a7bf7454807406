"""The Space's shared engine queue and per-visitor limits (#16 item 10): requests take the pipeline first
come, first served; a waiting request sees how many are ahead of it, live, and can cancel while it waits;
the per-address limit counts every session of one address and trusts only the proxy's X-Forwarded-For
entry, never what the client wrote."""

from __future__ import annotations

import threading

import pytest

from sd35hub.blend.request import GenerationRequest
from sd35hub.errors import ConfigError, GenerationCancelled
from sd35hub.frontends.space import view


@pytest.fixture(scope="module")
def engine():  # noqa: ANN201
    from sd35hub.frontends.space import support as space

    return space.load_engine("tiny")


def _request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="a fox", steps=2, width=64, height=64, seed=seed)


@pytest.mark.slow
def test_waiting_requests_see_their_place_live_and_run_in_arrival_order(engine) -> None:  # noqa: ANN001
    running, release = threading.Event(), threading.Event()
    finished: list[str] = []
    seen: dict[str, list[int]] = {"b": [], "c": []}

    def hold(done: int, total: int) -> None:  # the first request holds the pipeline until released
        running.set()
        assert release.wait(timeout=120)

    def run(name: str, **callbacks) -> None:  # noqa: ANN003
        engine.generate(_request(len(finished)), **callbacks)
        finished.append(name)

    def waiter(name: str):  # noqa: ANN202
        return lambda ahead: seen[name].append(ahead)

    first = threading.Thread(target=run, args=("a",), kwargs={"progress": hold})
    first.start()
    assert running.wait(timeout=120)
    second = threading.Thread(target=run, args=("b",), kwargs={"waiting": waiter("b")})
    second.start()
    while not seen["b"]:
        second.join(timeout=0.05)
    third = threading.Thread(target=run, args=("c",), kwargs={"waiting": waiter("c")})
    third.start()
    while not seen["c"]:
        third.join(timeout=0.05)
    assert engine.queue_length == 3
    while len(seen["b"]) < 2:  # refreshed at least every second while nothing moves
        second.join(timeout=0.05)
    release.set()
    for thread in (first, second, third):
        thread.join(timeout=120)
    assert finished == ["a", "b", "c"]  # first come, first served
    assert set(seen["b"]) == {1} and seen["c"][0] == 2 and seen["c"][-1] == 1  # c moved up when a finished
    assert engine.queue_length == 0


@pytest.mark.slow
def test_a_waiting_request_can_cancel(engine) -> None:  # noqa: ANN001
    running, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        running.set()
        assert release.wait(timeout=120)

    first = threading.Thread(target=engine.generate, args=(_request(1),), kwargs={"progress": hold})
    first.start()
    assert running.wait(timeout=120)
    with pytest.raises(GenerationCancelled):
        engine.generate(_request(2), waiting=lambda ahead: False)  # the visitor clicked Cancel while waiting
    assert engine.queue_length == 1  # it left the line
    release.set()
    first.join(timeout=120)
    assert engine.queue_length == 0


def test_the_address_is_the_proxys_entry_never_the_clients() -> None:
    forged = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}  # the client wrote 6.6.6.6; the proxy appended .7
    assert view.visitor_address(forged, "10.0.0.2", hops=1) == "203.0.113.7"
    assert view.visitor_address(forged, "10.0.0.2", hops=2) == "6.6.6.6"  # two proxies: the first one's entry
    assert view.visitor_address(forged, "10.0.0.2", hops=0) == "10.0.0.2"  # no proxy: the header is ignored
    assert view.visitor_address({}, "10.0.0.2", hops=1) == "10.0.0.2"  # not through the proxy
    assert view.visitor_address({}, None, hops=0) is None
    assert view.proxy_hops({"SPACE_ID": "me/space"}) == 1 and view.proxy_hops({}) == 0
    assert view.proxy_hops({"SPACE_ID": "me/space", view.PROXY_HOPS_ENV: "2"}) == 2


def test_the_address_limit_counts_every_session_of_an_address() -> None:
    limiter = view.AddressLimiter(limit=3, window=600)
    for now in (0.0, 1.0, 2.0):  # three sessions, one address
        limiter.take("203.0.113.7", now)
    with pytest.raises(ConfigError, match="from your network address .* try again in 10 minute"):
        limiter.take("203.0.113.7", 3.0)
    limiter.take("198.51.100.1", 3.0)  # another address is not affected
    limiter.take(None, 3.0)  # unknown address: only the session limit applies
    limiter.take("203.0.113.7", 600.5)  # the window moved on
    limiter.take("203.0.113.7", 1300.0)
    assert "198.51.100.1" not in limiter._times  # idle addresses are forgotten
