"""The local Hub test server, driven by the real huggingface_hub 2.4 and datasets 5.2 clients."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from hubserver import HubServer
from hubserver.seed_data import SIZES, sample_rows
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

HUB_ORG = "sd35hub-org"  # alice's organisation on the test hub (hub.org)
BASE = "stabilityai/stable-diffusion-3.5-medium"
CARD = f"""---
license: other
license_name: stabilityai-ai-community
base_model: {BASE}
base_model_relation: adapter
library_name: diffusers
pipeline_tag: text-to-image
tags: [lora, sd3.5]
---
# A test adapter
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def api(hub: HubServer) -> HfApi:
    return HfApi()  # endpoint and token come from HF_ENDPOINT / HF_TOKEN, as for users


def test_whoami_tokens(hub: HubServer, api: HfApi) -> None:
    me = api.whoami()
    assert me["name"] == "alice"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert [org["name"] for org in me["orgs"]] == [hub.org] == [HUB_ORG]
    assert api.whoami(token=hub.read_token)["auth"]["accessToken"]["role"] == "read"
    assert api.whoami(token=hub.other_token)["name"] == "bob"

    hub.add_user("carol", "hf_test_carol_fine", role="fineGrained")
    scoped = api.whoami(token="hf_test_carol_fine")["auth"]["accessToken"]["fineGrained"]["scoped"]
    assert scoped[0]["entity"]["name"] == "carol" and "repo.write" in scoped[0]["permissions"]

    with pytest.raises(HfHubHTTPError) as err:
        api.whoami(token="hf_not_a_real_token")
    assert err.value.response.status_code == 401


def test_upload_list_download_round_trip(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = f"alice/{unique('adapter')}"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    api.create_repo(repo_id, exist_ok=True)  # exists: no error
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409

    weights = bytes(range(256)) * 40
    (tmp_path / "README.md").write_text(CARD)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "0.png").write_bytes(b"\x89PNG fake")
    info = api.upload_folder(repo_id=repo_id, folder_path=tmp_path, commit_message="Add adapter")
    assert info.oid == hub.commits(repo_id)[0]["oid"]
    assert hub.commits(repo_id)[0]["title"] == "Add adapter"
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes", "README.md", "pytorch_lora_weights.safetensors", "samples/0.png"]
    assert hub.files(repo_id)["pytorch_lora_weights.safetensors"] == weights

    path = hf_hub_download(repo_id, "pytorch_lora_weights.safetensors")
    assert Path(path).read_bytes() == weights
    assert len(hub.downloads(repo_id)) == 1

    # re-publishing unchanged files: preupload returns the remote blob ids, the client sends no commit
    history = len(hub.commits(repo_id))
    again = api.upload_folder(repo_id=repo_id, folder_path=tmp_path, commit_message="Same again")
    assert again.oid == info.oid and len(hub.commits(repo_id)) == history
    assert hub.api_calls("/commit/", method="POST")[-1].status == 200  # only the first upload committed
    assert len(hub.api_calls(f"/api/models/{repo_id}/commit/", method="POST")) == 1

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin")


def test_snapshot_download(hub: HubServer) -> None:
    repo_id = f"{HUB_ORG}/{unique('snap')}"
    files = {"README.md": CARD, "a.safetensors": b"\x00" * 100, "nested/dir/b.json": '{"x": 1}'}
    sha = hub.seed_repo(repo_id, files)
    folder = Path(snapshot_download(repo_id))
    assert folder.name == sha
    for name, content in files.items():
        expected = content.encode() if isinstance(content, str) else content
        assert (folder / name).read_bytes() == expected
    only_json = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_dir=folder.parent / "only"))
    assert (only_json / "nested/dir/b.json").exists() and not (only_json / "a.safetensors").exists()


def test_commit_to_branch_pr_and_deletions(hub: HubServer, api: HfApi) -> None:
    repo_id = f"alice/{unique('branches')}"
    main_sha = hub.seed_repo(repo_id, {"keep.txt": "keep", "old.txt": "old", "dir/x.txt": "x"})
    api.create_branch(repo_id, branch="dev")
    dev = api.create_commit(
        repo_id,
        [CommitOperationAdd("new.txt", b"new"), CommitOperationDelete("old.txt"), CommitOperationDelete("dir/")],
        commit_message="Rework on dev",
        revision="dev",
        parent_commit=main_sha,
    )
    assert set(hub.files(repo_id, "dev")) == {".gitattributes", "keep.txt", "new.txt"}
    assert hub.files(repo_id)["old.txt"] == b"old"  # main untouched
    assert hub.commits(repo_id, "dev")[0] == {
        "oid": dev.oid, "title": "Rework on dev", "message": "", "author": "alice",
        "files_changed": ["old.txt", "dir/x.txt", "new.txt"]}
    with pytest.raises(HfHubHTTPError) as err:  # stale parent commit
        api.create_commit(repo_id, [CommitOperationAdd("z.txt", b"z")], commit_message="late",
                          revision="dev", parent_commit=main_sha)
    assert err.value.response.status_code == 412

    pr = api.create_commit(repo_id, [CommitOperationAdd("keep.txt", b"changed")], commit_message="Proposal",
                           create_pr=True, token=hub.other_token)  # bob may open a PR, not push
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert hub.files(repo_id, "refs/pr/1")["keep.txt"] == b"changed"
    assert hub.files(repo_id)["keep.txt"] == b"keep"
    assert hf_hub_download(repo_id, "keep.txt", revision="refs/pr/1") and hub.refs(repo_id)["refs/pr/1"] == pr.oid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="push", token=hub.other_token)
    assert err.value.response.status_code == 403
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="no-such-branch")


def test_model_info_gated_card_and_auth_check(hub: HubServer, api: HfApi) -> None:
    repo_id = f"{HUB_ORG}/{unique('gated')}"
    hub.seed_repo(repo_id, {"README.md": CARD, "model.safetensors": b"w" * 10}, gated="auto")
    info = api.model_info(repo_id)
    assert info.gated == "auto" and info.private is False and info.author == HUB_ORG
    assert info.card_data.base_model == BASE and info.card_data.license == "other"
    assert f"base_model:adapter:{BASE}" in info.tags and "lora" in info.tags
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "README.md", "model.safetensors"}
    assert info.sha == hub.commits(repo_id)[0]["oid"] and info.last_modified is not None

    api.auth_check(repo_id)  # alice is a member of the org: access
    with pytest.raises(GatedRepoError) as err:
        api.auth_check(repo_id, token=hub.other_token)
    assert err.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as err:
        api.auth_check(repo_id, token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "model.safetensors", token=hub.other_token)
    with pytest.raises(GatedRepoError):
        snapshot_download(repo_id, token=hub.other_token)
    assert hf_hub_download(repo_id, "README.md", token=hub.other_token)  # the card is readable before accepting
    hub.grant(repo_id, "bob")
    api.auth_check(repo_id, token=hub.other_token)
    assert Path(hf_hub_download(repo_id, "model.safetensors", token=hub.other_token)).read_bytes() == b"w" * 10

    with pytest.raises(HfHubHTTPError) as err:
        api.auth_check(repo_id, token=hub.read_token, write=True)
    assert err.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):
        api.auth_check(f"alice/{unique('missing')}")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"alice/{unique('missing')}")


def test_private_repos_and_write_permissions(hub: HubServer, api: HfApi) -> None:
    repo_id = f"alice/{unique('private')}"
    api.create_repo(repo_id, private=True)
    assert api.model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(repo_id, token=hub.other_token)
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(repo_id, token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, token=hub.read_token)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"{HUB_ORG}/{unique('not-bobs')}", token=hub.other_token)
    assert err.value.response.status_code == 403


def test_list_models_author_search_filter(hub: HubServer, api: HfApi) -> None:
    author = f"{HUB_ORG}"
    tag = unique("tag")
    adapter = f"{author}/{unique('style-lora')}"
    plain = f"{author}/{unique('plain-model')}"
    hub.seed_repo(adapter, {"README.md": CARD.replace("sd3.5]", f"sd3.5, {tag}]")})
    hub.seed_repo(plain, {"README.md": f"---\ntags: [{tag}]\nbase_model: {BASE}\n---\n"})
    hub.seed_repo(f"bob/{unique('bobs')}", {"README.md": f"---\ntags: [{tag}]\n---\n"}, owner_token=hub.other_token)

    assert {m.id for m in api.list_models(filter=tag)} >= {adapter, plain}
    assert {m.id for m in api.list_models(filter=tag, author=author)} == {adapter, plain}
    assert [m.id for m in api.list_models(filter=[tag, f"base_model:adapter:{BASE}"])] == [adapter]
    assert [m.id for m in api.list_models(filter=[tag, f"base_model:finetune:{BASE}"])] == [plain]
    assert [m.id for m in api.list_models(search=adapter.split("/")[1][:14], author=author)] == [adapter]
    with_cards = list(api.list_models(filter=tag, author=author, cardData=True, sort="lastModified", limit=1))
    assert len(with_cards) == 1 and with_cards[0].card_data is not None
    full = next(iter(api.list_models(filter=tag, author=author, full=True, search="plain")))
    assert full.sha and [s.rfilename for s in full.siblings] == [".gitattributes", "README.md"]


def test_tree_and_paths_info(hub: HubServer, api: HfApi) -> None:
    repo_id = f"alice/{unique('tree')}"
    hub.seed_repo(repo_id, {"a.txt": "a", "d/b.txt": "bb", "d/e/c.txt": "ccc"})
    top = {(e.path, type(e).__name__) for e in api.list_repo_tree(repo_id)}
    assert top == {(".gitattributes", "RepoFile"), ("a.txt", "RepoFile"), ("d", "RepoFolder")}
    deep = {e.path: getattr(e, "size", None) for e in api.list_repo_tree(repo_id, path_in_repo="d", recursive=True)}
    assert deep == {"d/e": None, "d/b.txt": 2, "d/e/c.txt": 3}
    infos = api.get_paths_info(repo_id, ["a.txt", "d", "nope"])
    assert [(i.path, type(i).__name__) for i in infos] == [("a.txt", "RepoFile"), ("d", "RepoFolder")]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="nope"))


def test_fail_next_and_request_log(hub: HubServer, api: HfApi) -> None:
    repo_id = f"alice/{unique('flaky')}"
    hub.seed_repo(repo_id, {"f.txt": "f"})
    hub.clear_requests()
    hub.fail_next("GET", f"/api/models/{repo_id}", status=400)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(repo_id)
    assert err.value.response.status_code == 400
    assert api.model_info(repo_id).id == repo_id  # the failure was used up
    assert hub.requests[-2:] == [("GET", f"/api/models/{repo_id}", 400), ("GET", f"/api/models/{repo_id}", 200)]
    assert hub.downloads(repo_id) == []

    # preupload goes through huggingface_hub's http_backoff, which retries 5xx (after ~1 s)
    hub.fail_next("POST", "/preupload/", status=503)
    api.upload_file(path_or_fileobj=b"g", path_in_repo="g.txt", repo_id=repo_id)
    assert [r.status for r in hub.api_calls("/preupload/")] == [503, 200]
    assert hub.files(repo_id)["g.txt"] == b"g"


def test_range_requests(hub: HubServer) -> None:
    repo_id = f"alice/{unique('range')}"
    hub.seed_repo(repo_id, {"blob.bin": bytes(range(100))})
    url = f"{hub.endpoint}/{repo_id}/resolve/main/blob.bin"

    def fetch(method: str = "GET", byte_range: str | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {hub.token}"})
        if byte_range:
            request.add_header("Range", byte_range)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), b""

    status, headers, body = fetch(byte_range="bytes=10-19")
    assert (status, body, headers["Content-Range"]) == (206, bytes(range(10, 20)), "bytes 10-19/100")
    assert fetch(byte_range="bytes=-5")[2] == bytes(range(95, 100))
    assert fetch(byte_range="bytes=100-")[0] == 416
    status, headers, body = fetch("HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "100"
    assert headers["X-Repo-Commit"] == hub.commits(repo_id)[0]["oid"] and headers["ETag"].strip('"')


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_datasets_streaming(hub: HubServer, hub_datasets: dict[str, str], layout: str) -> None:
    import datasets

    expected = sample_rows()
    stream = datasets.load_dataset(hub_datasets[layout], streaming=True, split="train")
    rows = list(stream)
    assert len(rows) == len(expected)
    by_caption = {caption: (png, size) for png, caption, size in expected}
    for row in rows:
        _, size = by_caption[row["text"]]
        image = row["image"].convert("RGB")
        assert image.size == size and image.size in SIZES
        assert image.getpixel((0, 0)) == (255, 255, 255)  # the diagonal stripe


def test_settings_commits_refs_and_existence(hub: HubServer, api: HfApi) -> None:
    repo_id = f"alice/{unique('misc')}"
    hub.seed_repo(repo_id, {"a.txt": "a"}, message="Seed files")
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["Seed files", "initial commit"]
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    assert api.file_exists(repo_id, "a.txt") and not api.file_exists(repo_id, "b.txt")
    assert api.repo_exists(repo_id) and not api.repo_exists(f"alice/{unique('nope')}")
    api.update_repo_settings(repo_id, gated="manual", private=True)
    info = api.model_info(repo_id)
    assert (info.gated, info.private) == ("manual", True)
    api.delete_repo(repo_id)
    assert not hub.repo_exists(repo_id)
