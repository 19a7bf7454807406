"""LoRA variants: DoRA, rsLoRA, PiSSA/OLoRA, LoKr, LoHa are trained through peft, saved in a layout a real
loader reads, and their files reproduce the trained model exactly (stock diffusers, or our exact merge)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd35hub.adapters.files import AdapterMetadata
from sd35hub.config import LoraSpec, load_config
from sd35hub.errors import AdapterError, ConfigError
from sd35hub.train import variants
from sd35hub.train.lora import attach_lora, lora_state


def _tiny_path() -> Path:
    from sd35hub.models.tiny import tiny_model_path

    return tiny_model_path()


def _transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(_tiny_path()), subfolder="transformer")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g))


def _trained(spec: LoraSpec):
    """A tiny transformer with the variant attached and its adapter moved off its init (as training would)."""
    torch.manual_seed(0)
    model = _transformer()
    params = attach_lora(model, spec)
    initial = lora_state(model) if variants.rewrites_base(spec) else None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    return model, initial


def _save(model, spec: LoraSpec, initial, tmp_path: Path) -> Path:
    meta = AdapterMetadata(rank=spec.rank, alpha=float(spec.alpha or spec.rank), base_model="tiny", variant="tiny")
    return variants.save_trained(model, tmp_path / "adapter", metadata=meta, spec=spec, initial=initial)


SPEC = LoraSpec(rank=4, alpha=8.0, targets="attention+ff")


@pytest.mark.parametrize("changes", [dict(rslora=True), dict(init="pissa"), dict(init="olora"),
                                     dict(init="pissa", rslora=True), dict(variant="dora")],
                         ids=["rslora", "pissa", "olora", "pissa+rslora", "dora"])
@pytest.mark.slow
def test_stock_diffusers_loads_the_file_and_reproduces_the_trained_model(tmp_path, changes):
    from diffusers import StableDiffusion3Pipeline

    spec = dataclasses.replace(SPEC, **changes)
    model, initial = _trained(spec)
    file = _save(model, spec, initial, tmp_path)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(_tiny_path()))  # the ORIGINAL base (pissa: unchanged)
    with torch.no_grad():
        base = pipe.transformer(**_inputs(), return_dict=False)[0]
    pipe.load_lora_weights(str(file.parent))
    with torch.no_grad():
        got = pipe.transformer(**_inputs(), return_dict=False)[0]
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    keys = load_file(str(file))
    if spec.variant == "dora":
        assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    if spec.init in ("pissa", "olora"):  # the change to the original base: a rank-2r LoRA
        assert next(v for k, v in keys.items() if k.endswith("lora_A.weight")).shape[0] == 2 * spec.rank
    # and our exact merge agrees
    fresh = _transformer()
    variants.merge_into(fresh, [(file, 1.0)])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs(), return_dict=False)[0], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_lycoris_files_use_comfyui_keys_and_merge_exactly(tmp_path, variant):
    spec = dataclasses.replace(SPEC, variant=variant)
    model, _ = _trained(spec)
    file = _save(model, spec, None, tmp_path)
    keys = load_file(str(file))
    leaf = "lokr_w1" if variant == "lokr" else "hada_w1_a"
    assert f"lycoris_transformer_blocks_0_attn_to_q.{leaf}" in keys
    assert all(k.startswith("lycoris_transformer_blocks_") for k in keys)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    fresh = _transformer()
    with torch.no_grad():
        base = fresh(**_inputs(), return_dict=False)[0]
    assert variants.merge_into(fresh, [(file, 1.0)]) > 0
    with torch.no_grad():
        got = fresh(**_inputs(), return_dict=False)[0]
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # the LoRA reader (merge, adapter-info) refuses it, naming what the file is (not a low-rank pair);
    # generate / the blend engine / convert read it through variants.read_variant (tests/test_variant_loading.py)
    from sd35hub.adapters.files import read_adapter

    with pytest.raises(AdapterError, match="LoKr" if variant == "lokr" else "LoHa"):
        read_adapter(file)


def test_dora_is_refused_by_the_lora_reader_with_its_name(tmp_path):
    from sd35hub.adapters.files import read_adapter

    spec = dataclasses.replace(SPEC, variant="dora")
    model, _ = _trained(spec)
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(_save(model, spec, None, tmp_path))


def test_weighted_merge_equals_diffusers_adapter_weights(tmp_path):
    """A blend is a weighted sum of deltas: at weight 0.6 our merge equals diffusers' set_adapters(0.6)."""
    from diffusers import StableDiffusion3Pipeline

    spec = dataclasses.replace(SPEC, rslora=True)
    model, _ = _trained(spec)
    file = _save(model, spec, None, tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(_tiny_path()))
    pipe.load_lora_weights(str(file.parent), adapter_name="a")
    pipe.set_adapters(["a"], [0.6])
    fresh = _transformer()
    variants.merge_into(fresh, [(file, 0.6)])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs(), return_dict=False)[0],
                                   pipe.transformer(**_inputs(), return_dict=False)[0], atol=2e-5, rtol=1e-4)


def test_variant_config_problems():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.variant=lokr", "lora.init=pissa", "lora.decompose_factor=0"])
    text = str(err.value)
    assert "lora.variant=lokr" in text and "decompose_factor" in text
    with pytest.raises(ConfigError, match="rewrites the frozen base"):
        load_config(None, ["lora.init=olora", "model.quantize=nf4"])
    with pytest.raises(ConfigError, match="lora.variant"):
        load_config(None, ["lora.variant=boft"])
    assert load_config(None, ["lora.variant=dora", "lora.rslora=true"]).lora.variant == "dora"


@pytest.mark.slow
@pytest.mark.parametrize("changes", [dict(variant="dora"), dict(variant="lokr"), dict(variant="loha"),
                                     dict(init="pissa", rslora=True)], ids=["dora", "lokr", "loha", "pissa+rslora"])
def test_each_variant_trains_and_heldout_loss_falls(tmp_path_factory, changes):
    from test_train_recipe import tiny_config

    from sd35hub.train import recipe

    cache = tmp_path_factory.getbasetemp() / "variants-cache"
    out = tmp_path_factory.mktemp("variant")
    cfg = tiny_config(out, cache, max_steps=12, learning_rate=2e-3)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, **changes))
    result = recipe.train(cfg, log=lambda s: None, progress=False)
    assert result.validation_loss < result.initial_validation_loss, (result.initial_validation_loss, result.validation_loss)
    assert result.summary["lora"]["variant"] == cfg.lora.variant
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_card_says_where_a_variant_loads():
    from sd35hub.hub.card import CardInfo, build_model_card

    def card(lora: dict) -> str:
        return str(build_model_card(CardInfo(base_model="tiny", lora={"rank": 4, **lora}), repo_id=None))

    assert "LoKr, LyCORIS layout: load it in ComfyUI" in card({"variant": "lokr"})
    # the card's snippet cannot use load_lora_weights for LyCORIS keys: it merges the exact delta
    assert "merge_into(pipe.transformer" in card({"variant": "loha"}) and "pipe.load_lora_weights" not in card({"variant": "loha"})
    assert "pipe.load_lora_weights" in card({"variant": "dora"})
    assert "pissa init, rsLoRA (saved as a plain LoRA" in card({"variant": "lora", "init": "pissa", "rslora": True})
    assert "adapter variant" not in card({})
