"""The Space against an attacker (issue #16, security items 1-5): a hostile model card, a hostile link and
hostile prompts, on the tiny model and the local Hub. Each test failed on the code before the fix."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from space_helpers import EVIL, SPACE_APP, HostileRepos, SpaceRepos, seed_hostile_repos, seed_space_repos
from streamlit.testing.v1 import AppTest

from sd35hub.errors import AdapterError, ConfigError
from sd35hub.frontends.space import support as space
from sd35hub.frontends.space import view
from sd35hub.frontends.space.support import TINY_HUB_BASE
from sd35hub.frontends.space.text import hub_image_url, md_text, scrub_paths
from sd35hub.hub.discovery import AdapterInfo

TINY = space.BASES["tiny"]
UNESCAPED_LINK = re.compile(r"(?<!\\)\]\((?!http://127\.0\.0\.1)")  # '](' not escaped, not a Hub page link


@pytest.fixture(scope="module")
def repos(hub) -> SpaceRepos:  # noqa: ANN001
    return seed_space_repos(hub)


@pytest.fixture(scope="module")
def hostile(hub, repos: SpaceRepos) -> HostileRepos:  # noqa: ANN001
    return seed_hostile_repos(hub, repos)


@pytest.fixture(scope="module")
def engine():  # noqa: ANN201
    return space.load_engine("tiny")


def _form(prompt: str = "a fox", **kwargs) -> space.GenerationForm:  # noqa: ANN003
    return space.GenerationForm(prompt=prompt, steps=1, width=64, height=64, seed=3, **kwargs)


def _problems(
    prompt: str, adapters: list[space.AdapterChoice] | None = None, token: str | None = None
) -> str:
    with pytest.raises(ConfigError) as info:
        space.build_request(_form(prompt), adapters or [], base=TINY, token=token)
    return "\n".join(info.value.problems)


# --- 1. trigger words are text -------------------------------------------------------------------


def test_card_trigger_words_are_text_never_tags(hostile: HostileRepos, repos: SpaceRepos, engine) -> None:  # noqa: ANN001
    choice = space.lookup_adapter(hostile.card, TINY)
    assert choice.ignored_trigger_words == 1 and all(len(w) <= 200 for w in choice.trigger_words)  # the flood
    assert any(w.startswith(f"<lora:{repos.ink}:50>") for w in choice.trigger_words)  # kept, as text
    request = space.build_request(_form(), [choice], base=TINY)
    assert not request.parse_prompt_tags and f"<lora:{repos.ink}:50>" in request.prompt
    result = space.generate(engine, request)
    ran = [(a["source"], a["weight"]) for a in result.params["adapters"]]
    assert ran == [(hostile.card, 1.0)]  # not ink × 50, not alice's private file
    assert all(hostile.private not in source for source in engine.loaded_adapters)
    assert view.history_entry(result)["label"] == f"{hostile.card} × 1"


# --- 2. prompt tags: the blend panel's checks -----------------------------------------------------


def test_prompt_tags_get_the_blend_panels_checks(
    hub,
    hostile: HostileRepos,
    repos: SpaceRepos,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    assert "between -1 and 2" in _problems(
        f"a lighthouse <lora:{repos.ink}:1000> <lora:{repos.watercolor}:-40>"
    )
    assert "twice" in _problems("a lighthouse " + f"<lora:{repos.ink}:2> " * 30)  # no summing to 60
    assert "is an adapter for stabilityai/stable-diffusion-3.5-large" in _problems(
        f"x <lora:{repos.other_base}>"
    )
    assert "does not exist" in _problems(
        f"x <lora:{hostile.private}>"
    )  # alice's: HF_TOKEN is not the visitor's
    for path in (hostile.private_cache_path, "./adapter", "~/x.safetensors", "../../etc/passwd"):
        assert "local paths are not accepted" in _problems(f"x <lora:{path}:1>"), path
    five = [repos.watercolor, repos.ink, repos.wrong_shape, "sample:sample-ink", "sample:sample-watercolor"]
    assert "at most 4" in _problems("x " + " ".join(f"<lora:{s}:0.5>" for s in five))
    panel = space.lookup_adapter(repos.watercolor, TINY)
    assert "twice" in _problems(f"x <lora:{repos.watercolor}:0.5>", [panel])
    monkeypatch.setattr(space, "MAX_ADAPTER_BYTES", 1024)
    assert "over this Space's limit" in _problems(f"x <lora:{repos.ink}>")
    monkeypatch.undo()
    request = space.build_request(_form(f"a fox <lora:{repos.ink}:0.5>"), [panel], base=TINY)
    assert [(r.source, r.weight) for r in request.adapters] == [(repos.watercolor, 1.0), (repos.ink, 0.5)]
    assert request.prompt == "wtrclr style, a fox"
    # With the visitor's own token the same tag works (access checked with their token, not HF_TOKEN).
    request = space.build_request(_form(f"x <lora:{hostile.private}>"), [], base=TINY, token=hub.token)
    assert [r.source for r in request.adapters] == [hostile.private]


# --- 3. untrusted text renders as text ------------------------------------------------------------


def test_markdown_is_escaped_and_images_come_from_the_hub(hub) -> None:  # noqa: ANN001
    text = f"[Session expired](http://{EVIL}/login) **b** ![i](http://{EVIL}/p.png) <lora:o/r:0.8> a_b"
    escaped = md_text(text)
    assert not UNESCAPED_LINK.search(escaped) and "**" not in escaped and "\\<lora\\:" in escaped
    assert re.sub(r"\\(.)", r"\1", escaped).replace("\u2060", "") == text  # shows exactly these characters
    assert "http\u2060\\:" in escaped  # GFM would autolink a bare URL despite the escapes
    assert hub_image_url(f"http://{EVIL}/p.png") is None
    assert hub_image_url(f"{hub.endpoint}/../x.png") is None and hub_image_url("javascript:alert(1)") is None
    assert hub_image_url(f"{hub.endpoint}/o/r/resolve/main/p.png") == f"{hub.endpoint}/o/r/resolve/main/p.png"
    info = AdapterInfo(
        "o/r", TINY_HUB_BASE, "a.safetensors", ["w"], f"http://{EVIL}/p.png", 3, 40, "other", "x"
    )
    card = view.adapter_card(info)
    assert card.image_url is None and card.page_url == f"{hub.endpoint}/o/r"
    assert card.stats == "by o · ♥ 3 · ↓ 40 · license x"


def test_hostile_link_and_card_render_inert_in_the_app(
    monkeypatch: pytest.MonkeyPatch, hostile: HostileRepos, repos: SpaceRepos
) -> None:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=90)
    at.query_params["adapter"] = [hostile.link, hostile.card]
    at.run()
    at.text_input(key="search_query").input(repos.tag)
    at.button(key="search").click().run()
    assert not at.exception
    texts = [e.value for e in at.error] + [m.value for m in at.markdown] + [c.value for c in at.caption]
    texts += [w.label for w in at.checkbox]
    assert any("Session expired" in t for t in texts)  # the link's text is shown ...
    assert not any(UNESCAPED_LINK.search(t) or re.search(r"(?<!\\)\*\*bold", t) for t in texts), (
        texts
    )  # as text
    images = [url for image in at.image for url in image.value]
    assert images and not any(EVIL in url for url in images)  # the hostile card shows no preview at all
    assert [c.source for c in at.session_state["adapters"]] == [hostile.card]


# --- 4. no server paths reach visitors ------------------------------------------------------------


def _server_paths() -> list[str]:
    from huggingface_hub import constants

    from sd35hub.paths import default_cache_dir

    return [str(Path(constants.HF_HUB_CACHE)), str(default_cache_dir()), "snapshots", str(Path.home()) + "/"]


def test_no_server_path_in_params_png_snippet_or_messages(
    monkeypatch: pytest.MonkeyPatch, hub, repos
) -> None:  # noqa: ANN001
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    private = f"alice/{repos.tag}-mine"
    weights = hub.files(repos.ink)["pytorch_lora_weights.safetensors"]
    hub.seed_repo(private, {"pytorch_lora_weights.safetensors": weights}, private=True)
    at = AppTest.from_file(SPACE_APP, default_timeout=90).run()
    at.text_input(key="user_token").input(hub.token)
    at.button(key="add_samples").click().run()
    at.session_state["adapters"] = at.session_state["adapters"][:1]
    at.text_input(key="paste_source").input(private)  # fetched with the visitor's token
    at.button(key="add_pasted").click().run()
    at.number_input(key="steps_tiny").set_value(1)
    at.selectbox(key="size_tiny").set_value("64×64")
    at.button(key="generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    entry = at.session_state["history"][-1]
    assert [a["source"] for a in entry["params"]["adapters"]] == ["sample:sample-watercolor", private]
    png = Image.open(io.BytesIO(entry["png"]))
    shown = [json.dumps(entry["params"]), entry["snippet"], json.dumps(png.text), entry["label"]]
    # (the cards' own text aside: another module's hostile card quotes a cache path as a trigger word)
    shown += [m.value for m in [*at.markdown, *at.caption, *at.code] if "Trigger words" not in m.value]
    for path in _server_paths():
        assert not [text for text in shown if path in text], path
    assert re.search(rf"load_lora_weights\('{private}', weight_name='pytorch_lora_weights.safetensors', "
                     r"revision='[0-9a-f]{40}'", entry["snippet"])  # fmt: skip
    assert f"from_pretrained('{TINY_HUB_BASE}'" in entry["snippet"]
    message = space.friendly_error(
        AdapterError(f"{_server_paths()[0]}/models--a--b/snapshots/c/x.safetensors is bad")
    )
    assert (
        message == "x.safetensors is bad"
        and scrub_paths("see https://huggingface.co/a/b") == "see https://huggingface.co/a/b"
    )


@pytest.mark.slow
def test_snippet_reproduces_the_page_image_with_hub_ids_only(
    monkeypatch: pytest.MonkeyPatch,
    hub,
    repos: SpaceRepos,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """The Space running the tiny base *from the Hub*: its snippet, run by stock diffusers in a fresh
    process with an empty HF cache (another machine), gives the page's image pixel for pixel."""
    monkeypatch.setenv(space.SPACE_MODEL_ENV, TINY_HUB_BASE)
    at = AppTest.from_file(SPACE_APP, default_timeout=120).run()
    at.text_input(key="paste_source").input(repos.watercolor)
    at.button(key="add_pasted").click().run()
    at.slider(key=f"weight_{repos.watercolor}").set_value(0.7)
    at.text_area(key="prompt").input(f"a fox <lora:{repos.ink}:-0.5>")
    at.number_input(key=f"steps_{TINY_HUB_BASE}").set_value(2)
    at.selectbox(key=f"size_{TINY_HUB_BASE}").set_value("64×64")
    at.checkbox(key="random_seed").uncheck()
    at.number_input(key="seed").set_value(11)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    entry = at.session_state["history"][-1]
    snippet = next(c.value for c in at.code if c.language == "python")
    assert snippet.strip() == entry["snippet"].strip()
    assert re.search(rf"from_pretrained\('{TINY_HUB_BASE}', revision='[0-9a-f]{{40}}'", snippet)
    assert len(re.findall(r"revision='[0-9a-f]{40}'", snippet)) == 3  # base + both adapters pinned
    assert not re.search(r"'(/|~|\.)", snippet)  # no path at all
    script = tmp_path / "snippet.py"
    script.write_text(
        snippet + f"\nimport numpy\nnumpy.save({str(tmp_path / 'out.npy')!r}, numpy.asarray(images[0]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SD35HUB", "PYTHONPATH"))}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = np.asarray(Image.open(io.BytesIO(entry["png"])).convert("RGB"))
    assert np.array_equal(np.load(tmp_path / "out.npy"), page)


# --- 5. bounded inputs ----------------------------------------------------------------------------


def test_inputs_are_bounded_and_oversize_adapters_refused_on_add(
    monkeypatch: pytest.MonkeyPatch, repos: SpaceRepos, hostile: HostileRepos
) -> None:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=90).run()
    at.text_area(key="prompt").input("a fox " * 250)  # 1,500 characters: said, not silently cut
    at.button(key="generate").click().run()
    errors = [re.sub(r"\\(.)", r"\1", e.value).replace("\u2060", "") for e in at.error]
    assert any("1,500 characters" in e for e in errors), errors
    assert any("1,500 characters" in w.value for w in at.warning)
    monkeypatch.setattr(space, "MAX_ADAPTER_BYTES", 1024)
    at.text_input(key="paste_source").input(repos.ink)
    at.button(key="add_pasted").click().run()  # refused when added, not at Generate
    assert any("over this Space" in re.sub(r"\\(.)", r"\1", e.value).replace("\u2060", "") for e in at.error)
    assert at.session_state["adapters"] == []
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="at most 200"):
        space.search_adapters(TINY, "x" * 201)
    words = space.lookup_adapter(hostile.card, TINY).trigger_words
    assert sum(map(len, words)) < 500  # the 15,000-character trigger word is not on the page
    long_words = space.AdapterChoice("o/r", [str(i) * 90 for i in range(6)])
    assert "with the trigger words" in _problems("p" * 900, [long_words])
