"""FP8 base layers (`model.float8`, torchao float8) on the tiny model, CPU: torchao's emulated casts run
the same code as on an H100 with fp32 matmuls. GPU speed is in docs/performance.md (gpu_bench h100-fp8)."""

from __future__ import annotations

import pytest
import torch

from sd35hub import bench as B
from sd35hub.config import Config, ModelSpec
from sd35hub.errors import ConfigError
from sd35hub.train import speed

pytest.importorskip("torchao")


def _tiny_with_lora(float8: bool):
    variant = B.StepVariant("t", fp32_lora=False, float8=float8)
    transformer = B.build_transformer("tiny", variant, "cpu", torch.float32)
    _, step = B.prepare(transformer, variant, rank=4)
    return transformer, step


def test_weights_cast_once_give_the_numbers_of_a_cast_every_step() -> None:
    """The frozen weight's FP8 copy and scale are what torchao would compute on every call: the loss and
    the LoRA gradients are the same, and the stored weights take 1 byte per value instead of 4."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    results = []
    for once in (False, True):
        transformer = B.build_transformer("tiny", B.StepVariant("t", fp32_lora=False), "cpu", torch.float32)
        B.prepare(transformer, B.StepVariant("t", fp32_lora=False), rank=4)
        for p in (p for p in transformer.parameters() if p.requires_grad):
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        speed.float8_base(transformer, emulate=True, cast_weights_once=once)
        weight = transformer.transformer_blocks[0].ff.net[2].weight
        assert isinstance(weight, Float8TrainingTensor) == once and not weight.requires_grad
        if once:
            assert weight._data.element_size() == 1
        loss = B._loss(transformer, inputs)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}))
    (loss_each, grads_each), (loss_once, grads_once) = results
    assert loss_once == loss_each
    assert grads_once.keys() == grads_each.keys() and all(torch.equal(grads_once[n], grads_each[n]) for n in grads_once)


def test_float8_converts_the_frozen_block_linears_only_and_stays_close_to_bf16() -> None:
    from torchao.float8.float8_linear import Float8Linear

    plain, _ = _tiny_with_lora(False)
    fp8, _ = _tiny_with_lora(True)
    converted = {n for n, m in fp8.named_modules() if isinstance(m, Float8Linear)}
    assert converted and all(n.startswith("transformer_blocks.") for n in converted)
    # LoRA, adaLN and the text stream (batch x 154 rows: not divisible by 16) stay high precision
    skipped = ("lora_", "norm", "add_", "ff_context")
    assert not [n for n in converted if any(s in n for s in skipped)]
    assert "transformer_blocks.0.attn.to_q.base_layer" in converted  # the frozen layer under a LoRA
    assert "transformer_blocks.0.ff.net.2" in converted  # and frozen layers without one
    assert "transformer_blocks.0.attn2.to_q.base_layer" in converted  # dual attention (Medium): the trainer puts LoRA there too
    linears = {n for n, m in fp8.transformer_blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {f"transformer_blocks.{n}" for n in linears if not any(s in n for s in skipped)}
    assert converted == expected
    # same weights (same seed), so only the FP8 rounding separates the outputs
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    with torch.no_grad():
        a, b = B._loss(plain, inputs), B._loss(fp8, inputs)
    assert float(b) == pytest.approx(float(a), rel=0.05) and float(b) != float(a)


@pytest.mark.slow
def test_float8_trains_the_lora_and_nothing_else() -> None:
    fp8, step = _tiny_with_lora(True)
    def snapshot(p):  # a Float8TrainingTensor's FP8 values and scale; a plain tensor itself
        return [t.detach().clone() for t in ((p._data, p._scale) if hasattr(p, "_scale") else (p,))]

    frozen = {n: snapshot(p) for n, p in fp8.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in fp8.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    losses = [float(step(inputs)) for _ in range(8)]
    assert losses[-1] < losses[0]  # the same batch again: the LoRA learns it through FP8 base layers
    for n, p in fp8.named_parameters():
        if n in frozen:
            assert all(torch.equal(a, b) for a, b in zip(snapshot(p), frozen[n], strict=True)), n


def test_float8_is_refused_up_front_where_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="model.float8=false"):
        speed.check_float8_device("cpu")
    problems = Config(model=ModelSpec(float8=True, quantize="nf4")).problems()
    assert any("model.float8" in p and "choose one" in p for p in problems)


@pytest.mark.slow
def test_training_with_float8_base_layers_end_to_end(tmp_path, monkeypatch) -> None:
    """`model.float8` through the trainer (emulated casts: the device check, which refuses a CPU, is
    bypassed): the loss falls, validation and checkpoints run with FP8 layers, and the adapter has
    the usual keys and loads into a stock diffusers pipeline with bf16/fp32 base layers."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from sd35hub.config import DataSpec, LoraSpec, TrainSpec
    from sd35hub.models.tiny import tiny_model_path
    from sd35hub.train import recipe

    def config(name: str, float8: bool) -> Config:
        return Config(
            model=ModelSpec(name="tiny", float8=float8),
            data=DataSpec(source="sample", resolution=64, max_samples=10, holdout=2, cache_dir=str(tmp_path / "cache")),
            lora=LoraSpec(rank=4, alpha=8.0),
            train=TrainSpec(output_dir=str(tmp_path / name), max_steps=24, batch_size=2, learning_rate=2e-3,
                            validation_steps=1, validation_every=12, checkpoint_every=12, seed=7),
        )

    monkeypatch.setattr(speed, "check_float8_device", lambda device: None)
    logs: list[str] = []
    fp8 = recipe.train(config("fp8", True), log=logs.append, progress=False)
    plain = recipe.train(config("plain", False), log=lambda s: None, progress=False)
    assert any("FP8 matmuls on" in line for line in logs)
    learned = plain.initial_validation_loss - plain.validation_loss
    assert learned > 0.05 and fp8.validation_loss < fp8.initial_validation_loss - 0.05  # held-out loss falls
    assert abs(fp8.validation_loss - plain.validation_loss) < 0.1 * learned  # as far as without FP8
    assert (tmp_path / "fp8" / "checkpoints" / "checkpoint-000024").is_dir()
    adapter = tmp_path / "fp8" / "adapter"
    assert load_file(str(adapter / "pytorch_lora_weights.safetensors")).keys() == \
        load_file(str(tmp_path / "plain" / "adapter" / "pytorch_lora_weights.safetensors")).keys()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_model_path()))
    pipe.load_lora_weights(str(adapter))  # a stock pipeline, no FP8 layers


def test_float8_with_gradient_checkpointing_gives_the_same_gradients() -> None:
    """Profiles with checkpointing and an unquantized base (L4 with Medium) can turn FP8 on: the
    recomputed forward through FP8 layers gives exactly the gradients of the stored one."""

    def grads(checkpoint_every: int) -> dict[str, torch.Tensor]:
        variant = B.StepVariant("t", fp32_lora=False, float8=True, checkpoint_every=checkpoint_every)
        transformer = B.build_transformer("tiny", variant, "cpu", torch.float32)
        B.prepare(transformer, variant, rank=4)
        for p in (p for p in transformer.parameters() if p.requires_grad):
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
        B._loss(transformer, B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)).backward()
        return {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(0), grads(1)
    assert plain.keys() == checkpointed.keys() and all(torch.equal(plain[n], checkpointed[n]) for n in plain)
