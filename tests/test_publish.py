"""Publishing a training output folder to the local Hub with the real huggingface_hub client."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli
from huggingface_hub import ModelCard
from training_output import BASE_MODEL, make_training_output

from sd35hub.errors import HubRequestError, WritePermissionError
from sd35hub.hub.publish import publish, publish_checkpoint_adapter

EXPECTED = {
    "pytorch_lora_weights.safetensors", "README.md", "images/val_0.png", "images/val_1.png", "images/loss.png",
    "sd35hub_config.yaml",
}


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry backoff is real code; its waits need not be real seconds here."""
    import sd35hub.hub.publish

    monkeypatch.setattr(sd35hub.hub.publish, "RETRY_BASE_WAIT_S", 0.01)


@pytest.fixture()
def output_dir(tmp_path: Path, hub) -> Path:
    out = make_training_output(tmp_path / "out")
    config = out / "training_config.yaml"
    # The real token in the config (as a secret key and inside a value) must never be published.
    config.write_text(config.read_text() + f"notes: 'pushed with {hub.token}'\nhf_token: {hub.token}\n")
    return out


def test_publish_creates_exactly_the_expected_files_in_one_commit(hub, output_dir: Path) -> None:
    result = publish(output_dir, "alice/publish-basic")
    files = hub.files("alice/publish-basic")
    assert set(files) - {".gitattributes"} == EXPECTED
    assert sorted(result.uploaded) == sorted(EXPECTED) and result.unchanged == []
    commits = hub.commits("alice/publish-basic")
    assert len(commits) == 2  # the repo's initial commit + ours
    assert set(commits[0]["files_changed"]) == EXPECTED
    assert result.commit_url and commits[0]["oid"] in result.commit_url
    assert files["pytorch_lora_weights.safetensors"] == (output_dir / "adapter/pytorch_lora_weights.safetensors").read_bytes()
    assert files["images/val_1.png"] == (output_dir / "samples/val_1.png").read_bytes()
    assert not any(p.startswith(("checkpoint", "cache", "logs", "adapter/", "samples/")) for p in files)

    config = yaml.safe_load(files["sd35hub_config.yaml"])
    assert config["model"]["base"] == BASE_MODEL and config["train"]["lr"] == 0.0001
    assert config["data"]["source"] == "<local path>" and config["train"]["output_dir"] == "<local path>"
    assert "token" not in config["hub"] and "hf_token" not in config and config["notes"] is None
    text = files["sd35hub_config.yaml"].decode()
    assert "/home/alice" not in text and "hf_shouldneverbepublished" not in text and "Users" not in text


def test_published_card_round_trips_and_links_only_uploaded_files(hub, output_dir: Path) -> None:
    publish(output_dir, "alice/publish-card")
    card = ModelCard.load("alice/publish-card")  # fetched from the Hub through the client
    data = card.data.to_dict()
    assert data["base_model"] == BASE_MODEL and data["base_model_relation"] == "adapter"
    assert data["license"] == "other" and data["license_name"] == "stabilityai-ai-community"
    assert "sd3.5-medium" in data["tags"] and data["instance_prompt"] == "sks style"
    files = hub.files("alice/publish-card")
    for widget in data["widget"]:
        assert widget["output"]["url"] in files
    assert 'load_lora_weights("alice/publish-card", weight_name="pytorch_lora_weights.safetensors"' in card.text
    assert "pytorch_lora_weights.safetensors" in files and "images/loss.png" in files
    # The Hub derives the discovery tag from the card metadata.
    info = __import__("huggingface_hub").HfApi().model_info("alice/publish-card")
    assert f"base_model:adapter:{BASE_MODEL}" in info.tags


def test_dry_run_uploads_nothing_and_prints_plan_and_card(hub, output_dir: Path, capsys) -> None:
    hub.clear_requests()
    code, out, err = run_cli(["publish", str(output_dir), "--repo", "alice/publish-dry", "--dry-run"], capsys)
    assert code == 0, err
    assert not hub.repo_exists("alice/publish-dry")
    assert [r for r in hub.requests if r.method in ("POST", "PUT", "DELETE")] == []
    for path in EXPECTED:
        assert path in out
    assert "Would upload 6 file(s)" in out
    assert "----- README.md -----" in out and "license_name: stabilityai-ai-community" in out
    assert "checkpoint" not in out.split("----- README.md -----")[0]


def test_republish_unchanged_makes_no_commit_and_changed_file_only_uploads_it(hub, output_dir: Path, capsys) -> None:
    publish(output_dir, "alice/publish-again")
    before = hub.commits("alice/publish-again")
    result = publish(output_dir, "alice/publish-again")
    assert hub.commits("alice/publish-again") == before
    assert result.uploaded == [] and sorted(result.unchanged) == sorted(EXPECTED) and result.commit_url is None
    code, out, _ = run_cli(["publish", str(output_dir), "--repo", "alice/publish-again"], capsys)
    assert code == 0 and "no commit made" in out

    from PIL import Image

    Image.new("RGB", (16, 16), (0, 255, 0)).save(output_dir / "samples" / "val_1.png")
    result = publish(output_dir, "alice/publish-again")
    assert result.uploaded == ["images/val_1.png"]
    commits = hub.commits("alice/publish-again")
    assert len(commits) == len(before) + 1 and commits[0]["files_changed"] == ["images/val_1.png"]


def test_a_500_on_the_first_commit_attempt_is_retried(hub, output_dir: Path) -> None:
    publish(output_dir, "alice/publish-retry", dry_run=True)
    hub.fail_next("POST", "/commit/", 500)
    hub.clear_requests()
    result = publish(output_dir, "alice/publish-retry")
    commit_posts = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert [r.status for r in commit_posts] == [500, 200]
    assert set(hub.files("alice/publish-retry")) - {".gitattributes"} == EXPECTED
    assert len(hub.commits("alice/publish-retry")) == 2 and result.commit_url


def test_permanent_errors_leave_the_repo_unchanged(hub, output_dir: Path, monkeypatch) -> None:
    import sd35hub.hub.publish

    publish(output_dir, "alice/publish-fail")
    (output_dir / "samples" / "val_0.png").write_bytes((output_dir / "loss.png").read_bytes())
    before = hub.commits("alice/publish-fail")
    hub.fail_next("POST", "/commit/", 500, times=sd35hub.hub.publish.COMMIT_ATTEMPTS)  # every attempt fails
    with pytest.raises(HubRequestError, match="HTTP 500") as info:
        publish(output_dir, "alice/publish-fail")
    assert info.value.exit_code == 10
    hub.fail_next("POST", "/commit/", 400)
    with pytest.raises(HubRequestError, match="HTTP 400"):
        publish(output_dir, "alice/publish-fail")
    assert hub.commits("alice/publish-fail") == before


def test_read_only_token_fails_before_anything_is_uploaded(hub, output_dir: Path, capsys, monkeypatch) -> None:
    hub.clear_requests()
    with pytest.raises(WritePermissionError, match="read-only"):
        publish(output_dir, "alice/publish-ro", token=hub.read_token)
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    code, _, err = run_cli(["publish", str(output_dir), "--repo", "alice/publish-ro"], capsys)
    assert code == 6 and "cannot write" in err
    assert [r.path for r in hub.requests] == ["/api/whoami-v2", "/api/whoami-v2"]
    assert not hub.repo_exists("alice/publish-ro")


def test_token_never_in_uploaded_files_or_logs(hub, output_dir: Path, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    hub.fail_next("POST", "/commit/", 500)
    publish(output_dir, "alice/publish-secret")
    code, out, err = run_cli(["publish", str(output_dir), "--repo", "alice/publish-secret", "--dry-run"], capsys)
    assert code == 0
    token = hub.token.encode()
    for path, content in hub.files("alice/publish-secret").items():
        assert token not in content, path
        assert b"hf_shouldneverbepublished" not in content, path
    logs = caplog.text + out + err
    assert "Published alice/publish-secret" in caplog.text and "Plan for alice/publish-secret" in out
    assert "retry 1/3" in caplog.text  # the retried commit was logged too
    assert hub.token not in logs


def test_branch_and_pull_request(hub, output_dir: Path) -> None:
    publish(output_dir, "alice/publish-branches", revision="v1")
    assert "pytorch_lora_weights.safetensors" in hub.files("alice/publish-branches", revision="v1")
    assert "pytorch_lora_weights.safetensors" not in hub.files("alice/publish-branches")
    result = publish(output_dir, "alice/publish-branches", create_pr=True)
    assert result.pr_url and "/discussions/" in result.pr_url
    assert "pytorch_lora_weights.safetensors" not in hub.files("alice/publish-branches")  # main untouched
    assert any(ref.startswith("refs/pr/") for ref in hub.refs("alice/publish-branches"))


def test_checkpoint_adapters_go_to_their_own_branch(hub, output_dir: Path) -> None:
    adapter = output_dir / "adapter" / "pytorch_lora_weights.safetensors"
    url = publish_checkpoint_adapter(adapter, "alice/publish-ckpt", step=100)
    assert "/commit/" in url
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.ones(2, 2)}, str(adapter))  # the adapter at step 200
    publish_checkpoint_adapter(adapter, "alice/publish-ckpt", step=200)
    files = hub.files("alice/publish-ckpt", revision="checkpoints")
    assert set(files) - {".gitattributes"} == {"pytorch_lora_weights.safetensors"}
    assert files["pytorch_lora_weights.safetensors"] == adapter.read_bytes()
    titles = [c["title"] for c in hub.commits("alice/publish-ckpt", revision="checkpoints")]
    assert titles[:2] == ["Checkpoint adapter at step 200", "Checkpoint adapter at step 100"]
    assert set(hub.files("alice/publish-ckpt")) == {".gitattributes"}


@pytest.mark.slow  # builds the tiny model on first use in a session (~20 s on 2 shared cores)
def test_card_snippet_runs_against_the_published_repo(hub, tmp_path: Path, monkeypatch) -> None:
    """The snippet in the published card, run as written (CPU instead of CUDA), loads the
    uploaded adapter from the Hub onto the base model and generates an image (CPU, 1 step, 64 px)."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sd35hub.models.tiny import tiny_model_path

    tiny = tiny_model_path()
    base = "sd35hub-org/tiny-sd3.5"
    hub.seed_repo(base, {str(p.relative_to(tiny)): p.read_bytes() for p in tiny.rglob("*") if p.is_file()})
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny))
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    lora_state = get_peft_model_state_dict(pipe.transformer)
    out = make_training_output(tmp_path / "out", base_model=base, variant="tiny")
    StableDiffusion3Pipeline.save_lora_weights(out / "adapter", transformer_lora_layers=lora_state)
    publish(out, "alice/tiny-snippet")

    card = ModelCard.load("alice/tiny-snippet")
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'from_pretrained("{base}"' in snippet
    runnable = snippet.replace('.to("cuda")', "").replace("num_inference_steps=28", "num_inference_steps=1, height=64, width=64")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(runnable, "card-snippet", "exec"), namespace)  # noqa: S102 - our own generated snippet
    loaded = namespace["pipe"]
    assert loaded.get_active_adapters() == ["tiny_snippet"]
    key = next(k for k in lora_state if "lora_B" in k)  # e.g. transformer_blocks.0.attn.to_q.lora_B.weight
    module_path = key.replace(".lora_B.weight", "")
    loaded_b = loaded.transformer.get_submodule(module_path).lora_B["tiny_snippet"].weight
    torch.testing.assert_close(loaded_b.float(), lora_state[key].float(), atol=1e-2, rtol=1e-2)  # bf16 rounding
    assert (tmp_path / "sample.png").is_file()
