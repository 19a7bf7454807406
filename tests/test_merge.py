"""Merging a weighted blend into one adapter reproduces the blend (max abs diff <= 1e-5), incl. modules
present in only some adapters; `sd35hub merge` writes the adapter and a card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lora_helpers import ATTENTION_TARGETS, add_random_lora, generate_latents, tiny_pipe

from sd35hub.adapters.files import AdapterMetadata, read_adapter, save_adapter
from sd35hub.blend.merge import merge_adapters, merge_modules
from sd35hub.frontends.cli import main


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pipe = tiny_pipe()
    root = tmp_path_factory.mktemp("merge")
    add_random_lora(pipe.transformer, "a", rank=4, alpha=8.0, targets=ATTENTION_TARGETS, seed=21, std=0.3)
    add_random_lora(
        pipe.transformer, "b", rank=2, alpha=1.0, targets=["ff.net.0.proj", "to_q"], seed=22, std=0.3
    )
    return {
        n: save_adapter(
            pipe.transformer, root / n, metadata=AdapterMetadata(0, 0.0, base_model="tiny"), adapter_name=n
        )
        for n in ("a", "b")
    }


def test_merged_adapter_reproduces_the_blend(two: dict[str, Path], tmp_path: Path) -> None:
    blend = tiny_pipe()
    blend.load_lora_weights(str(two["a"].parent), adapter_name="a")
    blend.load_lora_weights(str(two["b"].parent), adapter_name="b")
    blend.set_adapters(["a", "b"], adapter_weights=[0.7, -1.3])
    expected = generate_latents(blend, seed=4)

    state_dict = merge_adapters([(two["a"], 0.7), (two["b"], -1.3)])
    merged = tiny_pipe()
    merged.load_lora_weights(state_dict)  # stock diffusers, no metadata: alpha = rank = scale 1
    got = generate_latents(merged, seed=4)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (expected - generate_latents(tiny_pipe(), seed=4)).abs().max() > 1e-2  # the blend does something


def test_ranks_concatenate_per_module(two: dict[str, Path]) -> None:
    modules = merge_modules([(two["a"], 0.5), (two["b"], 2.0)])
    assert modules["transformer_blocks.0.attn.to_q"].rank == 6  # in both: 4 + 2
    assert modules["transformer_blocks.0.attn.to_k"].rank == 4  # only in a
    assert modules["transformer_blocks.0.ff.net.0.proj"].rank == 2  # only in b
    assert all(m.alpha == m.rank for m in modules.values())
    b = read_adapter(two["b"]).modules["transformer_blocks.0.ff.net.0.proj"]
    merged = modules["transformer_blocks.0.ff.net.0.proj"]
    assert torch.allclose(merged.up @ merged.down, 2.0 * b.scale * b.up @ b.down, atol=1e-6)


def test_merge_cli_writes_adapter_and_card(two: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    main(["merge", f"{two['a'].parent}:0.7", f"{two['b']}:0.3", "--out", str(out)])  # returns on success
    adapter = read_adapter(out)
    assert adapter.metadata is not None and adapter.metadata.base_model == "tiny"
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "other" and header["license_name"] == "stabilityai-ai-community"
    assert "| 0.7 |" in card and "| 0.3 |" in card


def _with_meta(path: Path, tmp_path: Path, name: str, **meta) -> Path:
    """A copy of an adapter whose sd35hub header says ``meta``."""
    from sd35hub.adapters.files import write_adapter

    adapter = read_adapter(path)
    return write_adapter(adapter.modules, tmp_path / name, metadata=AdapterMetadata(0, 0.0, **meta))


def test_merged_card_names_the_base_as_an_adapter_and_dedupes_positive_triggers(two: dict[str, Path], tmp_path: Path) -> None:
    """#15.14: different bases gave no base_model, a '<base model>' snippet and the wrong license link;
    base_model_relation was never set; shared triggers repeated; a negative adapter's trigger inserted."""
    from sd35hub.blend.merge import write_merged
    from sd35hub.errors import AdapterError

    large, medium = "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium"
    a = _with_meta(two["a"], tmp_path, "a", base_model=large, trigger_words=["blb style", "zxq"])
    b = _with_meta(two["b"], tmp_path, "b", base_model=large, trigger_words=["BLB style"])
    c = _with_meta(two["b"], tmp_path, "c", base_model=medium, trigger_words=["neg word"])
    out = tmp_path / "m1"
    write_merged([(str(a), 0.7), (str(b), 0.3), (str(_with_meta(two["b"], tmp_path, "n", base_model=large,
                                                                    trigger_words=["neg word"])), -0.5)], out)
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == large and header["base_model_relation"] == "adapter"
    assert header["license_link"] == f"https://huggingface.co/{large}/blob/main/LICENSE.md"
    assert header["instance_prompt"] == "blb style, zxq"
    assert read_adapter(out).metadata.trigger_words == ["blb style", "zxq"]
    assert f"from_pretrained('{large}'" in card and "<base model>" not in card
    assert str(tmp_path) not in card  # local sources by file name only

    with pytest.raises(AdapterError, match="different bases .*--base-model"):
        write_merged([(str(a), 0.5), (str(c), 0.5)], tmp_path / "m2")
    write_merged([(str(a), 0.5), (str(c), 0.5)], tmp_path / "m3", base_model=medium)
    header = yaml.safe_load((tmp_path / "m3" / "README.md").read_text().split("---")[1])
    assert header["base_model"] == medium and header["license_link"].startswith(f"https://huggingface.co/{medium}/")


def test_blend_prompt_gets_each_trigger_once() -> None:
    from sd35hub.blend.request import with_trigger_words

    assert with_trigger_words("a castle", ["blb style", "BLB style", "zxq"]) == "blb style, zxq, a castle"
    assert with_trigger_words("zxq castle", ["zxq"]) == "zxq castle"
