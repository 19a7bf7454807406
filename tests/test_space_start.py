"""The Space's start-up (sd35hub.frontends.space.start, #16 item 11): the first base is loaded into memory by the
Streamlit process itself before anyone visits, one engine per base for the whole process, and a Hub that
is down (503, dropped connections) does not stop a base that is in the cache from loading."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from space_helpers import SPACE_APP, _free_port, stop_streamlit

from sd35hub.errors import HubRequestError
from sd35hub.frontends.space import start as space_start
from sd35hub.models.load import model_dir, resolve_model


@pytest.fixture
def empty_registry():
    space_start._engines.clear()
    yield
    space_start._engines.clear()


def _tiny_base_on_hub(hub) -> str:  # noqa: ANN001
    from sd35hub.models.tiny import tiny_model_path

    folder = tiny_model_path()
    repo = f"sd35hub-org/tiny-base-{uuid.uuid4().hex[:8]}"
    hub.seed_repo(repo, {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    return repo


@pytest.mark.slow  # the client's retries (3.5 s) and a tiny engine load
@pytest.mark.parametrize("fault", ["status", "drop"])
def test_a_cached_base_loads_while_the_hub_is_down(
    hub_faults, fault: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, empty_registry
) -> None:  # noqa: ANN001
    repo = _tiny_base_on_hub(hub_faults)
    online = model_dir(resolve_model(repo))  # the Space ran once: the base is in the cache
    outage = hub_faults.inject("", "*", action=fault, status=503, times=None)  # every request fails
    with caplog.at_level(logging.WARNING):
        assert model_dir(resolve_model(repo)) == online
        assert "The Hub did not answer while checking access to " + repo in caplog.text
        # the Space's start path: the warm-up and the engine (model_info + the pipeline), Hub still down
        monkeypatch.setenv("SD35HUB_SPACE_MODEL", repo)
        assert space_start.warm_up() == 0
        engine = space_start.engine(repo)
    assert outage.hits > 0  # the Hub was asked, and failed
    assert (engine.model_id, engine.model_revision) == (repo, online.name)  # snippets: the Hub id, pinned


@pytest.mark.slow  # the client's retries
def test_a_base_not_in_the_cache_still_reports_the_outage(hub_faults) -> None:  # noqa: ANN001
    repo = _tiny_base_on_hub(hub_faults)  # never downloaded
    hub_faults.inject("", "*", status=503, times=None)
    with pytest.raises(HubRequestError, match="503"):
        model_dir(resolve_model(repo))


@pytest.mark.slow  # a tiny engine load
def test_one_engine_per_base_for_the_whole_process(empty_registry) -> None:  # noqa: ANN001
    warm = space_start.warm_in_memory(["tiny"])  # the container's warm-up thread ...
    visitors: list[object] = []
    threads = [threading.Thread(target=lambda: visitors.append(space_start.engine("tiny"))) for _ in range(3)]
    for thread in threads:  # ... and three first visitors arriving while it loads
        thread.start()
    for thread in [warm, *threads]:
        thread.join(timeout=300)
    assert space_start.is_loaded("tiny")
    assert len(visitors) == 3 and all(engine is space_start.engine("tiny") for engine in visitors)


@pytest.mark.slow
def test_the_container_loads_the_base_before_the_first_visit(tmp_path: Path) -> None:
    """`python -m sd35hub.frontends.space.start streamlit run space/app.py` (the Dockerfile's command): Streamlit runs
    in the process that loads the base, the base is in memory before any visit, and the first visit's
    page uses that engine (the server loads it once)."""
    import subprocess
    import sys

    port = _free_port()
    log_path = tmp_path / "space.log"
    env = {**os.environ, "SD35HUB_SPACE_MODEL": "tiny", "SD35HUB_SPACE_DATA": "", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "sd35hub.frontends.space.start", "streamlit", "run", SPACE_APP, "--server.headless", "true",
        "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--server.enableAgentApi", "true", "--server.agentWaitTimeout", "300",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, cwd=Path(SPACE_APP).parents[1], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        warmed = f"warm-up: tiny is in memory (process {process.pid})"  # the server's own process
        while warmed not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert warmed in log_path.read_text(), log_path.read_text()[-3000:]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/_stcore/agent/interact", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=360) as response:  # the first visit
            page = json.dumps(json.load(response))
        assert "SD3.5 LoRA blender" in page and "Generate" in page
        assert log_path.read_text().count("engine of tiny loaded") == 1  # by the warm-up, not by the visit
    finally:
        stop_streamlit(process)


def test_what_a_visitor_is_shown_also_reaches_the_server_log(caplog: pytest.LogCaptureFixture) -> None:
    from sd35hub.errors import LicenseNotAcceptedError
    from sd35hub.frontends.space.text import visitor_message

    with caplog.at_level(logging.WARNING, logger="sd35hub.space"):
        shown = visitor_message(LicenseNotAcceptedError("stabilityai/stable-diffusion-3.5-large"), loading_base=True)
        unexpected = visitor_message(KeyError("boom"), "hf_secret_token_1234")
    assert "try again later" in shown and "Agree" not in shown  # the visitor: come back later ...
    assert "License not accepted for stabilityai/stable-diffusion-3.5-large" in caplog.text  # ... the operator: the fix
    assert f"shown to a visitor: {shown}" in caplog.text and f"shown to a visitor: {unexpected}" in caplog.text
    assert "KeyError: 'boom'" in caplog.text  # the traceback goes to the log, not to the page
    assert "hf_secret_token_1234" not in caplog.text + unexpected
