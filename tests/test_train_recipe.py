"""The trainer end to end on the tiny model (CPU, 64 px): learning, outputs, stock-diffusers loading,
exact resume after an interrupt, and config/dataset errors before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd35hub.config import Config, DataSpec, LoraSpec, ModelSpec, TrainSpec
from sd35hub.errors import ConfigError, DatasetError, TrainingInterrupted
from sd35hub.train import recipe


def tiny_config(output: Path, cache: Path, **train: object) -> Config:
    defaults = dict(output_dir=str(output), max_steps=6, batch_size=2, learning_rate=2e-3, validation_steps=1,
                    checkpoint_every=0, log_every=1, seed=7)
    defaults.update(train)
    return Config(
        model=ModelSpec(name="tiny"),
        data=DataSpec(source="sample", resolution=64, max_samples=10, holdout=2, trigger_word="nrt style",
                      cache_dir=str(cache)),
        lora=LoraSpec(rank=4, alpha=8.0),
        train=TrainSpec(**defaults),
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One 30-step run, kept alive so tests can compare against the trained transformer."""
    out = tmp_path_factory.mktemp("run")
    trainer = recipe.Trainer(tiny_config(out, cache_dir, max_steps=30, validation_every=15), log=lambda s: None,
                             progress=False)
    trainer.setup()
    trainer.train()
    result = trainer.save()
    yield trainer, result
    trainer.cleanup()


@pytest.mark.slow
def test_heldout_loss_falls_and_outputs_are_written(trained):
    _, result = trained
    assert result.steps == 30 and result.samples_seen == 60
    # fixed held-out latents, noise and sigmas: the drop is the adapter's doing
    assert result.validation_loss < 0.97 * result.initial_validation_loss, (result.initial_validation_loss, result.validation_loss)
    out = result.output_dir
    for name in ("adapter/pytorch_lora_weights.safetensors", "README.md", "loss.png", "training_config.yaml",
                 "samples/step_000000.png", "samples/step_000015.png", "samples/step_000030.png", "logs/metrics.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["rank"] == 4 and summary["lora"]["alpha"] == 8.0 and summary["steps"] == 30
    assert summary["initial_validation_loss"] == pytest.approx(result.initial_validation_loss)
    assert all((out / img["path"]).is_file() for img in summary["validation_images"])
    assert summary["peak_memory_of"] == "host" and "peak host memory (no GPU)" in (out / "README.md").read_text()
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))


@pytest.mark.slow
def test_adapter_loads_in_stock_diffusers_and_reproduces_the_trained_transformer(trained):
    from diffusers import StableDiffusion3Pipeline

    trainer, result = trained
    trained_model = trainer.acc.unwrap_model(trainer.transformer)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(_tiny_path()))
    pipe.load_lora_weights(str(result.output_dir / "adapter"))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 12, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g))
    trained_model.eval()
    with torch.no_grad():
        expected = trained_model(**inputs, return_dict=False)[0]
        got = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.transformer.disable_lora()
        base = pipe.transformer(**inputs, return_dict=False)[0]
    assert (expected - base).abs().max() > 1e-3  # the adapter matters...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and loads with alpha=8 != rank=4


def _tiny_path() -> Path:
    from sd35hub.models.tiny import tiny_model_path

    return tiny_model_path()


def _final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    last = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    return load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors")), json.loads((last / "state.json").read_text())


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, cache_dir):
    extra = dict(max_steps=7, gradient_accumulation=2, ema_decay=0.9, lr_scheduler="cosine", warmup_steps=2,
                 validation_every=0)
    straight = tiny_config(tmp_path / "straight", cache_dir, **extra)
    recipe.train(straight.replace(lora=LoraSpec(rank=4, alpha=8.0, dropout=0.1)), log=lambda s: None, progress=False)

    def interrupt_at_3(trainer: recipe.Trainer) -> None:
        if trainer.state.step == 3:
            raise KeyboardInterrupt

    broken = tiny_config(tmp_path / "broken", cache_dir, **extra).replace(lora=LoraSpec(rank=4, alpha=8.0, dropout=0.1))
    with pytest.raises(TrainingInterrupted, match="resume latest"):
        recipe.train(broken, log=lambda s: None, on_step=interrupt_at_3, progress=False)
    assert (tmp_path / "broken" / "checkpoints" / "checkpoint-000003" / "state.json").is_file()
    resumed = broken.replace(train=TrainSpec(**{**broken.train.__dict__, "resume": "latest"}))
    recipe.train(resumed, log=lambda s: None, progress=False)

    a, state_a = _final_state(tmp_path / "straight")
    b, state_b = _final_state(tmp_path / "broken")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert state_a["samples_seen"] == state_b["samples_seen"] == 7 * 2 * 2
    assert state_a["seen_keys_digest"] == state_b["seen_keys_digest"]


@pytest.mark.slow
def test_ctrl_c_mid_step_finishes_the_step_then_checkpoints(tmp_path, cache_dir):
    import os
    import signal

    def ctrl_c_during_next_forward(trainer: recipe.Trainer) -> None:
        if trainer.state.step == 2:  # the signal arrives inside step 3's forward pass
            def send(module, args):  # noqa: ANN001
                handle.remove()
                os.kill(os.getpid(), signal.SIGINT)

            handle = trainer.transformer.register_forward_pre_hook(send)

    config = tiny_config(tmp_path / "run", cache_dir, max_steps=6, validation_every=0)
    with pytest.raises(TrainingInterrupted, match="at step 3"):
        recipe.train(config, log=lambda s: None, on_step=ctrl_c_during_next_forward, progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000003"]  # step 3 completed: weights, optimizer and step agree
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.slow
def test_resume_with_another_lora_rank_is_a_config_error_and_changes_nothing(tmp_path, cache_dir):
    config = tiny_config(tmp_path / "run", cache_dir, max_steps=2, validation_every=0, checkpoint_every=1)
    recipe.train(config, log=lambda s: None, progress=False)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = {p.relative_to(ckpt_dir): p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
    wider = config.replace(lora=LoraSpec(rank=8, alpha=8.0),
                           train=TrainSpec(**{**config.train.__dict__, "resume": "latest", "max_steps": 4}))
    with pytest.raises(ConfigError, match=r"has shape \(4, \d+\) in the checkpoint but \(8, \d+\) here.*new output dir"):
        recipe.train(wider, log=lambda s: None, progress=False)
    after = {p.relative_to(ckpt_dir): p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
    assert after == before  # no checkpoint written, changed or removed


@pytest.mark.slow
def test_final_checkpoint_is_written_once(tmp_path, cache_dir):
    trainer = recipe.Trainer(tiny_config(tmp_path / "run", cache_dir, max_steps=4, validation_every=0, checkpoint_every=2),
                             log=lambda s: None, progress=False)
    saved_at: list[int] = []
    write = trainer.save_checkpoint

    def counting_save():
        saved_at.append(trainer.state.step)
        return write()

    trainer.save_checkpoint = counting_save  # type: ignore[method-assign]
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    assert saved_at == [2, 4]  # not [2, 4, 4]: the end save is the only one at the last step (one Hub push)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))] == [
        "checkpoint-000002", "checkpoint-000004"]


@pytest.mark.slow
def test_step_0_grid_reuses_the_base_images(tmp_path, cache_dir, monkeypatch):
    from sd35hub.train import validation

    rendered: list[bool] = []
    render = validation.render

    def counting_render(pipe, *args, **kwargs):
        rendered.append(pipe.transformer._hf_peft_config_loaded and not _adapters_disabled(pipe.transformer))
        return render(pipe, *args, **kwargs)

    monkeypatch.setattr(validation, "render", counting_render)
    result = recipe.train(tiny_config(tmp_path / "run", cache_dir, max_steps=1, validation_every=0), log=lambda s: None,
                          progress=False)
    # step 0: the base once (adapter off), no LoRA render (lora_B is zero); step 1: the LoRA
    assert rendered == [False, True]
    assert (result.output_dir / "samples" / "step_000000.png").is_file()


def _adapters_disabled(transformer) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in transformer.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.slow
def test_checkpoint_adapter_has_the_ema_weights_like_the_final_adapter(tmp_path, cache_dir):
    from safetensors.torch import load_file

    result = recipe.train(tiny_config(tmp_path / "run", cache_dir, max_steps=4, validation_every=0, checkpoint_every=2,
                                      ema_decay=0.5), log=lambda s: None, progress=False)
    final = load_file(str(result.adapter_path))
    last = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-000004" / "adapter" / result.adapter_path.name))
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)  # same step, same (EMA) weights
    earlier = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-000002" / "adapter" / result.adapter_path.name))
    assert any(not torch.equal(final[k], earlier[k]) for k in final)


@pytest.mark.slow
def test_resume_without_ema_state_starts_the_ema_from_the_resumed_weights(tmp_path, cache_dir):
    config = tiny_config(tmp_path / "run", cache_dir, max_steps=2, validation_every=0)
    recipe.train(config, log=lambda s: None, progress=False)  # no EMA in this run's checkpoints
    with_ema = config.replace(train=TrainSpec(**{**config.train.__dict__, "resume": "latest", "max_steps": 3,
                                                 "ema_decay": 0.9}))
    trainer = recipe.Trainer(with_ema, log=lambda s: None, progress=False)
    try:
        trainer.setup()
        assert trainer.state.step == 2
        trained_b = [n for n, p in trainer.named_params.items() if "lora_B" in n and p.abs().max() > 0]
        assert trained_b  # the resumed lora_B is no longer its zero init...
        for name, p in trainer.named_params.items():  # ...and the EMA averages from it
            torch.testing.assert_close(trainer.ema.shadow[name], p.detach().float(), atol=0, rtol=0)
    finally:
        trainer.cleanup()


def test_bad_config_and_empty_dataset_fail_before_any_model_loads(tmp_path, monkeypatch):
    import sd35hub.models.load as load

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load_pipeline", never)
    monkeypatch.setattr(load, "model_info", never)
    bad = tiny_config(tmp_path / "o", tmp_path / "c", learning_rate=-1.0, timestep_sampling="bogus")
    with pytest.raises(ConfigError) as info:
        recipe.train(bad, log=lambda s: None)
    assert len(info.value.problems) == 2
    (tmp_path / "empty").mkdir()
    empty = tiny_config(tmp_path / "o", tmp_path / "c").replace(data=DataSpec(source=str(tmp_path / "empty")))
    with pytest.raises(DatasetError):
        recipe.train(empty, log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_cli_rejects_a_bad_config_with_exit_2(tmp_path, capsys):
    from sd35hub.frontends.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "tiny", "--dataset", "sample", "--resolution", "100", "--output", str(tmp_path / "o"),
              "train.optimizer=sgd"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.resolution=100" in err and "train.optimizer='sgd'" in err
    assert not (tmp_path / "o").exists()


def test_cli_flags_become_overrides_that_the_positional_ones_beat():
    from sd35hub.config import load_config
    from sd35hub.frontends.commands.train import build_overrides

    overrides = build_overrides({"resolution": 1024, "trigger_word": "sks, dog", "rank": 4}, ["lora.rank=8"])
    assert overrides == ['data.resolution=1024', 'data.trigger_word="sks, dog"', "lora.rank=4", "lora.rank=8"]
    cfg = load_config(None, overrides)
    assert (cfg.data.resolution, cfg.data.trigger_word, cfg.lora.rank) == (1024, "sks, dog", 8)


@pytest.mark.slow
def test_compiled_blocks_compile_training_shapes_only(tmp_path, cache_dir, monkeypatch):
    """train.compile: the blocks compile for the training step; held-out loss and validation sampling
    (other shapes, no_grad) run them eagerly, so they add no graphs; the recompile limit covers every
    block kind x token count x batch size (past dynamo's default 8 it would silently fall back to eager)."""
    import torch._dynamo

    from sd35hub.train import speed

    compiled: list[tuple[bool, tuple[int, ...]]] = []

    def counting_backend(gm, example_inputs):
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3]
        compiled.append((torch.is_grad_enabled(), max(shapes)))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compile_blocks keeps an explicit one
    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting_backend)
    try:
        with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # dynamo's defaults
            result = recipe.train(tiny_config(tmp_path / "run", cache_dir, max_steps=4, validation_every=2, compile=True),
                                  log=lambda s: None, progress=False)
            raised_to = torch._dynamo.config.recompile_limit
    finally:
        torch._dynamo.reset()
    assert compiled, "no block was compiled"
    assert all(grad for grad, _ in compiled), compiled  # nothing compiled under no_grad (held-out loss, sampling)
    assert {shape[0] for _, shape in compiled} == {2}  # the training batch size, not the held-out/sampling batches
    assert raised_to >= speed.RECOMPILE_LIMIT >= 3 * 6 * 2  # kinds x token counts x batch sizes
    assert json.loads((result.output_dir / "summary.json").read_text())["validation_loss"] is not None


@pytest.mark.slow
def test_log_points_are_written_one_step_late_in_order_with_the_exact_loss(tmp_path, cache_dir):
    """A log point's loss is read after the next step is queued (no GPU drain for logging); records
    still come in step order, once each, with that step's loss, and validation / checkpoint / the last
    step read it at once."""
    trainer = recipe.Trainer(tiny_config(tmp_path / "run", cache_dir, max_steps=7, log_every=2, validation_every=4,
                                         checkpoint_every=5), log=lambda s: None, progress=False)
    losses: list[float] = []
    step = trainer._step
    written_at: dict[int, int] = {}

    def recording_step():
        loss = step()
        losses.append(float(loss))
        return loss

    def on_step(tr):
        for r in tr.records:
            if "loss" in r:
                written_at.setdefault(r["step"], tr.state.step)

    trainer._step = recording_step  # type: ignore[method-assign]
    trainer.on_step = on_step
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    order = [(r["step"], "val" if "validation_loss" in r else "loss") for r in records]
    assert order == [(0, "val"), (2, "loss"), (4, "loss"), (4, "val"), (6, "loss"), (7, "loss"), (7, "val")]
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {s: losses[s - 1] for s in (2, 4, 6, 7)}
    # 2 and 6 one step late; 4 at once (validation follows); 7 at once (the last step)
    assert written_at == {2: 3, 4: 4, 6: 7, 7: 7}
    assert trainer.final_loss == losses[-1]


def test_compile_cache_lives_in_the_sd35hub_cache_unless_set(tmp_path, monkeypatch):
    import os

    from sd35hub.train import speed

    monkeypatch.setenv("SD35HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert speed.keep_compile_cache() == tmp_path / "c" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")  # what inductor reads
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert speed.keep_compile_cache() == tmp_path / "mine"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache_dir()  # inductor fills in its /tmp default, as torch._dynamo.reset() does
    assert speed.keep_compile_cache() == tmp_path / "c" / "inductor"


@pytest.mark.slow
@pytest.mark.parametrize("batch_shapes", [1, 7])
def test_compile_blocks_is_static_for_few_shapes_and_dynamic_for_many(batch_shapes, monkeypatch, tmp_path):
    """Few input shapes: one static graph each. Many (several aspect buckets): automatic dynamic shapes,
    so a few graphs per block kind cover them all instead of one compile per shape and kind."""
    import torch._dynamo
    from diffusers import SD3Transformer2DModel

    from sd35hub.models.tiny import TRANSFORMER_CONFIG
    from sd35hub.train import speed

    graphs: list[int] = []
    monkeypatch.setattr(speed, "COMPILE_BACKEND", lambda gm, example_inputs: graphs.append(1) or gm.forward)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    torch._dynamo.reset()
    try:
        speed.compile_blocks(transformer, batch_shapes=batch_shapes)
        latent_sides = [(16, 16), (16, 24), (24, 24), (24, 32), (32, 32)]  # 5 token counts, batch 2
        g = torch.Generator().manual_seed(0)
        for h, w in latent_sides:
            out = transformer(hidden_states=torch.randn(2, 16, h, w, generator=g), timestep=torch.tensor([500.0, 20.0]),
                              encoder_hidden_states=torch.randn(2, 12, 64, generator=g),
                              pooled_projections=torch.randn(2, 64, generator=g), return_dict=False)[0]
            out.mean().backward()
    finally:
        torch._dynamo.reset()
    kinds = 2  # the tiny transformer's block kinds: dual attention (blocks 0, 1), the last context_pre_only (2)
    if batch_shapes <= speed.STATIC_SHAPES_MAX:
        assert len(graphs) == kinds * len(latent_sides)
    else:
        assert len(graphs) <= kinds * 2  # static for the first shape, one dynamic graph for the rest


@pytest.mark.slow
def test_tiny_model_at_512_px_trains_with_buckets_bounded_by_its_position_grid(tmp_path):
    """#15.7: `sd35hub train --model tiny --dataset sample` (CPU profile: 512 px) failed after caching
    with "Height (40) cannot be greater than pos_embed_max_size: 32"; data.resolution above the
    base's 512 px is clamped too, and both are said."""
    lines: list[str] = []
    cfg = tiny_config(tmp_path / "out", tmp_path / "cache", max_steps=1, batch_size=1, validation_steps=1)
    cfg = Config(model=cfg.model, data=DataSpec(source="sample", resolution=768, max_samples=4, holdout=0,
                                                cache_dir=str(tmp_path / "cache")), lora=cfg.lora, train=cfg.train)
    result = recipe.train(cfg, log=lines.append, progress=False)
    assert result.steps == 1
    text = "\n".join(lines)
    assert "data.resolution=768 is above the 512 px" in text and "640x384->512x320" in text
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert all(max(b) <= 512 for b in summary["resolution_buckets"]), summary["resolution_buckets"]


@pytest.mark.slow
def test_resuming_a_finished_run_rewrites_none_of_its_facts(tmp_path, cache_dir):
    """#15.9: `--resume latest` on a finished run with a new learning rate trained 0 steps but rewrote
    summary.json, the card and the config (new lr, no final loss, the resume session's duration)."""
    import time as _time

    out = tmp_path / "out"
    slow = lambda trainer: _time.sleep(0.3)  # noqa: E731 - makes the first session's time measurable
    first = recipe.train(tiny_config(out, cache_dir, max_steps=3), log=lambda s: None, on_step=slow, progress=False)
    files = {name: (out / name).read_bytes() for name in ("summary.json", "README.md", "training_config.yaml")}
    assert first.final_loss is not None and first.duration_s >= 0.9
    lines: list[str] = []
    again = recipe.train(tiny_config(out, cache_dir, max_steps=3, learning_rate=5e-5, resume="latest"),
                         log=lines.append, progress=False)
    assert {name: (out / name).read_bytes() for name in files} == files
    assert again.steps == 3 and again.final_loss == pytest.approx(first.final_loss)
    assert again.duration_s == pytest.approx(first.duration_s, abs=0.01)
    assert any("is finished (step 3 of 3): nothing to train" in line for line in lines)

    # continuing it with more steps: the duration is the whole run's, not the last session's
    more = recipe.train(tiny_config(out, cache_dir, max_steps=5, resume="latest"), log=lambda s: None, progress=False)
    assert more.steps == 5 and more.final_loss is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duration_s"] >= first.duration_s and summary["steps"] == 5
