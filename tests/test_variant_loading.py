"""#18 part 5: the DoRA / LoKr / LoHa adapters we train are usable everywhere: the blend engine and
`generate` apply them exactly (weights blend linearly, with LoRAs too), `convert` writes the one layout that
carries each exactly or refuses naming it, and unloading restores the base bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_variants import SPEC, _inputs, _save, _trained, _transformer

from sd35hub.blend.engine import BlendEngine
from sd35hub.blend.request import AdapterRef, GenerationRequest
from sd35hub.errors import AdapterError, AdapterIncompatibleError
from sd35hub.models import weight_deltas
from sd35hub.train import variants

VARIANTS = ["dora", "lokr", "loha"]


def _variant_file(tmp_path: Path, variant: str, seed_dir: str = "a"):
    spec = dataclasses.replace(SPEC, variant=variant)
    model, _ = _trained(spec)
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0]
    return _save(model, spec, None, tmp_path / seed_dir), expected


def _engine_output(engine: BlendEngine, weights: dict[str, float]) -> torch.Tensor:
    """The engine's transformer with these adapters at these weights (what generate runs)."""
    names = {engine.load(source): w for source, w in weights.items()}
    from sd35hub.adapters.files import set_pipeline_adapters

    set_pipeline_adapters(engine.pipe, list(names), list(names.values()))
    weight_deltas.set_weights(engine.pipe.transformer, names)
    with torch.no_grad():
        return engine.pipe.transformer(**_inputs(), return_dict=False)[0]


@pytest.fixture(scope="module")
def engine():
    return BlendEngine("tiny", dtype="fp32", device="cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_reproduces_the_trained_model_and_unloads_exactly(tmp_path, engine, variant):
    file, expected = _variant_file(tmp_path, variant)
    before = {n: w.detach().clone() for n, w in variants.linear_weights(engine.pipe.transformer).items()}
    with torch.no_grad():
        base = engine.pipe.transformer(**_inputs(), return_dict=False)[0]
    got = _engine_output(engine, {str(file.parent): 1.0})
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert engine._loaded[str(file.parent)].format == variant
    engine.unload(str(file.parent))
    after = variants.linear_weights(engine.pipe.transformer)
    assert all(torch.equal(after[n], w) for n, w in before.items())  # bit for bit, no parametrization left
    assert not weight_deltas.names(engine.pipe.transformer)


def test_weighted_blend_of_variants_and_a_lora_is_the_weighted_sum_of_deltas(tmp_path, engine):
    lokr, _ = _variant_file(tmp_path, "lokr", "k")
    dora, _ = _variant_file(tmp_path, "dora", "d")
    plain_spec = dataclasses.replace(SPEC, rslora=True)
    plain_model, _ = _trained(plain_spec)
    plain = _save(plain_model, plain_spec, None, tmp_path / "p")
    blend = {str(lokr.parent): 0.7, str(dora.parent): -0.4, str(plain.parent): 0.5}
    got = _engine_output(engine, blend)
    reference = _transformer()
    variants.merge_into(reference, [(Path(s), w) for s, w in blend.items()])
    with torch.no_grad():
        torch.testing.assert_close(got, reference(**_inputs(), return_dict=False)[0], atol=2e-5, rtol=1e-4)
    # a weight of 0 switches a variant off
    only_plain = _engine_output(engine, {str(lokr.parent): 0.0, str(dora.parent): 0.0, str(plain.parent): 0.5})
    reference = _transformer()
    variants.merge_into(reference, [(plain, 0.5)])
    with torch.no_grad():
        torch.testing.assert_close(only_plain, reference(**_inputs(), return_dict=False)[0], atol=2e-5, rtol=1e-4)
    for source in blend:
        engine.unload(source)


def test_generate_renders_with_a_lokr_adapter_like_the_merged_model(tmp_path, engine):
    from diffusers import StableDiffusion3Pipeline

    from sd35hub.models.tiny import tiny_model_path

    file, _ = _variant_file(tmp_path, "lokr")
    request = GenerationRequest(prompt="a red fox", adapters=[AdapterRef(str(file.parent), 0.8)], steps=2,
                                guidance_scale=2.0, width=64, height=64, seed=3)
    result = engine.generate(request)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_model_path()))
    variants.merge_into(pipe.transformer, [(file, 0.8)])
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a red fox", num_inference_steps=2, guidance_scale=2.0, width=64, height=64,
                     generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    import numpy as np

    diff = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.max() <= 1
    assert result.params["adapters"][0]["format"] == "lokr"
    from sd35hub.blend.request import diffusers_snippet

    snippet = diffusers_snippet(result.params)
    assert "merge_into(pipe.transformer" in snippet and "set_adapters" not in snippet
    engine.unload(str(file.parent))


@pytest.mark.parametrize("variant,carrier,refused", [("lokr", "comfyui", "diffusers"), ("loha", "comfyui", "kohya"),
                                                     ("dora", "diffusers", "comfyui")])
def test_convert_writes_the_layout_that_carries_it_or_names_it(tmp_path, engine, variant, carrier, refused):
    from sd35hub.frontends.cli import main

    file, expected = _variant_file(tmp_path, variant)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(file), str(out), "--to", carrier]) in (0, None)
    original, written = load_file(str(file)), load_file(str(out))
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    torch.testing.assert_close(_engine_output(engine, {str(out): 1.0}), expected, atol=2e-5, rtol=1e-4)
    engine.unload(str(out))
    with pytest.raises(AdapterError, match=rf"--to {carrier}"):
        variants.convert_variant(file, tmp_path / "no.safetensors", refused)
    assert not (tmp_path / "no.safetensors").exists()


def test_a_variant_for_another_model_is_refused_by_name(tmp_path, engine):
    from safetensors.torch import save_file

    file, _ = _variant_file(tmp_path, "loha")
    tensors = load_file(str(file))
    bad = {k.replace("transformer_blocks_0_attn_to_q", "transformer_blocks_9_attn_to_q"): v for k, v in tensors.items()}
    save_file(bad, str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterIncompatibleError, match="transformer_blocks_9_attn_to_q"):
        engine.load(str(tmp_path / "other.safetensors"))
    wide = {k: (torch.cat([v, v], 1) if k.endswith("hada_w1_b") else v) for k, v in tensors.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(AdapterError, match="LoHa"):
        engine.load(str(tmp_path / "wide.safetensors"))
    assert not weight_deltas.names(engine.pipe.transformer)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_trained_variant_loads_in_generate_and_reproduces_the_trained_model(tmp_path, variant):
    """Trained by the real recipe for a few steps: the saved file through the engine gives the trained
    transformer's output (the trainer's own peft model)."""
    from test_train_recipe import tiny_config

    from sd35hub.train import recipe

    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", max_steps=4)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, variant=variant, targets="attention+ff"))
    trainer = recipe.Trainer(cfg, log=lambda s: None, progress=False)
    trainer.setup()
    trainer.train()
    trainer.save()
    model = trainer.acc.unwrap_model(trainer.transformer).eval()
    with torch.no_grad():
        expected = model(**_inputs(), return_dict=False)[0].float()
    trainer.cleanup()
    engine = BlendEngine("tiny", dtype="fp32", device="cpu")
    got = _engine_output(engine, {str(tmp_path / "run" / "adapter"): 1.0})
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)


def test_adapter_info_describes_and_merge_refuses_a_variant_by_name(tmp_path, capsys):
    from sd35hub.frontends.cli import main

    file, _ = _variant_file(tmp_path, "lokr")
    assert main(["adapter-info", str(file)]) in (0, None)
    shown = capsys.readouterr().out
    assert "variant: LoKr" in shown and "LyCORIS" in shown and "rank: 4" in shown
    plain_spec = dataclasses.replace(SPEC, rslora=True)
    plain = _save(_trained(plain_spec)[0], plain_spec, None, tmp_path / "p")
    from sd35hub.blend.merge import write_merged

    with pytest.raises(AdapterError, match=r"LoKr adapter: `sd35hub merge` joins low-rank LoRAs.*sd35hub generate"):
        write_merged([(str(plain), 1.0), (str(file), 0.5)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_variant_with_pivotal_embeddings_loads_them_too(tmp_path, engine):
    from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, save_embeddings
    from sd35hub.models.tiny import CLIP_HIDDEN

    file, _ = _variant_file(tmp_path, "loha")
    g = torch.Generator().manual_seed(5)
    rows = {"clip_l": torch.randn(2, CLIP_HIDDEN, generator=g), "clip_g": torch.randn(2, CLIP_HIDDEN, generator=g)}
    save_embeddings(rows, file.parent / EMBEDDINGS_FILE, tokens=["<s0>", "<s1>"])
    request = GenerationRequest(prompt="<s0><s1> a dog", adapters=[AdapterRef(str(file.parent), 1.0)], steps=1,
                                guidance_scale=1.0, width=64, height=64, seed=0, insert_trigger_words=False)
    result = engine.generate(request)
    assert engine._loaded[str(file.parent)].embeddings.tokens == ["<s0>", "<s1>"]
    assert result.params["adapters"][0]["format"] == "loha" and "embeddings" in result.params["adapters"][0]
    engine.unload(str(file.parent))
