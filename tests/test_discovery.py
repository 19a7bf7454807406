"""Adapter discovery and fetching: file choice, size-checked download, list_adapters against the local Hub."""

from __future__ import annotations

import itertools

import pytest

from sd35hub.adapters.files import pick_adapter_file
from sd35hub.errors import AdapterError, LicenseNotAcceptedError, RepoNotFoundError, UnsafeFileError
from sd35hub.hub.discovery import adapter_info, download_adapter, list_adapters


@pytest.mark.parametrize(
    ("filenames", "expected"),
    [
        (["README.md", "pytorch_lora_weights.safetensors"], "pytorch_lora_weights.safetensors"),
        (
            ["my_style.safetensors", "sub/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"],
            "pytorch_lora_weights.safetensors",
        ),
        (["style.safetensors", "style_lora.safetensors", "a.safetensors"], "style_lora.safetensors"),
        (["zeta.safetensors", "beta.safetensors", "alphabet.safetensors"], "beta.safetensors"),
        (
            ["checkpoint-500/pytorch_lora_weights.safetensors", "checkpoints/lora.safetensors", "final.safetensors"],
            "final.safetensors",
        ),
        (["model.bin", "lora.safetensors"], "lora.safetensors"),
    ],
)
def test_pick_adapter_file_is_deterministic_in_any_order(filenames: list[str], expected: str) -> None:
    for order in itertools.permutations(filenames):
        assert pick_adapter_file(list(order)) == expected


def test_pick_adapter_file_refuses_pickled_only_repo() -> None:
    with pytest.raises(UnsafeFileError, match="safetensors"):
        pick_adapter_file(["README.md", "pytorch_lora_weights.bin", "checkpoint-1/x.safetensors"])
    with pytest.raises(AdapterError, match="No .safetensors"):
        pick_adapter_file(["README.md", "images/a.png"])


MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
LARGE = "stabilityai/stable-diffusion-3.5-large"


def _card(base: str, trigger: str | list[str] | None = None, widget_url: str | None = None) -> str:
    lines = ["---", f"base_model: {base}", "base_model_relation: adapter", "license: other",
             "license_name: stabilityai-ai-community", "tags: [lora, sd3.5]"]
    if trigger is not None:
        lines.append(f"instance_prompt: {trigger!r}" if isinstance(trigger, str) else f"instance_prompt: {trigger}")
    if widget_url:
        lines += ["widget:", "- text: a prompt", "  output:", f"    url: {widget_url}"]
    return "\n".join([*lines, "---", "", "# adapter", ""])


@pytest.fixture(scope="module")
def adapters(hub) -> dict[str, str]:
    import torch
    from safetensors.torch import save

    def tensors(n: int) -> bytes:
        return save({"transformer.a.lora_A.weight": torch.zeros(n, 4)})

    repos = {
        "style": "sd35hub-org/disc-style",
        "multi": "bob/disc-multi",
        "pickled": "bob/disc-pickled",
        "large": "alice/disc-large",
    }
    hub.seed_repo(repos["style"], {
        "README.md": _card(MEDIUM, "sks style", "images/a.png"),
        "pytorch_lora_weights.safetensors": tensors(2),
        "images/a.png": b"png", "checkpoint-10/pytorch_lora_weights.safetensors": tensors(1),
    })
    hub.seed_repo(repos["multi"], {
        "README.md": _card(MEDIUM, ["zzt", "zzt person"]),
        "my_style_v2.safetensors": tensors(2), "my_style_lora.safetensors": tensors(3), "aa.safetensors": tensors(1),
        "samples/z.png": b"png", "images/loss.png": b"png", "images/b.png": b"png",
    }, owner_token=hub.other_token)
    hub.seed_repo(repos["pickled"], {"README.md": _card(MEDIUM, "old"), "pytorch_lora_weights.bin": b"pickle"},
                  owner_token=hub.other_token)
    hub.seed_repo(repos["large"], {"README.md": _card(LARGE, "lrg"), "lora.safetensors": tensors(64)})
    return repos


def test_list_adapters_by_base_model_with_trigger_words_and_preview(hub, adapters) -> None:
    found = {info.repo_id: info for info in list_adapters(MEDIUM)}
    # the session's Hub is shared: other tests publish Medium adapters too, so check ours only
    assert {adapters["style"], adapters["multi"]} <= set(found)
    assert adapters["pickled"] not in found and adapters["large"] not in found  # pickle-only skipped, Large excluded
    style = found[adapters["style"]]
    assert style.base_model == MEDIUM and style.trigger_words == ["sks style"]
    assert style.adapter_file == "pytorch_lora_weights.safetensors"
    assert style.preview_url == f"{hub.endpoint}/{adapters['style']}/resolve/main/images/a.png"
    assert style.license == "other" and style.license_name == "stabilityai-ai-community"
    multi = found[adapters["multi"]]
    assert multi.trigger_words == ["zzt", "zzt person"]
    assert multi.adapter_file == "my_style_lora.safetensors"
    assert multi.preview_url == f"{hub.endpoint}/{adapters['multi']}/resolve/main/images/b.png"  # not the loss plot


def test_list_adapters_filters(hub, adapters) -> None:
    assert [i.repo_id for i in list_adapters(MEDIUM, author="bob")] == [adapters["multi"]]
    assert [i.repo_id for i in list_adapters(MEDIUM, search="disc-sty")] == [adapters["style"]]
    everything = {i.repo_id for i in list_adapters()}  # all SD3.5 bases
    assert {adapters["style"], adapters["multi"], adapters["large"]} <= everything
    assert adapters["pickled"] not in everything
    assert list_adapters(MEDIUM, author="nobody-here") == []


def test_download_adapter_picks_file_and_checks_size_first(hub, adapters) -> None:
    path = download_adapter(adapters["multi"])
    assert path.name == "my_style_lora.safetensors"
    assert path.read_bytes() == hub.files(adapters["multi"])["my_style_lora.safetensors"]
    hub.clear_requests()
    with pytest.raises(AdapterError, match="over the limit"):
        download_adapter(adapters["large"], max_bytes=200)
    assert hub.downloads(adapters["large"]) == []
    with pytest.raises(UnsafeFileError):
        download_adapter(adapters["pickled"])
    with pytest.raises(UnsafeFileError):
        download_adapter(adapters["pickled"], filename="pytorch_lora_weights.bin")
    assert hub.downloads(adapters["pickled"]) == []
    with pytest.raises(AdapterError, match="no file 'missing.safetensors'"):
        download_adapter(adapters["style"], filename="missing.safetensors")
    with pytest.raises(RepoNotFoundError):
        download_adapter("nobody/nothing")


def test_download_gated_adapter_without_access(hub) -> None:
    hub.seed_repo("bob/disc-gated", {"lora.safetensors": b"x"}, gated=True, owner_token=hub.other_token)
    with pytest.raises(LicenseNotAcceptedError, match=f"{hub.endpoint}/bob/disc-gated"):
        download_adapter("bob/disc-gated")
    assert hub.downloads("bob/disc-gated") == []


def test_cli_list_adapters(hub, adapters, capsys) -> None:
    from sd35hub.frontends.cli import main

    main(["list-adapters", "--base", MEDIUM, "--author", "bob"])
    out = capsys.readouterr().out
    assert f"{adapters['multi']}  base={MEDIUM}  file=my_style_lora.safetensors  trigger=zzt, zzt person" in out


def test_adapter_info_of_one_repo_reads_metadata_only(hub, adapters) -> None:
    hub.clear_requests()
    info = adapter_info(adapters["multi"])
    assert (info.base_model, info.adapter_file, info.trigger_words) == (
        MEDIUM, "my_style_lora.safetensors", ["zzt", "zzt person"])
    assert "aa.safetensors" in info.files
    assert hub.downloads(adapters["multi"]) == []  # no weights read
    with pytest.raises(UnsafeFileError):
        adapter_info(adapters["pickled"])
    with pytest.raises(RepoNotFoundError):
        adapter_info("nobody/nothing")
