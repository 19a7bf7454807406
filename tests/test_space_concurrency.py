"""Several users at once on one shared engine: parallel AppTest sessions (each its own st.session_state,
one st.cache_resource engine) and parallel requests through the app's code path (build_request +
generate) render different blends at the same time; each gets exactly its own image, no errors."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from space_helpers import SPACE_APP, SpaceRepos, seed_space_repos
from streamlit.testing.v1 import AppTest

from sd35hub import space_support as space


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


def test_parallel_requests_on_one_engine_match_sequential(repos: SpaceRepos) -> None:
    engine = space.load_engine("tiny")
    blends = _blends(repos)

    def render(i: int) -> np.ndarray:
        request = space.build_request(_form(seed=i % 4), _choices(blends[i % 4]))
        return np.asarray(space.generate(engine, request).images[0], dtype=np.int16)

    sequential = [render(i) for i in range(4)]
    assert len({s.tobytes() for s in sequential}) == 4  # four different blends, four different images
    start = threading.Barrier(8)

    def worker(i: int) -> np.ndarray:
        start.wait()  # all eight requests arrive together
        return render(i)

    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(worker, range(8)))
    for i, pixels in enumerate(parallel):
        assert np.array_equal(pixels, sequential[i % 4]), f"request {i} got another blend's image"


def _session(blend: list[tuple[str, float]], seed: int) -> AppTest:
    at = AppTest.from_file(SPACE_APP, default_timeout=120).run()
    for source, _ in blend:
        at.text_input(key="paste_source").input(source)
        at.button(key="add_pasted").click().run()
    for source, weight in blend:
        at.slider(key=f"weight_{source}").set_value(weight)
        at.checkbox(key=f"trigger_{source}").uncheck()
    at.text_area(key="prompt").input("a fox in the snow")
    at.number_input(key="steps_tiny").set_value(2)
    at.selectbox(key="size_tiny").set_value("64×64")
    at.checkbox(key="random_seed").uncheck()
    at.number_input(key="seed").set_value(seed)
    return at


def test_parallel_app_sessions_get_their_own_results(
    monkeypatch: pytest.MonkeyPatch, repos: SpaceRepos
) -> None:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    blends = _blends(repos)
    sessions = [_session(blend, seed=10 + i) for i, blend in enumerate(blends)]
    start = threading.Barrier(len(sessions))

    def click(at: AppTest) -> AppTest:
        start.wait()
        return at.button(key="generate").click().run()

    with ThreadPoolExecutor(len(sessions)) as pool:
        done = list(pool.map(click, sessions))
    engine = space.load_engine("tiny")  # a separate engine: the sequential reference
    for i, at in enumerate(done):
        assert not at.exception and [e.value for e in at.error] == []
        history = at.session_state["history"]
        assert len(history) == 1  # nobody else's result landed in this session
        params = history[0]["params"]
        assert [(a["source"], a["weight"]) for a in params["adapters"]] == blends[i]
        assert params["seed"] == 10 + i
        expected = space.generate(engine, space.build_request(_form(seed=10 + i), _choices(blends[i])))
        got = np.asarray(Image.open(io.BytesIO(history[0]["png"])).convert("RGB"), dtype=np.int16)
        assert np.array_equal(got, np.asarray(expected.images[0], dtype=np.int16))
