"""LoRA targets on the tiny SD3.5 transformer: presets, block selection, explicit names, fp32 weights."""

from __future__ import annotations

import pytest
import torch

from sd35hub.config import LoraSpec
from sd35hub.errors import ConfigError
from sd35hub.train.lora import attach_lora, target_modules


@pytest.fixture
def transformer():
    from sd35hub.models.load import load_transformer

    return load_transformer("tiny", dtype="bf16")


def test_attention_preset_covers_both_streams_and_attn2(transformer):
    names = target_modules(transformer, LoraSpec(targets="attention"))
    n = len(transformer.transformer_blocks)
    dual = [i for i, b in enumerate(transformer.transformer_blocks) if getattr(b, "attn2", None) is not None]
    assert dual  # the tiny model is Medium-style
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_q_proj" in names
    assert "transformer_blocks.0.attn.to_add_out" in names
    assert f"transformer_blocks.{n - 1}.attn.to_add_out" not in names  # the last block's text stream ends
    for i in dual:
        assert f"transformer_blocks.{i}.attn2.to_q" in names
    assert not any("ff" in name for name in names)
    with_ff = target_modules(transformer, LoraSpec(targets="attention+ff"))
    assert "transformer_blocks.0.ff.net.2" in with_ff and set(names) < set(with_ff)
    assert set(with_ff) <= set(target_modules(transformer, LoraSpec(targets="all-linear")))


def test_block_selection_and_explicit_names(transformer):
    names = target_modules(transformer, LoraSpec(targets="attn.to_q,ff.net.2", blocks="1"))
    assert names == ["transformer_blocks.1.attn.to_q", "transformer_blocks.1.ff.net.2"]
    suffix = target_modules(transformer, LoraSpec(targets="to_q", blocks="0-1"))  # a bare name matches attn and attn2
    assert {n.rsplit(".", 2)[-2] for n in suffix} <= {"attn", "attn2"} and "transformer_blocks.0.attn.to_q" in suffix
    with pytest.raises(ConfigError, match="match no Linear"):
        target_modules(transformer, LoraSpec(targets="to_qq"))
    with pytest.raises(ConfigError, match=r"selects block\(s\) \[.*5\]"):
        target_modules(transformer, LoraSpec(blocks="0-5"))


def test_attach_keeps_base_frozen_and_adapter_fp32(transformer):
    params = attach_lora(transformer, LoraSpec(rank=4, alpha=2.0, targets="attention", blocks="0"))
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert all("lora_" in n and n.startswith("transformer_blocks.0.") for n in trainable)
    assert transformer.peft_config["default"].lora_alpha == 2.0
    x = dict(hidden_states=torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([10.0]),
             encoder_hidden_states=torch.randn(1, 4, 64, dtype=torch.bfloat16),
             pooled_projections=torch.randn(1, 64, dtype=torch.bfloat16))
    out = transformer(**x, return_dict=False)[0]
    assert out.dtype == torch.bfloat16  # fp32 adapter inside a bf16 base runs


def test_load_lora_state_refuses_a_different_block_selection_before_copying(transformer):
    from sd35hub.models.load import load_transformer
    from sd35hub.train.lora import load_lora_state, lora_state

    attach_lora(transformer, LoraSpec(rank=4, blocks="0"))
    saved = lora_state(transformer)
    other = load_transformer("tiny", dtype="bf16")
    attach_lora(other, LoraSpec(rank=4, blocks="all"))
    before = lora_state(other)
    with pytest.raises(ConfigError, match=r"lacks transformer_blocks\.1\..*new output dir"):
        load_lora_state(other, saved)  # a subset of the keys: missing tensors, not a silent partial load
    after = lora_state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was copied
    load_lora_state(transformer, saved)  # the same config still loads


def test_large_block_presets_select_stabilitys_layers_on_a_38_block_transformer():
    from diffusers import SD3Transformer2DModel

    from sd35hub.config import LARGE_BLOCK_PRESETS, Config
    from sd35hub.models.tiny import TRANSFORMER_CONFIG

    large_shaped = SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": 38, "dual_attention_layers": ()})
    names = target_modules(large_shaped, LoraSpec(blocks="large-stability"))
    blocks = sorted({int(n.split(".")[1]) for n in names})
    assert blocks == list(range(12, 25)) + list(range(30, 38))  # Stability's 12-24 (composition) + 30-37 (details)
    assert sorted({int(n.split(".")[1]) for n in target_modules(large_shaped, LoraSpec(blocks="large-photoreal"))}) \
        == list(range(30))
    assert not any("norm1" in n for n in names)  # attention only: the adaptive (adaLN) linears stay frozen
    assert not Config(lora=LoraSpec(blocks="large-details")).problems()
    assert set(LARGE_BLOCK_PRESETS) == {"large-stability", "large-composition", "large-details", "large-photoreal"}


def test_a_large_block_preset_on_a_smaller_model_is_a_config_error_naming_large(transformer):
    with pytest.raises(ConfigError, match=r"preset for SD3\.5 Large .*38 blocks.*has 3"):
        target_modules(transformer, LoraSpec(blocks="large-composition"))
    from sd35hub.config import Config

    assert "large-stability" in " ".join(Config(lora=LoraSpec(blocks="large-all")).problems())
