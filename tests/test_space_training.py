"""The Space's training page (space/train_page.py) driven with streamlit's AppTest against the local Hub and
its Jobs executor: a visitor's own token plans, submits and follows a job; the adapter is published."""

from __future__ import annotations

import json

import pytest
from hub_tokens import HUB_OTHER_TOKEN
from space_helpers import SPACE_APP
from streamlit.testing.v1 import AppTest

from sd35hub.errors import ConfigError
from sd35hub.frontends.space import support as space
from sd35hub.frontends.space.training import TrainingRequest, overrides


def test_request_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        overrides(TrainingRequest(dataset="nope", base_model="tiny", trigger_word="", preset="bogus", repo_id="",
                                  extra="no-equals-sign"))
    assert len(err.value.problems) == 4


@pytest.mark.slow
def test_visitor_plans_and_trains_with_their_own_token(hub, hub_datasets, monkeypatch):  # noqa: ANN001
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=180)
    at.run()
    assert any("paste a Hugging Face token" in info.value for info in at.info)
    # bob visits (the process's own HF_TOKEN is alice's): his token must be the one used, and only as a secret
    at.text_input(key="user_token").input(HUB_OTHER_TOKEN).run()
    at.text_input(key="train_dataset").input(hub_datasets["parquet"])
    at.text_input(key="train_repo").input("bob/space-trained")
    at.text_input(key="train_trigger").input("nrt style")
    at.selectbox(key="train_flavor").set_value("t4-small")
    at.number_input(key="train_steps").set_value(4)
    at.text_area(key="train_extra").input("data.min_size=16\ndata.resolution=64\ntrain.validation_steps=1\n"
                                          "train.batch_size=2")
    at.button(key="train_plan").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    plan_text = at.code[-1].value
    assert "HF Jobs plan: flavor t4-small" in plan_text and "publishes to bob/space-trained" in plan_text
    assert "memory plan:" in plan_text
    at.button(key="train_start").click().run()
    assert not at.error, [e.value for e in at.error]
    # the job this page started (the session-scoped server also holds the browser test's Space jobs)
    job = hub.jobs.jobs[at.session_state["train_job"]["id"]]
    assert (job.spec.get("labels") or {}).get("sd35hub_from") == "space"
    assert job.namespace == "bob" and job.spec["secrets"] == {"HF_TOKEN": HUB_OTHER_TOKEN}
    assert HUB_OTHER_TOKEN not in json.dumps({k: v for k, v in job.spec.items() if k != "secrets"})
    assert hub.jobs.wait(job.id).stage == "COMPLETED", hub.jobs.log_text(job.id)[-2000:]
    at.button(key="train_refresh").click().run()
    assert any("Published:" in s.value and "bob/space-trained" in s.value for s in at.success), (
        [s.value for s in at.success], [e.value for e in at.error], [m.value for m in at.markdown][-3:])
    assert "pytorch_lora_weights.safetensors" in hub.files("bob/space-trained")


def _png(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploaded_images_become_a_private_dataset_the_trainer_can_stream(hub):  # noqa: ANN001
    from sd35hub.config import DataSpec
    from sd35hub.data.sources import check_dataset
    from sd35hub.frontends.space.training import upload_dataset

    files = [("../../etc/cat one.png", _png((200, 10, 10))), ("cat one.txt", b"a red cat"),
             ("dog.png", _png((10, 200, 10))), ("broken.png", b"\x89PNG not really"), ("notes.pdf", b"%PDF")]
    result = upload_dataset(files, "bob/uploaded-photos", HUB_OTHER_TOKEN)
    assert (result.images, result.captions, result.skipped) == (2, 1, {"corrupt": 1, "not_an_image": 1})
    stored = hub.files("bob/uploaded-photos", repo_type="dataset")
    assert sorted(stored) == [".gitattributes", "images/0000.png", "images/0001.png", "metadata.jsonl"]
    assert hub.state.repos[("dataset", "bob/uploaded-photos")].private  # only bob (and his jobs) can read it
    rows = [json.loads(line) for line in stored["metadata.jsonl"].decode().splitlines()]
    assert rows == [{"file_name": "images/0000.png", "text": "a red cat"}, {"file_name": "images/0001.png", "text": ""}]
    stats = check_dataset(DataSpec(source="bob/uploaded-photos", min_size=16), token=HUB_OTHER_TOKEN)
    assert stats.usable == 2
