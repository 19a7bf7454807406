"""sd35hub.hub.sources: the safe adapter-source policy, usable by any front end (#17: it was in the Space).

The library raises typed errors whose message says the fix in the library's terms (no Space, sidebar or paste
box in it); the Space words them for its visitors from their fields (sd35hub.frontends.space.text).
"""

from __future__ import annotations

import uuid

import pytest

from sd35hub.errors import (
    SOURCE_REASONS,
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterSourceError,
    AdapterTooLargeError,
)
from sd35hub.frontends.space.text import adapter_source_message
from sd35hub.hub.sources import check_hub_adapter, parse_hub_source, visitor_token

LARGE = "stabilityai/stable-diffusion-3.5-large"
TINY_BASE = "sd35hub/tiny-sd35"
SPACE_WORDS = ("Space", "sidebar", "Paste", "paste", "here")


def _refusal(text: str) -> AdapterSourceError:
    with pytest.raises(AdapterSourceError) as info:
        parse_hub_source(text)
    return info.value


def test_hub_ids_and_urls_pass_and_local_paths_are_refused() -> None:
    assert parse_hub_source(" me/style-lora ") == "me/style-lora"
    assert parse_hub_source("https://huggingface.co/me/style/blob/main/a.safetensors") == "me/style/a.safetensors"
    for bad in ("./me/style", "/etc/passwd", "~/x", "me/../x", "me", "a/b/c", "sample:sample-ink"):
        error = _refusal(bad)
        assert isinstance(error, AdapterError) and error.exit_code == 9  # the CLI's exit code for adapters
        assert error.reason == "not_repo_id" and "not a Hub repo id OWNER/REPO" in error.message, bad
        assert "never a local path" in error.message and "Pass OWNER/REPO" in error.message
    assert _refusal("https://example.com/x").reason == "not_hub_url"
    assert _refusal("me/-bad-").reason == "invalid_repo_id"
    ckpt = _refusal("https://huggingface.co/me/style/resolve/main/model.ckpt")
    assert ckpt.reason == "not_safetensors" and (ckpt.repo_id, ckpt.filename) == ("me/style", "model.ckpt")
    assert "model.ckpt is not a .safetensors file" in ckpt.message


def test_library_messages_say_the_fix_without_front_end_words_and_the_space_words_them() -> None:
    refusals = [_refusal(t) for t in ("/etc/passwd", "https://example.com/x", "me/-bad-",
                                      "https://huggingface.co/me/s/blob/main/x.bin")]  # fmt: skip
    refusals.append(AdapterSourceError("m", source="me/s/x.safetensors", reason="no_such_file", repo_id="me/s",
                                       filename="x.safetensors"))  # fmt: skip
    assert sorted(e.reason for e in refusals) == sorted(SOURCE_REASONS)  # every reason is worded below
    mismatch, large = AdapterBaseMismatchError("bob/x", LARGE, TINY_BASE), AdapterTooLargeError("bob/x", 3 * 2**20, 2**20)
    assert isinstance(mismatch, AdapterIncompatibleError) and "not for sd35hub/tiny-sd35" in mismatch.message
    assert "3.0 MiB, over the limit of 1.0 MiB (max_bytes)" in large.message
    for error in [*refusals[:4], mismatch, large]:
        assert not any(word in error.message for word in SPACE_WORDS), error.message
    shown = {e.reason: adapter_source_message(e) for e in refusals}
    assert shown["not_repo_id"] == ("'/etc/passwd' is not a Hub repo id (local paths are not accepted here). Paste a "
                                    "Hub id like 'owner/my-sd35-lora' or its https://huggingface.co/owner/my-sd35-lora URL.")
    assert shown["not_hub_url"].startswith("'https://example.com/x' is not a Hub model URL. Paste a Hub id")
    assert shown["invalid_repo_id"].startswith("'me/-bad-' is not a valid Hub repo id. Paste")
    assert shown["not_safetensors"] == "x.bin is not a .safetensors file; only safetensors adapters are loaded here."
    assert shown["no_such_file"] == "me/s has no file 'x.safetensors'. Check the name, or paste the repo id alone."
    assert adapter_source_message(mismatch, {TINY_BASE: "tiny (CPU test model)"}) == (
        f"bob/x is an adapter for {LARGE}, but this Space is running tiny (CPU test model) ({TINY_BASE}). Pick an "
        "adapter made for tiny (CPU test model) (the search lists only those), or switch the base model in the sidebar.")
    assert adapter_source_message(large) == ("bob/x is 3.0 MB, over this Space's limit of 1.0 MB for one adapter: it is "
                                             "probably a full model, not a LoRA. Pick another adapter.")
    assert adapter_source_message(AdapterError("other")) is None  # shown as the library wrote it
    from sd35hub.frontends.cli import format_error

    for error in (refusals[0], mismatch, large):  # the CLI shows the library's message, exit 9
        assert format_error(error) == (f"Error: {error.message}", 9)


def test_check_hub_adapter_refuses_with_typed_errors_before_any_download(hub) -> None:  # noqa: ANN001
    from space_helpers import card

    tag = uuid.uuid4().hex[:6]
    weights = b"\0" * 4096  # metadata only is read: the bytes are never parsed
    ok, other = f"bob/src-{tag}-ok", f"bob/src-{tag}-large"
    hub.seed_repo(ok, {"README.md": card(TINY_BASE, "w", None), "pytorch_lora_weights.safetensors": weights},
                  owner_token=hub.other_token)  # fmt: skip
    hub.seed_repo(other, {"README.md": card(LARGE, None, None), "pytorch_lora_weights.safetensors": weights},
                  owner_token=hub.other_token)  # fmt: skip
    assert check_hub_adapter(ok, TINY_BASE, max_bytes=2**20).repo_id == ok
    with pytest.raises(AdapterSourceError) as missing:
        check_hub_adapter(f"{ok}/nope.safetensors", TINY_BASE, max_bytes=2**20)
    assert (missing.value.reason, missing.value.repo_id, missing.value.filename) == ("no_such_file", ok, "nope.safetensors")
    with pytest.raises(AdapterBaseMismatchError) as mismatch:
        check_hub_adapter(other, TINY_BASE, max_bytes=2**20)
    assert (mismatch.value.declared_base, mismatch.value.expected_base) == (LARGE, TINY_BASE)
    with pytest.raises(AdapterTooLargeError) as large:
        check_hub_adapter(ok, TINY_BASE, max_bytes=1024)
    assert (large.value.size_bytes, large.value.max_bytes) == (4096, 1024)


def test_a_visitor_without_a_token_is_anonymous_never_the_servers_token() -> None:
    assert visitor_token(None) is False and visitor_token("  ") is False and visitor_token(" hf_x ") == "hf_x"
