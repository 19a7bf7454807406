"""sd35hub.hub.sources: the safe adapter-source policy, usable by any front end (#17: it was in the Space)."""

from __future__ import annotations

import pytest

from sd35hub.errors import AdapterError
from sd35hub.hub.sources import parse_hub_source, visitor_token


def test_hub_ids_and_urls_pass_and_local_paths_are_refused() -> None:
    assert parse_hub_source(" me/style-lora ") == "me/style-lora"
    assert parse_hub_source("https://huggingface.co/me/style/blob/main/a.safetensors") == "me/style/a.safetensors"
    for bad in ("./me/style", "/etc/passwd", "~/x", "me/../x", "me", "a/b/c", "sample:sample-ink"):
        with pytest.raises(AdapterError, match="not a"):
            parse_hub_source(bad)
    with pytest.raises(AdapterError, match="safetensors"):
        parse_hub_source("https://huggingface.co/me/style/resolve/main/model.ckpt")


def test_a_visitor_without_a_token_is_anonymous_never_the_servers_token() -> None:
    assert visitor_token(None) is False and visitor_token("  ") is False and visitor_token(" hf_x ") == "hf_x"
