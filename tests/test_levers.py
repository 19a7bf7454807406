"""Issue #19's speed levers are exact: on the CPU tiny model each gives the loss trajectory and the LoRA
gradients of the plain step (GPU timings: benchmarks/gpu_bench.py, docs/performance.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sd35hub import bench as B
from sd35hub.train import fused_lora, speed
from sd35hub.train.graphed import make_capturable

PLAIN = B.StepVariant("plain")


def _trajectory(variant: B.StepVariant, steps: int = 4) -> list[float]:
    r = B.run_variant("tiny", variant, resolution=64, batch=2, rank=4, steps=steps, warmup=1, device="cpu", flops=1.0)
    return r.extra["losses"]


@pytest.fixture(scope="module")
def plain_losses() -> list[float]:
    return _trajectory(PLAIN)


@pytest.mark.slow
@pytest.mark.parametrize("lever", [
    dict(fused_lora=True), dict(lora_input_cast=False), dict(graph_step=True),
    dict(fused_lora=True, lora_input_cast=False, graph_step=True), dict(fused_qkv=True, lora_input_cast=False),
    dict(fused_qkv=True, lora_input_cast=False, graph_step=True),
])  # fmt: skip
def test_each_lever_keeps_the_plain_steps_loss_trajectory(lever: dict, plain_losses: list[float]) -> None:
    losses = _trajectory(replace(PLAIN, name=str(lever), **lever))
    assert len(losses) == len(plain_losses) == 5
    assert len(set(plain_losses)) > 1  # the LoRA moved: later losses depend on every update being right
    # A stale copy of A in the stacked weight (a missed refresh) or a learning rate the graph froze would
    # move losses 2.. by far more than float rounding
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)


def _tiny_lora(dtype: torch.dtype = torch.float32, fp32_lora: bool = True):  # noqa: ANN202
    transformer = B.build_transformer("tiny", PLAIN, "cpu", dtype)
    B.prepare(transformer, replace(PLAIN, fp32_lora=fp32_lora), rank=4)
    torch.manual_seed(3)
    for p in (p for p in transformer.parameters() if p.requires_grad):
        torch.nn.init.normal_(p, std=0.05)  # non-zero B: every LoRA tensor gets a gradient
    return transformer


def _loss_and_grads(transformer, inputs, autocast: bool = False):  # noqa: ANN001, ANN202
    for p in transformer.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = B._loss(transformer, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_fused_down_projection_gives_the_plain_gradients_and_unfuses_back() -> None:
    transformer = _tiny_lora()
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    loss, grads = _loss_and_grads(transformer, inputs)
    layer = transformer.transformer_blocks[0].attn.to_q
    base_weight = layer.base_layer.weight.detach().clone()
    refresh = fused_lora.fuse_lora_down(transformer)
    assert refresh.layers == sum(isinstance(m, fused_lora.FusedLoraLinear) for m in transformer.modules()) > 0
    assert layer.base_layer.weight.data_ptr() == layer._sd35hub_stacked.data_ptr()  # a view, no second W
    fused_loss, fused_grads = _loss_and_grads(transformer, inputs)
    assert fused_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-7)
    assert fused_lora.unfuse_lora_down(transformer) == refresh.layers
    assert type(layer) is fused_lora._lora_linear_class() and not hasattr(layer, "_sd35hub_stacked")
    torch.testing.assert_close(layer.base_layer.weight, base_weight, rtol=0, atol=0)
    torch.testing.assert_close(_loss_and_grads(transformer, inputs)[0], loss, rtol=0, atol=0)


def test_fused_layer_under_bf16_autocast_keeps_dtypes_and_values() -> None:
    """The GPU configuration (bf16 base, fp32 LoRA masters, bf16 autocast), on the CPU's autocast."""
    transformer = _tiny_lora(torch.bfloat16)
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.bfloat16)
    loss, grads = _loss_and_grads(transformer, inputs, autocast=True)
    fused_lora.fuse_lora_down(transformer)
    fused_loss, fused_grads = _loss_and_grads(transformer, inputs, autocast=True)
    assert fused_grads.keys() == grads.keys()
    torch.testing.assert_close(fused_loss, loss, rtol=2e-2, atol=0)  # bf16 products summed in another order
    for name, g in grads.items():
        assert fused_grads[name].dtype == g.dtype == torch.float32  # masters keep fp32 gradients
        if not g.any():  # the last block's text-stream output is unused: no gradient either way
            assert not fused_grads[name].any(), name
            continue
        assert torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0) > 0.99, name


def test_skipping_peft_input_cast_is_bit_identical_under_autocast() -> None:
    transformer = _tiny_lora(torch.bfloat16)
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.bfloat16)
    loss, grads = _loss_and_grads(transformer, inputs, autocast=True)
    assert fused_lora.skip_lora_input_cast(transformer) > 0
    nocast_loss, nocast_grads = _loss_and_grads(transformer, inputs, autocast=True)
    assert nocast_loss.item() == loss.item()
    for name in grads:
        assert torch.equal(nocast_grads[name], grads[name]), name


def test_only_vanilla_lora_layers_are_fused() -> None:
    from peft import LoraConfig

    def layer_with(**kwargs):  # noqa: ANN003, ANN202
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        from peft import get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=["0"], **kwargs)).base_model.model[0]

    assert fused_lora.fusable(layer_with())
    assert not fused_lora.fusable(layer_with(use_dora=True))
    assert not fused_lora.fusable(layer_with(lora_dropout=0.1))


def test_captured_step_reads_the_learning_rate_the_scheduler_writes() -> None:
    from diffusers.optimization import get_scheduler

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    make_capturable(opt)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == 0.0
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(5e-3)  # filled in place, not replaced


def test_compile_options_merge_with_the_mode() -> None:
    assert speed._compile_kwargs("reduce-overhead", None) == {"mode": "reduce-overhead"}
    merged = speed._compile_kwargs("reduce-overhead", {"coordinate_descent_tuning": True})
    assert merged == {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    assert speed._compile_kwargs(None, {"max_autotune": True}) == {"options": {"max_autotune": True}}


@pytest.mark.slow
def test_fused_layers_trace_into_one_graph_per_block(monkeypatch) -> None:
    """torch.compile (dynamo + AOT autograd, the inductor front end) takes the fused layers without a graph
    break and gives the eager gradients."""
    transformer = _tiny_lora()
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    loss, grads = _loss_and_grads(transformer, inputs)
    fused_lora.fuse_lora_down(transformer)
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    speed.reset_compiler()
    speed.compile_blocks(transformer, mode=None, fullgraph=True)  # fullgraph: a graph break is an error
    compiled_loss, compiled_grads = _loss_and_grads(transformer, inputs)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    speed.reset_compiler()


@pytest.mark.slow
def test_gpu_bench_script_writes_json_and_markdown_and_skips_past_its_deadline(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--smoke", "--out", str(tmp_path),
                          "--plan", "tiny=ref,eager-cudnn,nocast", "--deadline-s", "1e9", "--min-left-s", "0"],
                         capture_output=True, text=True, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    everything = json.loads((tmp_path / "bench.json").read_text())
    assert [r["extra"]["key"] for r in everything["results"]] == ["ref", "eager-cudnn", "nocast"]
    assert all(len(r["extra"]["losses"]) == 4 for r in everything["results"])  # 2 warm-up + 2 timed steps
    table = (tmp_path / "bench.md").read_text()
    assert "| eager-cudnn | ours eager + cudnn |" in table and "| nocast |" in table
    late = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--smoke", "--out", str(tmp_path / "late"),
                           "--plan", "tiny=ref", "--deadline-s", "0"], capture_output=True, text=True, cwd=root, timeout=300)
    assert late.returncode == 0 and json.loads((tmp_path / "late" / "bench.json").read_text())["skipped"][0]["variant"] == "ref"


def _large_like_tiny():  # noqa: ANN202
    """The tiny model's sizes with Large's block layout: no dual-attention blocks (no attn2), qk-norm."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**B.transformer_config("tiny"), "dual_attention_layers": ()})
    transformer.requires_grad_(False)
    B.prepare(transformer, PLAIN, rank=4)
    torch.manual_seed(3)
    for p in (p for p in transformer.parameters() if p.requires_grad):
        torch.nn.init.normal_(p, std=0.05)
    return transformer


@pytest.mark.parametrize("layout", ["medium", "large"])
def test_fused_qkv_gives_the_plain_loss_and_lora_gradients_and_unfuses_back(layout: str) -> None:
    from peft import get_peft_model_state_dict

    from sd35hub.train import fused_qkv

    transformer = _tiny_lora() if layout == "medium" else _large_like_tiny()
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    loss, grads = _loss_and_grads(transformer, inputs)
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(transformer).items()}
    state_keys = set(transformer.state_dict())
    layers = len(transformer.transformer_blocks)
    dual = sum(b.attn2 is not None for b in transformer.transformer_blocks)
    assert dual == (2 if layout == "medium" else 0)
    # every block: the image group and the context group (the last block keeps add_q/k/v), + attn2's image group
    assert fused_qkv.fuse_qkv(transformer) == 2 * layers + dual
    attn = transformer.transformer_blocks[0].attn
    assert attn.to_k.base_layer.weight.data_ptr() == attn._sd35hub_sample_w[attn.to_q.out_features:].data_ptr()
    fused_loss, fused_grads = _loss_and_grads(transformer, inputs)
    assert fused_grads.keys() == grads.keys() and sum("lora_A" in n for n in grads) == sum("lora_B" in n for n in grads)
    assert any(".attn.to_v.lora_A" in n for n in grads) and any(".attn.add_k_proj.lora_B" in n for n in grads)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    worst = max(((fused_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in grads.items())
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-7)
    print(f"{layout}: loss {loss.item():.8f} fused {fused_loss.item():.8f}; worst gradient difference / max {worst:.1e}")
    # the trained tensors are peft's own: the saved adapter and the model's state dict keys are unchanged
    assert set(transformer.state_dict()) == state_keys
    saved = get_peft_model_state_dict(transformer)
    assert saved.keys() == adapter.keys() and all(torch.equal(saved[k], adapter[k]) for k in adapter)
    assert fused_qkv.unfuse_qkv(transformer) == 2 * layers + dual
    assert type(attn.processor).__name__ == "JointAttnProcessor2_0" and not hasattr(attn, "_sd35hub_sample_w")
    torch.testing.assert_close(_loss_and_grads(transformer, inputs)[0], loss, rtol=0, atol=0)


def test_fused_qkv_under_bf16_autocast_and_with_disabled_adapters() -> None:
    """The GPU configuration (bf16 base, fp32 LoRA masters, bf16 autocast) on the CPU's autocast; and the
    processor falls back to the layers' own forwards when the adapters are off (``disable_adapters``)."""
    from sd35hub.train import fused_qkv

    transformer = _tiny_lora(torch.bfloat16)
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.bfloat16)
    loss, grads = _loss_and_grads(transformer, inputs, autocast=True)
    transformer.disable_adapters()  # diffusers' PeftAdapterMixin: every LoRA layer off
    with torch.no_grad():
        base_loss = B._loss(transformer, inputs)
    transformer.enable_adapters()
    fused_qkv.fuse_qkv(transformer)
    fused_loss, fused_grads = _loss_and_grads(transformer, inputs, autocast=True)
    torch.testing.assert_close(fused_loss, loss, rtol=2e-2, atol=0)  # bf16 products summed in another order
    for name, g in grads.items():
        assert fused_grads[name].dtype == g.dtype == torch.float32  # masters keep fp32 gradients
        if not g.any():
            assert not fused_grads[name].any(), name
            continue
        assert torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0) > 0.99, name
    transformer.disable_adapters()
    with torch.no_grad():
        assert B._loss(transformer, inputs).item() == base_loss.item()  # the layers' own (base-only) forwards


def test_fused_qkv_leaves_groups_with_dropout_or_fp8_layers_alone() -> None:
    from peft import LoraConfig

    from sd35hub.train import fused_qkv

    transformer = B.build_transformer("tiny", PLAIN, "cpu", torch.float32)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["attn.to_q", "attn.to_k",
                                                                                        "attn.to_v"]))
    # the image groups have dropout (not fused); the context groups and attn2 are plain Linear (fused, base only)
    assert fused_qkv.fuse_qkv(transformer) == 3 + 2
    assert all(set(b.attn._sd35hub_qkv) == {"context"} for b in transformer.transformer_blocks)


@pytest.mark.slow
def test_fused_qkv_traces_into_one_graph_per_block(monkeypatch) -> None:
    """torch.compile (dynamo + AOT autograd) takes the fused processor without a graph break, eager's gradients."""
    from sd35hub.train import fused_qkv

    transformer = _tiny_lora()
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 2, "cpu", torch.float32)
    loss, grads = _loss_and_grads(transformer, inputs)
    fused_qkv.fuse_qkv(transformer)
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    speed.reset_compiler()
    speed.compile_blocks(transformer, mode=None, fullgraph=True)
    compiled_loss, compiled_grads = _loss_and_grads(transformer, inputs)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    speed.reset_compiler()


def test_fused_qkv_option_is_refused_where_it_cannot_fuse() -> None:
    from sd35hub.config import load_config
    from sd35hub.errors import ConfigError

    assert load_config(None, ["train.fused_qkv=true"]).train.fused_qkv is True
    assert load_config(None, []).train.fused_qkv is False
    for extra, says in (("lora.dropout=0.1", "lora.dropout=0"), ("lora.variant=dora", "lora.variant=lora"),
                        ("model.float8=true", "model.float8"), ("model.quantize=nf4", "model.quantize=nf4")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, ["train.fused_qkv=true", extra])


@pytest.mark.slow
def test_trainer_with_fused_qkv_logs_the_plain_losses_and_saves_the_same_adapter(tmp_path_factory) -> None:
    """`sd35hub train` with train.fused_qkv: the same losses step by step and an adapter with the same keys and
    (to float rounding) the same tensors as the unfused run; the file loads like any adapter."""
    import json

    from safetensors.torch import load_file
    from test_train_recipe import tiny_config

    from sd35hub.train import recipe

    cache = tmp_path_factory.getbasetemp() / "qkv-cache"
    runs = {}
    for fused in (False, True):
        out = tmp_path_factory.mktemp("qkv-run")
        logs: list[str] = []
        recipe.train(tiny_config(out, cache, max_steps=4, fused_qkv=fused), log=logs.append, progress=False)
        lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        runs[fused] = ([r["loss"] for r in lines if "loss" in r], load_file(out / "adapter" / "pytorch_lora_weights.safetensors"),
                       logs)
    (plain_losses, plain, _), (losses, adapter, logs) = runs[False], runs[True]
    assert any("fused q/k/v products: 8 projection groups" in line for line in logs)  # 3 blocks x 2 + 2 attn2
    assert len(losses) == len(plain_losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    assert adapter.keys() == plain.keys() and any("attn.to_q.lora_A" in k for k in adapter)
    for key in plain:
        torch.testing.assert_close(adapter[key], plain[key], rtol=1e-4, atol=1e-6)
