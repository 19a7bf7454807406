"""The Space driven with streamlit's AppTest (tiny model, local Hub): search, pick two adapters, change
weights, generate; the image equals a direct engine render with those weights; errors are messages;
plus the logic of sd35hub.frontends.space.support that the app relies on."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from space_helpers import SPACE_APP, SpaceRepos, card, seed_space_repos
from streamlit.testing.v1 import AppTest

from sd35hub.blend.engine import BlendEngine
from sd35hub.blend.request import AdapterRef, GenerationRequest
from sd35hub.errors import AdapterError, ConfigError, PromptSyntaxError, Sd35HubError
from sd35hub.frontends.space import support as space
from sd35hub.frontends.space.support import TINY_HUB_BASE
from sd35hub.pngmeta import read_png_params


@pytest.fixture(scope="module")
def repos(hub) -> SpaceRepos:
    return seed_space_repos(hub)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=90)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def _errors(at: AppTest) -> list[str]:
    assert not at.exception, at.exception  # a traceback element would mean an unhandled error
    return [_unescape(e.value) for e in at.error]


def _unescape(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown.replace("  \n", "\n")).replace("\u2060", "")


def _small_settings(at: AppTest, seed: int) -> None:
    at.number_input(key="steps_tiny").set_value(2)
    at.selectbox(key="size_tiny").set_value("64×64")
    at.checkbox(key="random_seed").uncheck()
    at.number_input(key="seed").set_value(seed)


def _shown(at: AppTest) -> str:
    """The page's Markdown as the visitor reads it (md_text's backslash escapes removed)."""
    return " ".join(_unescape(m.value) for m in [*at.markdown, *at.caption])


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_search_blend_two_adapters_and_generate(app: AppTest, repos: SpaceRepos, tmp_path) -> None:
    app.text_input(key="search_query").input(repos.tag)
    app.button(key="search").click().run()
    shown = _shown(app)
    assert (
        repos.watercolor in shown and repos.ink in shown and repos.other_base not in shown
    )  # filtered by base
    assert "Trigger words: wtrclr style" in shown  # trigger words from the card
    assert len(app.image) == 2  # the two preview images

    app.button(key=f"add_{repos.watercolor}").click().run()
    app.button(key=f"add_{repos.ink}").click().run()
    app.slider(key=f"weight_{repos.watercolor}").set_value(0.6)
    app.slider(key=f"weight_{repos.ink}").set_value(-0.4)
    app.checkbox(key=f"trigger_{repos.ink}").uncheck()  # ink's card words ("inkd style") stay out
    app.text_area(key="prompt").input("a fox in the snow")
    _small_settings(app, seed=7)
    app.button(key="generate").click().run()
    assert _errors(app) == []
    assert len(app.image) == 5  # 2 card previews + 2 blend thumbnails + the result

    entry = app.session_state["history"][-1]
    params = entry["params"]  # what the engine actually ran
    assert [(a["source"], a["weight"]) for a in params["adapters"]] == [
        (repos.watercolor, 0.6),
        (repos.ink, -0.4),
    ]
    assert params["prompt"] == "wtrclr style, a fox in the snow"
    assert (params["seed"], params["steps"], params["width"]) == (7, 2, 64)

    direct = BlendEngine("tiny").generate(
        GenerationRequest(
            prompt=params["prompt"], adapters=[AdapterRef(repos.watercolor, 0.6), AdapterRef(repos.ink, -0.4)],
            steps=2, width=64, height=64, guidance_scale=params["guidance_scale"], seed=7, insert_trigger_words=False,
        )
    )  # fmt: skip
    assert np.array_equal(_pixels(entry["png"]), np.asarray(direct.images[0], dtype=np.int16))
    base = BlendEngine("tiny").generate(
        GenerationRequest(prompt=params["prompt"], steps=2, width=64, height=64, seed=7)
    )
    assert not np.array_equal(_pixels(entry["png"]), np.asarray(base.images[0], dtype=np.int16))

    png = tmp_path / "download.png"
    png.write_bytes(entry["png"])
    meta = read_png_params(png)
    assert meta["seed"] == "7" and meta["adapters"] == [
        {"source": repos.watercolor, "weight": 0.6},
        {"source": repos.ink, "weight": -0.4},
    ]
    code = next(c.value for c in app.code if c.language == "python")
    assert "set_adapters" in code and repos.watercolor in code and "[0.6, -0.4]" in code
    scope: dict = {}
    exec(compile(code, "<snippet>", "exec"), scope)  # the snippet shown reproduces the image exactly
    assert np.array_equal(np.asarray(scope["images"][0], dtype=np.int16), _pixels(entry["png"]))

    # Trigger-word toggle off, weight moved again: the next request follows the sliders, not the past.
    app.checkbox(key=f"trigger_{repos.watercolor}").uncheck()
    app.slider(key=f"weight_{repos.watercolor}").set_value(1.5)
    app.button(key="generate").click().run()
    params = app.session_state["history"][-1]["params"]
    assert [a["weight"] for a in params["adapters"]] == [1.5, -0.4] and params[
        "prompt"
    ] == "a fox in the snow"
    assert len(app.session_state["history"]) == 2


def test_random_seed_is_new_and_shown_and_base_comparison(app: AppTest, repos: SpaceRepos) -> None:
    app.text_input(key="paste_source").input(f"https://huggingface.co/{repos.watercolor}")
    app.button(key="add_pasted").click().run()
    assert [c.source for c in app.session_state["adapters"]] == [repos.watercolor]
    app.number_input(key="steps_tiny").set_value(2)
    app.selectbox(key="size_tiny").set_value("64×64")
    app.checkbox(key="compare_base").check()
    seeds = []
    for _ in range(2):
        app.button(key="generate").click().run()
        assert _errors(app) == []
        seeds.append(app.session_state["history"][-1]["params"]["seed"])
        assert app.number_input(key="seed").value == seeds[-1]  # the seed used is the one shown
    assert seeds[0] != seeds[1]
    entry = app.session_state["history"][-1]
    assert entry["base_png"] is not None and len(app.image) >= 2
    plain = BlendEngine("tiny").generate(
        GenerationRequest(prompt=entry["params"]["prompt"], steps=2, width=64, height=64, seed=seeds[-1])
    )
    assert np.array_equal(_pixels(entry["base_png"]), np.asarray(plain.images[0], dtype=np.int16))


def test_errors_render_as_messages(app: AppTest, repos: SpaceRepos) -> None:
    cases = [
        ("alice/no-such-adapter-xyz", "does not exist"),
        ("/etc/passwd", "local paths are not accepted"),
        ("https://example.com/x", "not a Hub model URL"),
        (repos.other_base, "is an adapter for stabilityai/stable-diffusion-3.5-large"),
    ]
    for source, expected in cases:
        app.text_input(key="paste_source").input(source)
        app.button(key="add_pasted").click().run()
        errors = _errors(app)
        assert len(errors) == 1 and expected in errors[0], (source, errors)
        assert app.session_state["adapters"] == []

    # A wrong-shape adapter with no base in its card is accepted, then refused by the engine's check.
    app.text_input(key="paste_source").input(repos.wrong_shape)
    app.button(key="add_pasted").click().run()
    _small_settings(app, seed=1)
    app.button(key="generate").click().run()
    errors = _errors(app)
    assert (
        len(errors) == 1
        and "was made for" in errors[0]
        and "Use an adapter trained on this base" in errors[0]
    )

    app.button(key=f"remove_{repos.wrong_shape}").click()
    app.text_area(key="prompt").input("a fox <lora:/etc/secret.safetensors:0.5>")
    app.button(key="generate").click().run()
    assert "local paths are not accepted" in _errors(app)[0]


def test_link_preselects_adapters_with_weights(monkeypatch: pytest.MonkeyPatch, repos: SpaceRepos) -> None:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=60)
    at.query_params["adapter"] = [f"{repos.watercolor}:0.8", repos.ink, "alice/missing-xyz:0.5"]
    at.run()
    assert [(c.source, c.weight) for c in at.session_state["adapters"]] == [
        (repos.watercolor, 0.8),
        (repos.ink, 1.0),
    ]
    assert at.slider(key=f"weight_{repos.watercolor}").value == 0.8
    errors = _errors(at)
    assert len(errors) == 1 and "alice/missing-xyz" in errors[0]
    at.button(key=f"remove_{repos.ink}").click().run()  # only the first visit reads the link:
    assert [(c.source, c.weight) for c in at.session_state["adapters"]] == [(repos.watercolor, 0.8)]  # removal sticks
    at.run()
    assert [(c.source, c.weight) for c in at.session_state["adapters"]] == [(repos.watercolor, 0.8)]


def test_gated_base_not_accepted_is_a_message(monkeypatch: pytest.MonkeyPatch, repos: SpaceRepos) -> None:
    monkeypatch.setenv(space.SPACE_MODEL_ENV, repos.gated_base)
    at = AppTest.from_file(SPACE_APP, default_timeout=60).run()
    errors = _errors(at)
    # A visitor cannot accept the Space's license: they are told to come back, the log has the fix.
    assert len(errors) == 1 and "cannot load its base model" in errors[0] and "Accept it" not in errors[0]
    assert not any(b.key == "generate" for b in at.button)  # the app stops after the message


def test_visitors_never_use_the_space_token(monkeypatch: pytest.MonkeyPatch, repos: SpaceRepos, hub) -> None:
    """HF_TOKEN (alice's here) is the Space owner's secret: a visitor without a token must not find, add or
    render alice's private adapter; a visitor who pastes alice's token can."""
    private = f"alice/{repos.tag}-private"
    weights = hub.files(repos.watercolor)["pytorch_lora_weights.safetensors"]
    hub.seed_repo(private, {"README.md": card(TINY_HUB_BASE, "prvt style", None),
                            "pytorch_lora_weights.safetensors": weights}, private=True)  # fmt: skip
    base = space.BASES["tiny"]
    assert private not in [a.repo_id for a in space.search_adapters(base, repos.tag)]
    assert private in [a.repo_id for a in space.search_adapters(base, repos.tag, token=hub.token)]
    with pytest.raises(Sd35HubError) as info:
        space.lookup_adapter(private, base)
    assert "does not exist" in space.friendly_error(info.value)
    assert space.lookup_adapter(private, base, token=hub.token).trigger_words == ["prvt style"]
    assert space.adapters_from_query([private], base)[0] == []

    engine = space.load_engine("tiny")  # adapters anonymous, local files only from the Space's folders
    with pytest.raises(Sd35HubError, match="does not exist"):
        engine.load(private)  # e.g. a <lora:alice/...-private:1> prompt tag
    engine.load(private, token=hub.token)  # fetched with the visitor's own token

    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    at = AppTest.from_file(SPACE_APP, default_timeout=90).run()
    at.text_input(key="paste_source").input(private)
    at.button(key="add_pasted").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and "does not exist" in errors[0] and at.session_state["adapters"] == []
    at.text_input(key="user_token").input(hub.token)
    at.button(key="add_pasted").click().run()
    assert _errors(at) == [] and [c.source for c in at.session_state["adapters"]] == [private]


def test_space_engine_reads_no_local_files_but_the_samples(monkeypatch: pytest.MonkeyPatch, hub) -> None:
    monkeypatch.chdir(Path(SPACE_APP).parents[1])  # 'sd35hub/hub/templates' is a local folder from here
    engine = space.load_engine("tiny")
    with pytest.raises(Sd35HubError) as info:
        engine.load("sd35hub/hub/templates")  # looked up on the Hub, not listed from the disk
    assert "model_card.md" not in info.value.message and "does not exist" in info.value.message
    with pytest.raises(AdapterError, match="is not a Hub id"):
        engine.load(str(Path(SPACE_APP).resolve()))
    request = space.build_request(
        space.GenerationForm(prompt="a fox", steps=1, width=64, height=64),
        space.sample_choices(space.BASES["tiny"]),
        base=space.BASES["tiny"],
    )
    result = space.generate(engine, request)
    assert [a["source"] for a in result.params["adapters"]] == [ref.source for ref in request.adapters]


# --- sd35hub.frontends.space.support -----------------------------------------------------------------------


def test_parse_adapter_source() -> None:
    assert space.parse_adapter_source(" me/style-lora ") == "me/style-lora"
    assert space.parse_adapter_source("https://huggingface.co/me/style") == "me/style"
    assert (
        space.parse_adapter_source("https://huggingface.co/me/style/blob/main/sub/a.safetensors")
        == "me/style/sub/a.safetensors"
    )
    assert space.parse_adapter_source("sample:sample-ink") == "sample:sample-ink"
    for bad in ["", "./out/adapter", "~/x/y", "a/b/c", "me/../x", "me/bad name", "sample:../../x"]:
        with pytest.raises(AdapterError):
            space.parse_adapter_source(bad)
    with pytest.raises(AdapterError, match="safetensors"):
        space.parse_adapter_source("https://huggingface.co/me/style/resolve/main/model.ckpt")


def test_build_request_limits_and_trigger_words() -> None:
    form = space.GenerationForm(prompt="a castle", steps=2, width=64, height=64, seed=3)
    choices = [
        space.AdapterChoice("me/a", ["aa style"], weight=0.5),
        space.AdapterChoice("me/b", ["bb"], weight=-1.0, use_trigger_words=False),
    ]
    request = space.build_request(form, choices, base=space.BASES["tiny"])
    assert request.prompt == "aa style, a castle" and not request.insert_trigger_words
    assert request.adapters == [AdapterRef("me/a", 0.5), AdapterRef("me/b", -1.0)]
    too_many = [space.AdapterChoice(f"me/x{i}") for i in range(space.MAX_ADAPTERS + 1)]
    with pytest.raises(ConfigError) as info:
        space.build_request(
            space.GenerationForm(prompt="x" * (space.MAX_PROMPT_CHARS + 1)),
            [*too_many[:-1], space.AdapterChoice("me/y", weight=2.5)] + too_many[-1:],
            base=space.BASES["tiny"],
        )
    assert len(info.value.problems) == 3  # prompt length, adapter count, weight range: all at once
    with pytest.raises(PromptSyntaxError):
        space.build_request(space.GenerationForm(prompt="a <lora:me/x:abc>"), [], base=space.BASES["tiny"])


def test_size_presets_follow_training_buckets() -> None:
    presets = space.size_presets(1024)
    assert presets["1024×1024"] == (1024, 1024) and presets["1344×768"] == (1344, 768)
    assert presets["512×512"] == (512, 512)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in presets.values())
    assert space.default_size(1024, "stabilityai/stable-diffusion-3.5-large") == "1024×1024"
    assert "64×64" in space.size_presets(256)


def test_available_bases() -> None:
    assert [b.key for b in space.available_bases("", has_gpu=True)] == ["large", "medium", "turbo"]
    assert [b.model for b in space.available_bases("", has_gpu=False)] == ["tiny"]
    custom = space.available_bases("medium, me/my-sd35")
    assert custom[0].model == "stabilityai/stable-diffusion-3.5-medium" and custom[1].model == "me/my-sd35"


def test_friendly_errors_hide_tracebacks_and_tokens() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert space.friendly_error(oom).startswith("Out of GPU memory for this image")
    secret = "hf_abcdefghijklmnopqrstuvwxyz"
    text = space.friendly_error(RuntimeError(f"boom with {secret}"), token=secret)
    assert secret not in text and "RuntimeError" in text and "Traceback" not in text


def test_sample_adapters_work_offline() -> None:
    files = space.ensure_sample_adapters()
    assert all(f.is_file() for f in files.values())
    choices = space.sample_choices(space.BASES["tiny"])
    assert [c.trigger_words for c in choices] == [["wtrclr style"], ["inkd style"]]
    with pytest.raises(AdapterError, match="tiny test model"):
        space.sample_choices(space.BASES["large"])
    request = space.build_request(
        space.GenerationForm(prompt="a fox", steps=2, width=64, height=64), choices, base=space.BASES["tiny"]
    )
    assert request.prompt == "wtrclr style, inkd style, a fox"
    assert [ref.source for ref in request.adapters] == ["sample:sample-watercolor", "sample:sample-ink"]


# --- hosting files -------------------------------------------------------------------------------


def test_space_metadata_dockerfile_and_pins() -> None:
    from importlib.metadata import version
    from pathlib import Path

    import yaml

    space_dir = Path(SPACE_APP).parent
    front = space_dir.joinpath("README.md").read_text().split("---")[1]
    meta = yaml.safe_load(front)
    assert meta["sdk"] == "docker" and meta["app_port"] == 8501 and meta["suggested_hardware"] == "l40sx1"
    dockerfile = space_dir.joinpath("Dockerfile").read_text()
    assert '"--server.port", "8501"' in dockerfile and "space/app.py" in dockerfile
    assert not re.search(r"^\s*(ENV|ARG)\b.*HF_TOKEN", dockerfile, re.M)  # no token baked into the image
    pins = [
        line.split("==")
        for line in space_dir.joinpath("requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert pins and all(len(pin) == 2 for pin in pins)  # every requirement pinned exactly
    for name, pinned in pins:  # pinned = what `make test` installs (constraints); local labels like +cpu aside
        if name == "torch":  # chosen by the Makefile's TORCH (default = the pin), not by the constraints
            makefile = space_dir.parent.joinpath("Makefile").read_text()
            assert re.search(rf"^TORCH \?= torch=={re.escape(pinned)}$", makefile, re.M)
            continue
        assert version(name).split("+")[0] == pinned, name


def test_persistent_storage_holds_the_caches(tmp_path: Path) -> None:
    from sd35hub.frontends.space.start import DATA_ENV, storage_env

    assert storage_env({DATA_ENV: str(tmp_path)}) == {
        "HF_HOME": str(tmp_path / "huggingface"),
        "SD35HUB_CACHE": str(tmp_path / "sd35hub"),
    }
    assert storage_env({DATA_ENV: str(tmp_path / "not-mounted")}) == {}
    assert storage_env({DATA_ENV: ""}) == {}  # turned off
    assert "sd35hub.frontends.space.start" in Path(SPACE_APP).parent.joinpath("Dockerfile").read_text()


def test_lock_file_pins_the_whole_dependency_set() -> None:
    space_dir = Path(SPACE_APP).parent
    lines = lambda name: space_dir.joinpath(name).read_text().splitlines()  # noqa: E731
    read = lambda name: {  # noqa: E731
        n.lower().replace("_", "-"): v for n, v in (line.split("==") for line in lines(name) if line and line[0] != "#")
    }
    lock, direct = read("requirements.lock"), read("requirements.txt")
    assert all(lock.get(name) == v for name, v in direct.items())  # the same direct pins
    assert len(lock) > 2 * len(direct) and {"numpy", "pyarrow", "jinja2"} <= set(lock)  # transitive ones too
    assert "pip install -r space/requirements.lock" in space_dir.joinpath("Dockerfile").read_text()
