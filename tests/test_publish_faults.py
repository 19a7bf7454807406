"""publish under faults (#22 class 3): a commit whose answer is lost is not made twice, only files
inside the run folder are ever uploaded, a malformed summary.json is a ConfigError. Real
huggingface_hub against the local Hub's fault injection; the summary fuzzing is property-based
(hypothesis, derandomized)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from hubserver import HubServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from training_output import make_training_output

from sd35hub.errors import AdapterError, ConfigError, HubRequestError
from sd35hub.hub.publish import plan_publication, publish, publish_checkpoint_adapter, push_checkpoint

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def unique(name: str) -> str:
    return f"alice/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fast(hub_faults: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    import sd35hub.hub.publish as publish_module
    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(hubhttp, "BASE_WAIT_S", 0.01)
    monkeypatch.setattr(publish_module, "RETRY_BASE_WAIT_S", 0.01)
    return hub_faults


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return make_training_output(tmp_path_factory.mktemp("pubfaults") / "out")


def _commit_posts(hub: HubServer, repo_id: str) -> list[Any]:
    return [r for r in hub.api_calls(f"/api/models/{repo_id}/commit/", "POST")]


# ------------------------------------------------------------------ idempotent commits
@pytest.mark.parametrize("existing", [False, True], ids=["new-repo", "existing-repo"])
@pytest.mark.parametrize("action", ["lose_response", "hang_after"])
def test_a_commit_whose_answer_is_lost_is_not_made_twice(fast: HubServer, out: Path, monkeypatch, action: str,
                                                          existing: bool) -> None:
    import sd35hub.hubhttp as hubhttp

    monkeypatch.setattr(hubhttp, "WRITE_TIMEOUT_S", 1.0)
    repo_id = unique("lost")
    if existing:
        fast.seed_repo(repo_id, {"notes.txt": "before"})
    before = len(fast.commits(repo_id)) if existing else 1  # a new repo starts with the Hub's initial commit
    fault = fast.inject(f"/api/models/{repo_id}/commit/", "POST", action=action)
    result = publish(out, repo_id)
    assert fault.hits == 1
    assert len(fast.commits(repo_id)) == before + 1  # exactly one publication commit
    assert len(_commit_posts(fast, repo_id)) == 1  # the lost one landed: it was not sent again
    assert result.commit_url and result.commit_url.endswith(fast.commits(repo_id)[0]["oid"])
    assert "pytorch_lora_weights.safetensors" in fast.files(repo_id)


def test_a_commit_dropped_before_it_landed_is_sent_again_once(fast: HubServer, out: Path) -> None:
    repo_id = unique("dropped")
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", action="drop")
    publish(out, repo_id)
    assert [r.status for r in _commit_posts(fast, repo_id)] == [0, 200]
    assert len(fast.commits(repo_id)) == 2


def test_a_lost_pull_request_answer_opens_one_pull_request(fast: HubServer, out: Path) -> None:
    repo_id = unique("lostpr")
    fast.seed_repo(repo_id, {"notes.txt": "x"})
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", action="lose_response")
    result = publish(out, repo_id, create_pr=True)
    prs = [ref for ref in fast.refs(repo_id) if ref.startswith("refs/pr/")]
    assert prs == ["refs/pr/1"] and result.pr_url and result.pr_url.endswith("/discussions/1")
    assert "pytorch_lora_weights.safetensors" not in fast.files(repo_id)  # main untouched


def test_a_lost_checkpoint_push_answer_makes_one_commit(fast: HubServer, out: Path) -> None:
    repo_id = unique("lostckpt")
    adapter = out / "adapter" / "pytorch_lora_weights.safetensors"
    publish_checkpoint_adapter(adapter, repo_id, step=1)
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", action="lose_response")
    import torch
    from safetensors.torch import save_file

    step2 = out.parent / "step2.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.full((2, 2), 2.0)}, str(step2))
    publish_checkpoint_adapter(step2, repo_id, step=2)
    titles = [c["title"] for c in fast.commits(repo_id, revision="checkpoints")]
    assert titles[:2] == ["Checkpoint adapter at step 2", "Checkpoint adapter at step 1"]
    assert titles.count("Checkpoint adapter at step 2") == 1
    assert fast.files(repo_id, revision="checkpoints")["pytorch_lora_weights.safetensors"] == step2.read_bytes()


def test_someone_elses_push_during_the_retry_is_not_overwritten(fast: HubServer, out: Path) -> None:
    """The first attempt fails with no answer and, before the retry, another commit lands: publish stops
    (the Hub would refuse a stale parent anyway) instead of committing over it."""
    repo_id = unique("raced")
    fast.seed_repo(repo_id, {"notes.txt": "x"})

    fault = fast.inject(f"/api/models/{repo_id}/commit/", "POST", action="drop")
    real_take = fast.faults.take

    def take(method: str, path: str):
        hit = real_take(method, path)
        if hit is fault:  # while this commit is being dropped, another machine pushes to the repo
            fast.seed_repo(repo_id, {"notes.txt": "changed elsewhere"}, message="other machine")
        return hit

    fast.faults.take = take  # type: ignore[method-assign]
    try:
        with pytest.raises(HubRequestError, match="changed on the Hub while publishing"):
            publish(out, repo_id)
    finally:
        del fast.faults.take
    assert fast.commits(repo_id)[0]["title"] == "other machine"
    assert "pytorch_lora_weights.safetensors" not in fast.files(repo_id)


def test_push_checkpoint_warns_and_returns_none_when_the_hub_keeps_failing(fast: HubServer, out: Path,
                                                                           caplog) -> None:
    import sd35hub.hub.publish as publish_module

    repo_id = unique("ckptfail")
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", status=500, times=publish_module.COMMIT_ATTEMPTS)
    adapter = out / "adapter" / "pytorch_lora_weights.safetensors"
    assert push_checkpoint(adapter, repo_id, step=3) is None
    assert "Could not push the checkpoint of step 3" in caplog.text and "Training continues" in caplog.text
    assert push_checkpoint(adapter, repo_id, step=4)  # the next checkpoint is pushed
    assert fast.commits(repo_id, revision="checkpoints")[0]["title"] == "Checkpoint adapter at step 4"


def test_a_checkpoint_push_carries_its_pivotal_embeddings_and_refuses_a_bad_one(fast: HubServer, tmp_path: Path,
                                                                                out: Path) -> None:
    import torch
    from safetensors.torch import load, save_file

    from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, save_embeddings

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    adapter = folder / "pytorch_lora_weights.safetensors"
    adapter.write_bytes((out / "adapter" / "pytorch_lora_weights.safetensors").read_bytes())
    rows = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}
    save_embeddings(rows, folder / EMBEDDINGS_FILE, tokens=["<s0>", "<s1>"])
    repo_id = unique("ckptemb")
    assert push_checkpoint(adapter, repo_id, step=3)
    pushed = fast.files(repo_id, revision="checkpoints")
    assert set(pushed) >= {"pytorch_lora_weights.safetensors", EMBEDDINGS_FILE}
    got = load(pushed[EMBEDDINGS_FILE])
    assert all(torch.equal(got[k], rows[k]) for k in rows)

    save_file({"clip_l": torch.full((2, 32), float("nan"))}, str(folder / EMBEDDINGS_FILE))
    with pytest.raises(AdapterError, match="NaN"):
        publish_checkpoint_adapter(adapter, repo_id, step=4)
    assert fast.commits(repo_id, revision="checkpoints")[0]["title"] == "Checkpoint adapter at step 3"


# ------------------------------------------------------------------ only files inside the run folder
@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = make_training_output(tmp_path / "run")
    (tmp_path / "secret.txt").write_text("outside the run folder")
    (tmp_path / "outside.png").write_bytes((run / "loss.png").read_bytes())
    (tmp_path / "outside.safetensors").write_bytes((run / "adapter" / "pytorch_lora_weights.safetensors").read_bytes())
    return run


def _set_summary(run: Path, **changes: Any) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary.update(changes)
    (run / "summary.json").write_text(json.dumps(summary))


OUTSIDE = {
    "absolute adapter": dict(adapter_file="{outside}/outside.safetensors"),
    "dotdot adapter": dict(adapter_file="../outside.safetensors"),
    "backslash dotdot adapter": dict(adapter_file="..\\outside.safetensors"),
    "absolute image": dict(validation_images=[{"path": "{outside}/secret.txt", "prompt": "p"}]),
    "dotdot image": dict(validation_images=[{"path": "samples/../../secret.txt", "prompt": "p"}]),
    "dotdot loss plot": dict(loss_plot="../outside.png"),
    "windows drive": dict(loss_plot="C:\\Windows\\win.ini"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_summary_pointing_outside_the_run_folder_is_refused_and_nothing_is_uploaded(hub: HubServer, run: Path,
                                                                                     case: str) -> None:
    changes = json.loads(json.dumps(OUTSIDE[case]).replace("{outside}", str(run.parent).replace("\\", "/")))
    _set_summary(run, **changes)
    repo_id = unique("outside")
    hub.clear_requests()
    with pytest.raises(ConfigError, match="not inside the run folder") as info:
        publish(run, repo_id)
    assert info.value.exit_code == 2
    assert hub.api_calls(method="POST") == [] and not hub.repo_exists(repo_id)


@pytest.mark.parametrize("target", ["loss.png", "samples/val_0.png", "adapter/pytorch_lora_weights.safetensors",
                                    "training_config.yaml"])
def test_a_link_inside_the_folder_to_a_file_outside_is_refused(hub: HubServer, run: Path, target: str) -> None:
    outside = run.parent / ("outside.safetensors" if target.endswith(".safetensors") else "outside.png")
    (run / target).unlink()
    os.symlink(outside, run / target)
    with pytest.raises(ConfigError, match="links to"):
        plan_publication(run, "alice/x")


def test_the_published_files_all_come_from_inside_the_folder(hub: HubServer, run: Path) -> None:
    files, _ = plan_publication(run, "alice/x")
    for planned in files:
        if planned.source not in ("generated model card",):
            source = planned.source.split(" (")[0]
            assert (run / source).resolve().is_relative_to(run.resolve()), planned


_path_text = st.one_of(
    st.lists(st.sampled_from(["a", "b", ".", "..", "/", "\\", ":", "~", "C", "samples", "loss.png"]),
             max_size=8).map("".join),
    st.sampled_from(["/etc/passwd", "../x", "samples/../../x", "~/x", "C:/x", "\\\\server\\share\\x", "", ".",
                     "samples/val_0.png", "loss.png", "./loss.png", "samples//val_1.png"]),
)


@SETTINGS
@given(adapter=_path_text, image=_path_text, plot=_path_text)
def test_any_summary_paths_are_refused_or_stay_inside(run: Path, adapter: str, image: str, plot: str) -> None:
    _set_summary(run, adapter_file=adapter, loss_plot=plot, validation_images=[{"path": image, "prompt": "p"}])
    try:
        files, _ = plan_publication(run, "alice/x")
    except (ConfigError, AdapterError):
        return
    root = run.resolve()
    for planned in files:
        if planned.source.startswith(("generated", "training_config.yaml")):
            continue
        assert (run / planned.source).resolve().is_relative_to(root), planned.source
        assert ".." not in Path(planned.path_in_repo).parts and not planned.path_in_repo.startswith("/")


# ------------------------------------------------------------------ malformed summary.json
MALFORMED = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe{}",
    "a list": b"[1, 2, 3]",
    "a string": b'"summary"',
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "steps text": json.dumps({"base_model": "x/y", "steps": "many"}).encode(),
    "buckets ragged": json.dumps({"base_model": "x/y", "resolution_buckets": [[1024], "a"]}).encode(),
    "skipped text": json.dumps({"base_model": "x/y", "skipped": {"corrupt": "two"}}).encode(),
    "images not objects": json.dumps({"base_model": "x/y", "validation_images": ["a.png", 3]}).encode(),
    "lora a list": json.dumps({"base_model": "x/y", "lora": [1, 2]}).encode(),
    "duration text": json.dumps({"base_model": "x/y", "duration_s": "an hour"}).encode(),
    "base model number": json.dumps({"base_model": 3}).encode(),
    "adapter file number": json.dumps({"base_model": "x/y", "adapter_file": 7}).encode(),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_summary_is_a_config_error(run: Path, case: str) -> None:
    (run / "summary.json").write_bytes(MALFORMED[case])
    with pytest.raises(ConfigError, match="summary.json"):
        plan_publication(run, "alice/x")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_FIELDS = ["base_model", "variant", "adapter_file", "trigger_word", "dataset", "steps", "epochs", "samples_seen",
           "final_loss", "validation_loss", "resolution_buckets", "skipped", "validation_images", "loss_plot",
           "precision", "quantization", "seed", "lora", "learning_rate", "optimizer", "batch_size",
           "gradient_accumulation", "duration_s", "peak_memory_gib", "sd35hub_version"]


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _json, min_size=1, max_size=4))
def test_any_summary_values_give_a_card_or_a_config_error(run: Path, changes: dict[str, Any]) -> None:
    """Never a traceback: every field of summary.json replaced by arbitrary JSON."""
    _set_summary(run, **changes)
    try:
        files, card = plan_publication(run, "alice/x")
    except (ConfigError, AdapterError):
        return
    assert card and files[0].path_in_repo == "pytorch_lora_weights.safetensors"


def test_a_lost_answer_to_a_full_checkpoint_push_makes_one_commit(fast: HubServer, tmp_path: Path) -> None:
    """hub.resume_branch pushes (sd35hub.train.resume) go through the same never-twice commit."""
    from sd35hub.train.resume import push_checkpoint as push_full_checkpoint

    repo_id = unique("lostresume")
    checkpoint = tmp_path / "checkpoint-000002"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text('{"step": 2}')
    (checkpoint / "lora.safetensors").write_bytes(b"not really tensors")
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", action="lose_response")
    url = push_full_checkpoint(checkpoint, repo_id, branch="resume", keep=2)
    titles = [c["title"] for c in fast.commits(repo_id, revision="resume")]
    assert titles.count("sd35hub checkpoint checkpoint-000002") == 1 and url.endswith(
        fast.commits(repo_id, revision="resume")[0]["oid"])
    assert len(_commit_posts(fast, repo_id)) == 1


def test_a_failed_resume_branch_push_warns_and_the_next_one_goes_through(fast: HubServer, tmp_path: Path,
                                                                         caplog) -> None:
    from types import SimpleNamespace

    import sd35hub.hub.publish as publish_module
    from sd35hub.train.resume import push_after_save

    repo_id = unique("resumefail")
    logged: list[str] = []
    trainer = SimpleNamespace(
        config=SimpleNamespace(hub=SimpleNamespace(resume_branch="resume", repo_id=repo_id, private=False),
                               train=SimpleNamespace(keep_checkpoints=2)),
        output_dir=tmp_path, log=logged.append)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step:06d}"
        folder.mkdir()
        (folder / "state.json").write_text(f'{{"step": {step}}}')
    fast.inject(f"/api/models/{repo_id}/commit/", "POST", status=503, times=publish_module.COMMIT_ATTEMPTS)
    push_after_save(trainer, tmp_path / "checkpoint-000002")  # every attempt fails: a warning, no exception
    assert "Could not push checkpoint-000002" in caplog.text and "NOT pushed" in logged[-1]
    push_after_save(trainer, tmp_path / "checkpoint-000004")
    assert "checkpoint-000004/state.json" in fast.files(repo_id, revision="resume") and "pushed to" in logged[-1]
