"""The blending engine on the tiny model: equals diffusers' own set_adapters, LRU eviction really frees the
peft modules, prompt syntax, concurrent requests don't leak weights, Hub adapters, schedulers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import ATTENTION_TARGETS, add_random_lora, tiny_pipe

from sd35hub.adapters.files import AdapterMetadata, save_adapter
from sd35hub.blend.engine import BlendEngine, fetch_adapter_source
from sd35hub.blend.request import AdapterRef, GenerationRequest, parse_prompt
from sd35hub.blend.schedulers import SCHEDULERS
from sd35hub.errors import AdapterError, ConfigError, PromptSyntaxError, Sd35HubError

FF_TARGETS = ["ff.net.0.proj", "ff.net.2", "to_q", "to_out.0"]


def _request(**kwargs) -> GenerationRequest:
    base = {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "guidance_scale": 4.5}
    return GenerationRequest(**{**base, **kwargs})


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three saved adapters: a (attention, r4, alpha 8), b (ff + some attention, r2, alpha 1, trigger word), c."""
    pipe = tiny_pipe()
    root = tmp_path_factory.mktemp("blend_adapters")
    out = {}
    specs = {
        "a": dict(rank=4, alpha=8.0, targets=ATTENTION_TARGETS, seed=11),
        "b": dict(rank=2, alpha=1.0, targets=FF_TARGETS, seed=12),
        "c": dict(rank=3, alpha=3.0, targets=["to_k", "to_v"], seed=13),
    }
    for name, spec in specs.items():
        add_random_lora(pipe.transformer, name, std=0.3, **spec)
        words = ["zxq style"] if name == "b" else []
        meta = AdapterMetadata(rank=0, alpha=0.0, base_model="tiny", trigger_words=words)
        out[name] = save_adapter(pipe.transformer, root / name, metadata=meta, adapter_name=name).parent
    return out


@pytest.fixture(scope="module")
def engine() -> BlendEngine:
    return BlendEngine("tiny", max_cached_adapters=4)


def test_blend_equals_diffusers_set_adapters(engine: BlendEngine, adapters: dict[str, Path]) -> None:
    refs = [AdapterRef(str(adapters["a"]), 0.7), AdapterRef(str(adapters["b"]), -0.4)]
    result = engine.generate(_request(adapters=refs, seed=3, insert_trigger_words=False))
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(adapters["a"]), adapter_name="a")
    pipe.load_lora_weights(str(adapters["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    expected = pipe(
        prompt="a red fox in the snow", num_inference_steps=2, width=64, height=64, guidance_scale=4.5,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images  # fmt: skip
    assert np.array_equal(_pixels(result.images), _pixels(expected))
    base = engine.generate(_request(seed=3))
    assert np.abs(_pixels(base.images) - _pixels(result.images)).max() > 0  # the blend changes the image


def test_snippet_reproduces_the_result(engine: BlendEngine, adapters: dict[str, Path]) -> None:
    refs = [AdapterRef(str(adapters["a"]), 1.3), AdapterRef(str(adapters["c"]), 0.5)]
    result = engine.generate(_request(adapters=refs, seed=5, num_images=2, scheduler="dpmpp-2m"))
    snippet = result.diffusers_snippet()
    assert "set_adapters" in snippet and "DPMSolverMultistepScheduler" in snippet
    scope: dict = {}
    exec(compile(snippet, "<snippet>", "exec"), scope)  # only diffusers + torch, as a user would run it
    assert np.array_equal(_pixels(scope["images"]), _pixels(result.images))


def test_base_comparison_uses_same_seeds(engine: BlendEngine, adapters: dict[str, Path]) -> None:
    refs = [AdapterRef(str(adapters["a"]), 1.0)]
    result = engine.generate(_request(adapters=refs, seed=9, compare_base=True))
    plain = engine.generate(_request(seed=9))
    assert np.array_equal(_pixels(result.base_images), _pixels(plain.images))
    assert not np.array_equal(_pixels(result.images), _pixels(plain.images))


def test_trigger_words_and_prompt_tags(engine: BlendEngine, adapters: dict[str, Path]) -> None:
    result = engine.generate(_request(prompt=f"a fox <lora:{adapters['b']}:0.5>", seed=1))
    assert result.params["prompt"] == "zxq style, a fox"
    assert [a["weight"] for a in result.params["adapters"]] == [0.5]
    no_words = engine.generate(
        _request(prompt=f"a fox <lora:{adapters['b']}:0.5>", insert_trigger_words=False)
    )
    assert no_words.params["prompt"] == "a fox"


def test_parse_prompt() -> None:
    clean, refs = parse_prompt("a castle <lora:me/water:0.8>, dusk <lora:./out/a:-0.3> <lora:x/y@v2>")
    assert clean == "a castle, dusk"
    assert refs == [AdapterRef("me/water", 0.8), AdapterRef("./out/a", -0.3), AdapterRef("x/y@v2", 1.0)]
    assert parse_prompt("x <lora:me/a:1.5e0>")[1] == [AdapterRef("me/a", 1.5)]
    for bad, hint in [
        ("a <lora:>", "no adapter"),
        ("a <lora:me/x:abc>", "not a number"),
        ("a <lora:me/x:>", "empty weight"),
        ("a <lora::0.5>", "no adapter before"),
        ("a <lora:me/x", "malformed"),
        ("a <LORA:me/x:1>", "malformed"),
    ]:
        with pytest.raises(PromptSyntaxError, match=hint):
            parse_prompt(bad)


def test_lru_evicts_and_frees_peft_modules(adapters: dict[str, Path]) -> None:
    small = BlendEngine("tiny", max_cached_adapters=2, max_adapters_per_request=2)
    name_a = small.load(str(adapters["a"]))
    small.load(str(adapters["b"]))
    assert small.load(str(adapters["a"])) == name_a  # cached: same name, moved to most recent
    small.load(str(adapters["c"]))  # evicts b (least recently used)
    assert small.loaded_adapters == [str(adapters["a"]), str(adapters["c"])]
    transformer = small.pipe.transformer
    names_in_modules = {
        name for module in transformer.modules() if hasattr(module, "lora_A") for name in module.lora_A.keys()
    }
    assert len(names_in_modules) == 2 and name_a in names_in_modules
    assert set(transformer.peft_config) == names_in_modules
    with pytest.raises(ConfigError, match="at most 2"):
        small.generate(_request(adapters=[AdapterRef(str(p), 1.0) for p in adapters.values()]))


def test_concurrent_requests_do_not_leak_weights(engine: BlendEngine, adapters: dict[str, Path]) -> None:
    blends = [
        [AdapterRef(str(adapters["a"]), 0.9)],
        [AdapterRef(str(adapters["b"]), 1.5)],
        [AdapterRef(str(adapters["a"]), -0.5), AdapterRef(str(adapters["c"]), 2.0)],
        [],
    ]
    sequential = [_pixels(engine.generate(_request(adapters=b, seed=i)).images) for i, b in enumerate(blends)]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        results[i] = _pixels(engine.generate(_request(adapters=blends[i % 4], seed=i % 4)).images)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert np.array_equal(results[i], sequential[i % 4]), f"request {i} got another request's weights"


def test_hub_adapter_loads_once(engine: BlendEngine, adapters: dict[str, Path], hub) -> None:
    data = (adapters["c"] / "pytorch_lora_weights.safetensors").read_bytes()
    hub.seed_repo(
        "alice/tiny-c-lora",
        {"pytorch_lora_weights.safetensors": data, "README.md": "---\ninstance_prompt: qqz\n---\n"},
    )
    remote = engine.generate(
        _request(adapters=[AdapterRef("alice/tiny-c-lora", 0.8)], seed=2, insert_trigger_words=False)
    )
    local = engine.generate(_request(adapters=[AdapterRef(str(adapters["c"]), 0.8)], seed=2))
    assert np.array_equal(_pixels(remote.images), _pixels(local.images))
    assert remote.params["adapters"][0]["repo_id"] == "alice/tiny-c-lora"
    with_words = engine.generate(_request(adapters=[AdapterRef("alice/tiny-c-lora", 0.8)]))
    assert with_words.params["prompt"].startswith("qqz, ")
    with pytest.raises(AdapterError, match="neither an existing local path nor a Hub id"):
        engine.load("not a path or repo")


def test_local_roots_confine_local_paths_and_size_limit(
    adapters: dict[str, Path], tmp_path: Path, hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo_root)  # 'sd35hub/hub/templates' is then an existing local folder
    roots = (adapters["a"],)
    file, coords = fetch_adapter_source(str(adapters["a"]), local_roots=roots)
    assert file == adapters["a"] / "pytorch_lora_weights.safetensors" and coords == {}
    # Outside the roots a local path is a Hub id: nothing local is read or listed.
    with pytest.raises(Sd35HubError) as info:
        fetch_adapter_source("sd35hub/hub/templates", token=False, local_roots=roots)
    assert "model_card.md" not in info.value.message and "does not exist" in info.value.message
    escapes = [str(adapters["a"] / ".." / "b"), str(adapters["b"] / "pytorch_lora_weights.safetensors")]
    link = adapters["a"] / "link.safetensors"  # a symlink inside a root, pointing outside it
    link.symlink_to(adapters["b"] / "pytorch_lora_weights.safetensors")
    try:
        for outside in [*escapes, str(link)]:
            with pytest.raises(AdapterError, match="is not a Hub id") as info:
                fetch_adapter_source(outside, token=False, local_roots=roots)
            assert "existing local path" not in info.value.message
    finally:
        link.unlink()
    # No roots (CLI, notebook): any local path, as before.
    assert fetch_adapter_source(str(adapters["b"]))[0].parent == adapters["b"]
    # The size limit holds for local files too, before reading.
    with pytest.raises(AdapterError, match="over the limit"):
        fetch_adapter_source(str(adapters["a"]), max_bytes=1024, local_roots=roots)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_generates(engine: BlendEngine, name: str) -> None:
    result = engine.generate(_request(scheduler=name))
    assert result.images[0].size == (64, 64) and _pixels(result.images).std() > 0


@pytest.mark.slow
def test_ode_schedulers_agree_with_euler() -> None:
    """Deterministic samplers integrate the same flow ODE: at 30 steps they land near Euler's latents."""
    from sd35hub.blend.schedulers import make_scheduler

    pipe = tiny_pipe()
    config = dict(pipe.scheduler.config)
    latents = {}
    for name in ("euler", "heun", "dpmpp-2m", "unipc"):
        pipe.scheduler = make_scheduler(name, config)
        latents[name] = pipe(prompt="a fox", num_inference_steps=30, height=64, width=64, output_type="latent",
                             generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    for name in ("heun", "dpmpp-2m", "unipc"):
        assert (latents[name] - latents["euler"]).abs().mean() < 0.02, name


def test_classic_samplers_are_refused_with_reason(engine: BlendEngine) -> None:
    with pytest.raises(ConfigError, match="rectified-flow"):
        engine.generate(_request(scheduler="ddim"))


def test_non_finite_adapters_and_latents_are_named(tmp_path: Path) -> None:
    """#16 item 6: a NaN adapter is refused when loaded, and one that overflows while generating stops the
    run at that step; both messages name the adapter (instead of a silent black image)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sd35hub.errors import NonFiniteError

    pipe = tiny_pipe()
    add_random_lora(pipe.transformer, "huge", rank=2, targets=["to_v", "to_out.0"], seed=5)
    meta = AdapterMetadata(rank=2, alpha=2.0)
    files = {"huge": save_adapter(pipe.transformer, tmp_path / "huge", metadata=meta, adapter_name="huge")}
    with safe_open(files["huge"], "pt") as f:  # a damaged file: save_adapter itself refuses NaN
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    next(iter(tensors.values()))[0, 0] = float("nan")
    files["nan"] = tmp_path / "nan" / "pytorch_lora_weights.safetensors"
    files["nan"].parent.mkdir()
    save_file(tensors, files["nan"], metadata=header)
    engine = BlendEngine("tiny")
    with pytest.raises(AdapterError, match=r"The adapter .*nan.*(non-finite|NaN)"):
        engine.load(str(files["nan"]))
    with pytest.raises(NonFiniteError, match=r"NaN/infinite at step 1 of 2 with .*huge.* × 1e\+35"):
        engine.generate(_request(adapters=[AdapterRef(str(files["huge"]), 1e35)]))  # overflows at this weight
    assert engine.generate(_request()).images  # the engine still works afterwards
