"""Several users at once on one shared engine: parallel sessions of a real `streamlit run` server (driven
over HTTP by Streamlit's agent API, no browser: each its own st.session_state, one shared
engine) and parallel requests through the app's code path (build_request + generate) render different
blends at the same time; each gets exactly its own image, no errors.

(Parallel AppTests are not used: AppTest swaps process-wide globals, the mock Runtime and config
options, around every run, so concurrent AppTest runs interfere with each other, not with the app.)"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from space_helpers import SpaceRepos, seed_space_repos, start_streamlit, stop_streamlit

from sd35hub.frontends.space import support as space


@pytest.fixture(scope="module")
def repos(hub) -> SpaceRepos:
    return seed_space_repos(hub)


def _blends(repos: SpaceRepos) -> list[list[tuple[str, float]]]:
    return [
        [(repos.watercolor, 0.8)],
        [(repos.ink, 1.5)],
        [(repos.watercolor, -0.5), (repos.ink, 2.0)],
        [(repos.watercolor, 1.2), (repos.ink, -1.0)],
    ]


def _form(seed: int) -> space.GenerationForm:
    return space.GenerationForm(prompt="a fox in the snow", steps=2, width=64, height=64, seed=seed)


def _choices(blend: list[tuple[str, float]]) -> list[space.AdapterChoice]:
    return [space.AdapterChoice(source, weight=weight, use_trigger_words=False) for source, weight in blend]


@pytest.mark.slow
def test_parallel_requests_on_one_engine_match_sequential(repos: SpaceRepos) -> None:
    engine = space.load_engine("tiny")
    blends = _blends(repos)

    def render(i: int) -> np.ndarray:
        request = space.build_request(_form(seed=i % 4), _choices(blends[i % 4]), base=space.BASES["tiny"])
        return np.asarray(space.generate(engine, request).images[0], dtype=np.int16)

    sequential = [render(i) for i in range(4)]
    assert len({s.tobytes() for s in sequential}) == 4  # four different blends, four different images
    start = threading.Barrier(8, timeout=120)

    def worker(i: int) -> np.ndarray:
        start.wait()  # all eight requests arrive together
        return render(i)

    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(worker, range(8)))
    for i, pixels in enumerate(parallel):
        assert np.array_equal(pixels, sequential[i % 4]), f"request {i} got another blend's image"


@pytest.fixture(scope="module")
def agent_url(hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: ANN001
    """`streamlit run space/app.py` with Streamlit's agent API (POST /_stcore/agent/interact): real
    server sessions driven over HTTP without a browser, all sharing the server's one cached engine."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "SD35HUB_SPACE_MODEL": "tiny"}
    log = tmp_path_factory.mktemp("space-agent") / "streamlit.log"
    # the server-side wait (default 30 s) must outlast a first run on 2 busy cores (engine load +
    # adapter downloads + 4 generations at once); the client timeout stays above it
    process, url = start_streamlit(env, log, "--server.enableAgentApi", "true", "--server.agentWaitTimeout", "300")
    yield url
    stop_streamlit(process)


def _interact(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/_stcore/agent/interact",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=360) as response:
        assert response.status == 200, response.status  # 202 would mean the run outlasted the wait
        return json.load(response)


def _elements(tree: object, kind: str) -> list[dict]:
    found: list[dict] = []
    if isinstance(tree, dict):
        if tree.get("type") == kind:
            found.append(tree)
        for value in tree.values():
            found += _elements(value, kind)
    elif isinstance(tree, list):
        for value in tree:
            found += _elements(value, kind)
    return found


@pytest.mark.slow
def test_parallel_server_sessions_get_their_own_results(agent_url: str, repos: SpaceRepos) -> None:
    blends = _blends(repos)
    sessions = []
    for blend in blends:  # each session opens the shared link that preselects its blend (?adapter=repo:w)
        snapshot = _interact(agent_url, {"query_params": {"adapter": [f"{s}:{w}" for s, w in blend]}})
        assert _elements(snapshot["tree"], "error") == [], _elements(snapshot["tree"], "error")
        sessions.append(snapshot["session_id"])

    def generate(i: int, wait: threading.Barrier | None = None) -> dict:
        settings = {"steps_tiny": 2, "size_tiny": "64×64", "random_seed": False, "seed": 10 + i}
        settings |= {f"trigger_{source}": False for source, _ in blends[i]}
        if wait is not None:
            wait.wait()  # every session clicks Generate at the same moment
        body = {"session_id": sessions[i], "widget_state": settings, "trigger": {"key": "generate"}}
        return _interact(agent_url, body)

    def result(i: int, snapshot: dict) -> np.ndarray:
        assert snapshot["status"] == "ready" and _elements(snapshot["tree"], "error") == []
        images = [
            e for e in _elements(snapshot["tree"], "image") if "seed" in (e["props"].get("caption") or "")
        ]
        assert len(images) == 1  # this session's latest result
        label = " + ".join(f"{source} × {weight:g}" for source, weight in blends[i])
        caption = re.sub(r"\\(.)", r"\1", images[0]["props"]["caption"])  # md_text's escapes
        assert caption == f"{label} · seed {10 + i}"  # its own blend and seed
        media = urllib.parse.urljoin(f"{agent_url}/_stcore/agent/interact", images[0]["props"]["url"])
        with urllib.request.urlopen(media, timeout=30) as response:
            return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=np.int16)

    start = threading.Barrier(len(sessions), timeout=120)  # a stuck session fails instead of hanging
    with ThreadPoolExecutor(len(sessions)) as pool:
        parallel = list(pool.map(lambda i: result(i, generate(i, start)), range(len(sessions))))
    sequential = [result(i, generate(i)) for i in range(len(sessions))]  # one at a time, same server
    for i in range(len(sessions)):
        assert np.array_equal(parallel[i], sequential[i]), f"session {i} got another blend's image"
    assert len({image.tobytes() for image in sequential}) == len(sessions)  # four blends, four images
