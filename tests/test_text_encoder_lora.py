"""Text-encoder LoRA (#18 part 2, lora.text_encoders): config refusals, the live encoding matches diffusers'
encode_prompt exactly, a trained run's file loads in stock diffusers and reproduces the trainer's model, the TE
keys survive kohya / ComfyUI conversions exactly, and blends weight each adapter's text-encoder part."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lora_helpers import generate_latents, tiny_pipe
from safetensors import safe_open

from sd35hub.config import load_config
from sd35hub.errors import ConfigError

CAPTIONS = ["nrt style a red square", "a blue triangle on white", ""]


# --- config ------------------------------------------------------------------------------------------


def test_config_refusals_are_reported_together_and_name_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.text_encoders=[clip_l,t5,clip_x]", "model.drop_t5=true", "lora.variant=lokr",
                           "lora.text_encoder_rank=0"])
    text = str(err.value)
    assert "lora.text_encoders has ['clip_x']" in text and "lora.text_encoders=[clip_l,clip_g]" in text
    assert "remove t5 from lora.text_encoders or set model.drop_t5=false" in text
    assert "use lora.variant=lora or lora.text_encoders=[]" in text
    assert "lora.text_encoder_rank" in text
    with pytest.raises(ConfigError, match="set model.text_encoder_quantize=auto"):
        load_config(None, ["lora.text_encoders=[t5]", "model.text_encoder_quantize=nf4"])
    with pytest.raises(ConfigError, match="lora.text_encoders is empty, so nothing uses it"):
        load_config(None, ["train.text_encoder_lr=5e-5"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["lora.text_encoders=[clip_l,clip_l]"])
    cfg = load_config(None, ["lora.text_encoders=[clip_l,clip_g]", "train.text_encoder_lr=5e-5",
                             "lora.text_encoder_rank=8"])
    assert cfg.lora.text_encoders == ("clip_l", "clip_g") and cfg.train.text_encoder_lr == 5e-5
    assert load_config(None, []).lora.text_encoders == ()  # off by default


# --- the live encoding -------------------------------------------------------------------------------


def _randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("live", [["text_encoder_2"], ["text_encoder", "text_encoder_2"], ["text_encoder", "text_encoder_3"]],
                         ids=["clip_g", "both", "clip_l+t5"])
@pytest.mark.slow
def test_live_encoding_equals_encode_prompt_of_the_adapted_pipeline(live):
    """Cached (base) embeddings with the live encoders' parts replaced == diffusers' encode_prompt of a pipeline
    that holds the adapted encoders: bit for bit, with gradients reaching every LoRA tensor."""
    from sd35hub.train.live_text import LiveTextEncoders

    pipe = tiny_pipe()
    with torch.no_grad():
        cached, _, cached_pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                         do_classifier_free_guidance=False, max_sequence_length=16)
    encoders = LiveTextEncoders.from_pipeline(pipe, live, device=torch.device("cpu"), max_sequence_length=16)
    params = encoders.attach_lora(4, 8.0)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    for i, name in enumerate(live):
        _randomize_lora(getattr(pipe, name), seed=i)
    prompt_embeds, pooled = encoders.encode(CAPTIONS, cached, cached_pooled)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                     do_classifier_free_guidance=False, max_sequence_length=16)
    assert torch.equal(prompt_embeds.detach(), want) and torch.equal(pooled.detach(), want_pooled)
    assert not torch.equal(want, cached)  # the adapters change the embeddings
    (prompt_embeds.square().sum() + pooled.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for name in {"text_encoder", "text_encoder_2", "text_encoder_3"} - set(live):  # the others get no LoRA
        assert not any("lora_" in n for n, _ in getattr(pipe, name).named_parameters())
    with encoders.adapters_disabled():  # the base encoders again: the cached embeddings
        base, base_pooled = encoders.encode(CAPTIONS, cached, cached_pooled)
    assert torch.equal(base.detach(), cached) and torch.equal(base_pooled.detach(), cached_pooled)


# --- blends: each adapter's text-encoder part at its weight ------------------------------------------


@pytest.mark.slow
def test_blend_weights_each_adapters_text_encoder_part(tmp_path: Path):
    """Two adapters with CLIP-L/CLIP-G parts at weights 0.6 and -0.3 give exactly the embeddings (and image) of
    their merge: every layer adds w1·ΔW1 + w2·ΔW2."""
    from test_formats_interop import _mod

    from sd35hub.adapters.files import load_into_pipeline, read_adapter, set_pipeline_adapters, write_adapter
    from sd35hub.blend.merge import write_merged

    files = []
    for i in range(2):
        te = {"text_encoder": {f"text_model.encoder.layers.{j}.self_attn.q_proj": _mod(32, 32, 4, 2.0 + i, 10 * i + j)
                               for j in (0, 1)},
              "text_encoder_2": {"text_model.encoder.layers.0.self_attn.out_proj": _mod(32, 32, 2, 8.0, 30 + i)}}
        for modules in te.values():
            for m in modules.values():
                m.up = m.up * 20
        files.append(write_adapter({}, tmp_path / f"a{i}", text_encoders=te))
    merged = write_merged([(str(files[0]), 0.6), (str(files[1]), -0.3)], tmp_path / "merged")

    def embeds(pipe):
        with torch.no_grad():
            pe, _, pooled, _ = pipe.encode_prompt(prompt=CAPTIONS[:2], prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=16)
        return pe, pooled

    blended = tiny_pipe()
    for i, file in enumerate(files):
        load_into_pipeline(blended, read_adapter(file), f"a{i}")
    set_pipeline_adapters(blended, ["a0", "a1"], [0.6, -0.3])
    one = tiny_pipe()
    load_into_pipeline(one, read_adapter(merged), "m")
    set_pipeline_adapters(one, ["m"], [1.0])
    got, want = embeds(blended), embeds(one)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    set_pipeline_adapters(blended, ["a0", "a1"], [0.6, 0.0])
    assert (embeds(blended)[0] - want[0]).abs().max() > 1e-3  # the second adapter's weight matters

    # the blend engine (generate, the Space): the two adapters at 0.6 / -0.3 render the merge's image
    import numpy as np

    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef, GenerationRequest

    engine = BlendEngine("tiny", max_cached_adapters=3)

    def pixels(refs: list[AdapterRef]) -> np.ndarray:
        request = GenerationRequest(prompt=CAPTIONS[0], adapters=refs, steps=2, width=64, height=64, seed=3)
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    two = pixels([AdapterRef(str(files[0].parent), 0.6), AdapterRef(str(files[1].parent), -0.3)])
    assert np.abs(two - pixels([AdapterRef(str(merged.parent), 1.0)])).max() <= 1  # 8-bit rounding
    assert np.abs(two - pixels([AdapterRef(str(files[0].parent), 0.6)])).max() > 1


# --- a trained run -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """16 steps with CLIP-L + CLIP-G LoRA (T5 off), kept alive to compare against the trainer's modules."""
    from test_train_recipe import tiny_config

    from sd35hub.train import recipe

    out = tmp_path_factory.mktemp("te-run")
    cfg = tiny_config(out, tmp_path_factory.mktemp("te-cache"), max_steps=16, learning_rate=2e-3, checkpoint_every=8)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, text_encoders=("clip_l", "clip_g"), text_encoder_rank=2,
                                               text_encoder_alpha=4.0),
                      train=dataclasses.replace(cfg.train, text_encoder_lr=5e-3))
    trainer = recipe.Trainer(cfg, log=lambda s: None, progress=False)
    trainer.setup()
    initial = trainer.text.lora_state()
    trainer.train()
    result = trainer.save()
    yield trainer, result, initial
    trainer.cleanup()


@pytest.mark.slow
def test_it_trains_the_clip_loras_and_not_t5(trained):
    trainer, result, initial = trained
    assert result.validation_loss < result.initial_validation_loss, (result.initial_validation_loss, result.validation_loss)
    assert sorted(trainer.text.encoders) == ["text_encoder", "text_encoder_2"]  # T5 is not even kept
    final = trainer.text.lora_state()
    for component in ("text_encoder", "text_encoder_2"):
        ups = [k for k in final if k.startswith(component + "/") and ".lora_B." in k]
        assert ups and all(initial[k].abs().max() == 0 for k in ups)  # gaussian init: B starts at 0
        assert all(final[k].abs().max() > 0 for k in ups), component  # ... and every one moved
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [2e-3, 5e-3]  # train.text_encoder_lr: its own group
    assert sum(p.numel() for p in groups[1]["params"]) == sum(v.numel() for v in final.values())
    # gradients reach every text-encoder LoRA tensor through the live encoding of a training batch
    from sd35hub.train.flow import flow_loss

    batch = trainer.batches.load(trainer._ref(0), generator=torch.Generator().manual_seed(0), sample=True)
    pe, pooled = trainer.text.encode(batch["captions"], batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    model = trainer.acc.unwrap_model(trainer.transformer)
    n = batch["latents"].shape[0]
    flow_loss(model, batch["latents"], pe, pooled, torch.randn_like(batch["latents"]), torch.full((n,), 0.5)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.text_params)
    trainer.optimizer.zero_grad(set_to_none=True)
    with safe_open(str(result.adapter_path), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    assert not any(k.startswith("text_encoder_3.") for k in keys)
    assert {k.split(".")[-3] for k in keys if k.startswith("text_encoder")} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    summary = result.summary
    assert summary["lora"]["text_encoders"] == ["clip_l", "clip_g"] and summary["lora"]["text_encoder_rank"] == 2
    card = (result.output_dir / "README.md").read_text()
    assert "text_encoder" in card and "CLIP-L" in card


@pytest.mark.slow
def test_stock_diffusers_loads_the_file_and_reproduces_the_trained_pipeline(trained):
    """The pipeline made of the trainer's own modules (transformer + adapted CLIPs) vs stock diffusers with
    load_lora_weights on the saved file: same seed, same latents; the text-encoder part matters."""
    from diffusers import StableDiffusion3Pipeline

    from sd35hub.models.tiny import tiny_model_path

    trainer, result, _ = trained
    stock = StableDiffusion3Pipeline.from_pretrained(str(tiny_model_path()))
    stock.set_progress_bar_config(disable=True)
    base = generate_latents(stock, prompt=CAPTIONS[0])
    ours = StableDiffusion3Pipeline(transformer=trainer.acc.unwrap_model(trainer.transformer).eval(),
                                    text_encoder=trainer.text.encoders["text_encoder"],
                                    text_encoder_2=trainer.text.encoders["text_encoder_2"],
                                    **{k: getattr(stock, k) for k in ("scheduler", "vae", "tokenizer", "tokenizer_2",
                                                                     "text_encoder_3", "tokenizer_3")})
    ours.set_progress_bar_config(disable=True)
    expected = generate_latents(ours, prompt=CAPTIONS[0])
    stock.load_lora_weights(str(result.output_dir / "adapter"))
    got = generate_latents(stock, prompt=CAPTIONS[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - base).abs().max() > 1e-4
    # without its text-encoder part the image is another one: the CLIP LoRAs were trained, not idle
    stock.disable_lora()
    stock.transformer.enable_lora()
    assert (generate_latents(stock, prompt=CAPTIONS[0]) - expected).abs().max() > 1e-6


@pytest.mark.slow
def test_convert_round_trips_the_trained_text_encoder_keys_exactly(trained, tmp_path, capsys):
    from cli_helpers import run_cli

    from sd35hub.adapters.files import read_adapter

    _, result, _ = trained
    source = read_adapter(result.adapter_path)
    assert sorted(source.text_encoders) == ["text_encoder", "text_encoder_2"]
    current = str(result.adapter_path)
    for i, layout in enumerate(("kohya", "comfyui", "kohya", "diffusers")):
        target = tmp_path / f"{i}-{layout}.safetensors"
        code, out, err = run_cli(["convert", current, str(target), "--to", layout], capsys)
        assert code == 0 and "text-encoder modules" in out, (out, err)
        with safe_open(str(target), framework="pt") as handle:
            keys = list(handle.keys())
        prefix = {"kohya": "lora_te1_", "comfyui": "text_encoders.clip_l.transformer.", "diffusers": "text_encoder."}
        assert any(k.startswith(prefix[layout]) for k in keys), layout
        current = str(target)
    back = read_adapter(current)
    for component, modules in source.text_encoders.items():
        assert sorted(back.text_encoders[component]) == sorted(modules)
        for name, module in modules.items():
            other = back.text_encoders[component][name]
            assert torch.equal(other.down, module.down) and torch.equal(other.up * other.scale, module.up * module.scale)


@pytest.mark.slow
def test_the_checkpoint_holds_the_text_encoder_lora_and_resume_restores_it(trained, tmp_path):
    from sd35hub.train import checkpoint as ckpt

    trainer, _, _ = trained
    saved = ckpt.load_resumable("latest", trainer.checkpoint_dir, lambda line: None)
    final = trainer.text.lora_state()
    assert all(torch.equal(saved.lora[k], v) for k, v in final.items())
    with torch.no_grad():
        for p in trainer.text_params:
            p.zero_()
    trainer.text.load_lora_state(saved.lora)
    assert all(torch.equal(trainer.text.lora_state()[k], v) for k, v in final.items())
    with pytest.raises(ConfigError, match="lacks"):
        trainer.text.load_lora_state({k: v for k, v in saved.lora.items() if not k.startswith("text_encoder_2/")})


# --- the memory plan ---------------------------------------------------------------------------------


def test_memory_plan_counts_the_encoders_kept_for_training(tmp_path: Path):
    from test_memory_plan import _inputs

    from sd35hub.models.real_configs import write_config_folder
    from sd35hub.workflows.plan import plan_memory
    from sd35hub.workflows.sizes import sizes_from_folder

    large = sizes_from_folder(write_config_folder("large", tmp_path / "large"))
    inputs = _inputs(gpu_budget_gib=40.0, quantize="none")
    plain = plan_memory(large, inputs).phase("train")
    clips = plan_memory(large, dataclasses.replace(inputs, text_encoder_lora=("text_encoder", "text_encoder_2"),
                                                   text_encoder_rank=16)).phase("train")
    clip_bytes = large["text_encoder"].weight_bytes("bf16") + large["text_encoder_2"].weight_bytes("bf16")
    assert clips.weights_bytes == plain.weights_bytes + clip_bytes
    assert clips.gpu_gib - plain.gpu_gib > clip_bytes / 2**30  # weights + LoRA + optimizer state + activations
    assert "CLIP-L, CLIP-G + LoRA r16 kept" in clips.strategy
    with_t5 = plan_memory(large, dataclasses.replace(inputs, text_encoder_lora=("text_encoder_3",),
                                                     text_encoder_rank=16)).phase("train")
    assert with_t5.gpu_gib - plain.gpu_gib > 8.0  # T5-XXL in bf16 stays on the device
    assert plan_memory(large, dataclasses.replace(inputs, text_encoder_lora=("text_encoder",), text_encoder_rank=16)
                       ).phase("validate").weights_bytes > plan_memory(large, inputs).phase("validate").weights_bytes


@pytest.mark.slow
def test_cli_flags_reach_the_config_and_the_plan(tmp_path: Path, capsys):
    from cli_helpers import run_cli

    code, out, err = run_cli(["train", "--dry-run", "--model", "tiny", "--dataset", "sample", "--profile", "cpu",
                              "--text-encoders", "clip_l,clip_g", "--text-encoder-lr", "5e-5", "-o",
                              str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0, err
    assert "CLIP-L, CLIP-G + LoRA r16 kept, run every step" in out
    code, out, err = run_cli(["train", "--dry-run", "--model", "tiny", "--dataset", "sample", "--text-encoders", "t5",
                              "model.drop_t5=true"], capsys)
    assert code == 2 and "remove t5 from lora.text_encoders or set model.drop_t5=false" in out + err


@pytest.mark.slow
def test_t5_lora_trains_when_asked_and_generate_applies_it(tmp_path: Path):
    """lora.text_encoders=[t5]: T5 runs live (the CLIPs come from the cache), its LoRA is saved as text_encoder_3.*
    keys, and our generate path (load_into_pipeline) reproduces the trainer's pipeline with it."""
    from diffusers import StableDiffusion3Pipeline
    from test_train_recipe import tiny_config

    from sd35hub.adapters.files import load_into_pipeline, read_adapter, set_pipeline_adapters
    from sd35hub.models.tiny import tiny_model_path
    from sd35hub.train import recipe

    cfg = tiny_config(tmp_path / "out", tmp_path / "cache", max_steps=4, learning_rate=5e-3)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, text_encoders=("t5",)))
    trainer = recipe.Trainer(cfg, log=lambda s: None, progress=False)
    try:
        trainer.setup()
        assert sorted(trainer.text.encoders) == ["text_encoder_3"]
        trainer.train()
        result = trainer.save()
        adapter = read_adapter(result.adapter_path)
        assert sorted(adapter.text_encoders) == ["text_encoder_3"]
        assert {n.rsplit(".", 1)[-1] for n in adapter.text_encoders["text_encoder_3"]} == {"q", "k", "v", "o"}
        stock = StableDiffusion3Pipeline.from_pretrained(str(tiny_model_path()))
        stock.set_progress_bar_config(disable=True)
        ours = StableDiffusion3Pipeline(transformer=trainer.acc.unwrap_model(trainer.transformer).eval(),
                                        text_encoder_3=trainer.text.encoders["text_encoder_3"],
                                        **{k: getattr(stock, k) for k in ("scheduler", "vae", "tokenizer", "tokenizer_2",
                                                                         "text_encoder", "text_encoder_2", "tokenizer_3")})
        ours.set_progress_bar_config(disable=True)
        expected = generate_latents(ours, prompt=CAPTIONS[0])
        load_into_pipeline(stock, adapter, "t5")
        set_pipeline_adapters(stock, ["t5"], [1.0])
        torch.testing.assert_close(generate_latents(stock, prompt=CAPTIONS[0]), expected, atol=1e-5, rtol=1e-5)
    finally:
        trainer.cleanup()


def test_notebook_plan_takes_the_text_encoders():
    from sd35hub.frontends import colab as nb

    plan = nb.build_plan(model="tiny", dataset="sample", trigger_word="sks shape", text_encoders=["clip_l", "clip_g"],
                         text_encoder_lr=5e-5)
    assert plan.config.lora.text_encoders == ("clip_l", "clip_g") and plan.config.train.text_encoder_lr == 5e-5
    assert nb.build_plan(model="tiny", dataset="sample", text_encoders=[]).config.lora.text_encoders == ()
    with pytest.raises(ConfigError, match="set model.drop_t5=false"):
        nb.build_plan(model="tiny", dataset="sample", text_encoders=["t5"], extra=["model.drop_t5=true"])


@pytest.mark.slow
def test_two_processes_train_the_text_encoder_lora_like_one_with_accumulation(tmp_path: Path):
    """DDP wraps only the transformer: the text-encoder LoRA's gradients are averaged by optimize_micro_batch
    (unsynced=...). 2 processes x accumulation 1 == 1 process x accumulation 2, text-encoder keys included."""
    import yaml
    from test_train_ddp import CONFIG, _adapter, _launch, _max_diff

    from sd35hub.train import recipe

    config = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(tmp_path / "cache")},
              "lora": {**CONFIG["lora"], "text_encoders": ["clip_l", "clip_g"]},
              "train": {**CONFIG["train"], "max_steps": 4, "checkpoint_every": 0, "text_encoder_lr": 5e-3}}
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    overrides = ["train.gradient_accumulation=2", f"train.output_dir={tmp_path / 'one'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.train(load_config(config_file, overrides), log=lambda s: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    two = _launch(["-m", "sd35hub", "train", "--config", str(config_file), "--output", str(tmp_path / "two")])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one_sd, two_sd = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert any(k.startswith("text_encoder_2.") for k in two_sd)
    assert _max_diff({k: v for k, v in one_sd.items() if k.startswith("text_encoder")},
                     {k: v for k, v in two_sd.items() if k.startswith("text_encoder")}) <= 1e-5
    assert _max_diff(one_sd, two_sd) <= 1e-5


@pytest.mark.slow
def test_prior_preservation_encodes_the_class_prompt_with_the_adapted_encoders(tmp_path: Path):
    """With data.class_prompt the class images are rendered inside the memory plan (the validation pipeline
    holds no encoder), the live encoders are loaded after the transformer and the class loss goes through
    them: a changed CLIP LoRA changes the prior loss of the same class batch."""
    from test_prior import prior_config

    from sd35hub.train import recipe

    cfg = prior_config(tmp_path / "out", tmp_path / "cache", max_steps=3)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, text_encoders=("clip_g",)))
    trainer = recipe.Trainer(cfg, log=lambda s: None, progress=False)
    try:
        trainer.setup()
        assert trainer.pipe.text_encoder_2 is None and trainer.text.encoders["text_encoder_2"] is not None
        trainer.train()
        result = trainer.save()
        assert result.summary["prior_preservation"]["class_samples_seen"] > 0
        model = trainer.acc.unwrap_model(trainer.transformer)

        def prior_loss() -> float:
            with torch.no_grad():
                return float(trainer.prior.loss(model, 0, train=cfg.train, device=trainer.device,
                                                dtype=trainer.weight_dtype, text=trainer.text))

        before = prior_loss()
        with trainer.text.adapters_disabled():
            base = prior_loss()
        assert before != base  # the trained CLIP-G LoRA reaches the class loss
        assert prior_loss() == before
    finally:
        trainer.cleanup()


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted_with_the_text_encoder_lora(tmp_path: Path):
    """The checkpoint carries the text-encoder LoRA, its optimizer group and its EMA: a resumed run ends
    where an uninterrupted one does, text-encoder keys included."""
    from safetensors.torch import load_file
    from test_train_recipe import tiny_config

    from sd35hub.errors import TrainingInterrupted
    from sd35hub.train import recipe

    def config(name: str, **extra: object):
        cfg = tiny_config(tmp_path / name, tmp_path / "cache", max_steps=5, gradient_accumulation=2, ema_decay=0.9,
                          lr_scheduler="cosine", warmup_steps=1, validation_every=0, checkpoint_every=0, **extra)
        return cfg.replace(lora=dataclasses.replace(cfg.lora, text_encoders=("clip_l",)),
                           train=dataclasses.replace(cfg.train, text_encoder_lr=4e-3))

    recipe.train(config("straight"), log=lambda s: None, progress=False)

    def interrupt_at_2(trainer: recipe.Trainer) -> None:
        if trainer.state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        recipe.train(config("broken"), log=lambda s: None, on_step=interrupt_at_2, progress=False)
    recipe.train(config("broken", resume="latest"), log=lambda s: None, progress=False)
    a, b = (load_file(str(tmp_path / n / "adapter" / "pytorch_lora_weights.safetensors")) for n in ("straight", "broken"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_card_row_and_snippet_note_the_text_encoder_keys():
    from sd35hub.hub.card import CardInfo, build_model_card

    def card(lora: dict) -> str:
        info = CardInfo.from_summary({"base_model": "stabilityai/stable-diffusion-3.5-medium", "variant": "sd3.5-medium",
                                      "steps": 10, "lora": {"rank": 16, "alpha": 16, **lora}})
        return str(build_model_card(info, repo_id="alice/subject"))

    text = card({"text_encoders": ["clip_l", "clip_g"], "text_encoder_rank": 8, "text_encoder_alpha": 8,
                 "text_encoder_lr": 5e-5})
    assert "| text-encoder LoRA | CLIP-L (`text_encoder.*` keys), CLIP-G (`text_encoder_2.*` keys), rank 8" in text
    assert "# the file also holds text_encoder.* and text_encoder_2.* (text-encoder LoRA) keys" in text
    t5 = card({"text_encoders": ["t5"], "text_encoder_rank": 8, "text_encoder_alpha": 8, "text_encoder_lr": 5e-5})
    assert "not by diffusers' `load_lora_weights`" in t5 and "# the file also holds" not in t5
    plain = card({})
    assert "text-encoder LoRA" not in plain and "# the file also holds" not in plain


@pytest.mark.slow
def test_compiled_blocks_pass_gradients_to_the_text_encoder_lora(tmp_path: Path, monkeypatch):
    """train.compile: the blocks' text inputs now need gradients (they come from the live encoders); through
    aot_autograd (aot_eager) the CLIP LoRA still trains."""
    import torch._dynamo
    from test_train_recipe import tiny_config

    from sd35hub.train import recipe, speed

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", max_steps=3, compile=True, learning_rate=5e-3)
    cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, text_encoders=("clip_l",)))
    trainer = recipe.Trainer(cfg, log=lambda s: None, progress=False)
    try:
        with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
            trainer.setup()
            trainer.train()
        blocks = trainer.acc.unwrap_model(trainer.transformer).transformer_blocks
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)  # the blocks were compiled
        ups = {k: v for k, v in trainer.text.lora_state().items() if ".lora_B." in k}
        assert ups and all(v.abs().max() > 0 for v in ups.values())
    finally:
        trainer.cleanup()
        torch._dynamo.reset()
