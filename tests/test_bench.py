"""`sd35hub bench` smoke test on the tiny model (CPU), and the speed knobs' CPU-checkable behaviour.

GPU timings live in benchmarks/ and docs/performance.md; here we check that the code paths the GPU
runs are correct: the reference and our step compute the same loss, selective checkpointing gives
the same gradients as none, and the CLI validates its options."""

from __future__ import annotations

import json

import pytest
import torch

from sd35hub import bench as B
from sd35hub.frontends.cli import main
from sd35hub.train import speed


@pytest.mark.slow
def test_bench_tiny_runs_reference_and_ours_in_one_process() -> None:
    results = B.bench("tiny", steps=2, warmup=1)
    assert [r.variant for r in results] == ["reference eager", "sd35hub cpu"]
    for r in results:
        assert r.s_per_step > 0 and r.samples_per_s > 0 and r.resolution == 128
        assert r.tflops is not None and r.tflops > 0  # FLOPs counted once, reused for ours
    # same model init, inputs and LoRA init: the first loss is the same computation
    assert results[0].loss_start == pytest.approx(results[1].loss_start, rel=1e-5)
    table = B.format_table(results)
    assert "reference eager" in table and "1.00x" in table
    assert len(json.loads(B.results_json(results))) == 2


@pytest.mark.slow
def test_bench_float8_adds_our_step_with_fp8_base_layers(capsys) -> None:
    pytest.importorskip("torchao")
    results = B.bench("tiny", steps=1, warmup=1, float8=True)
    assert [r.variant for r in results] == ["reference eager", "sd35hub cpu", "sd35hub cpu + FP8 base (emulated)"]
    # the same init and inputs: only the FP8 rounding separates the first losses
    assert results[2].loss_start == pytest.approx(results[1].loss_start, rel=0.05)
    assert results[2].loss_start != results[1].loss_start  # ...but it is there: the FP8 row ran FP8 layers
    with pytest.raises(SystemExit) as info:  # the t4 profile's NF4 base and FP8 layers exclude each other
        main(["bench", "--model", "tiny", "--profile", "t4", "--float8"])
    assert info.value.code == 2 and "--profile h100" in capsys.readouterr().err


def test_bench_cli_rejects_bad_options(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--model", "tiny", "--reference", "fast", "--resolution", "100"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--reference 'fast'" in err and "--resolution 100" in err


def test_full_size_configs_are_the_public_sd35_ones() -> None:
    large, medium = B.SD35_CONFIGS["large"], B.SD35_CONFIGS["medium"]
    assert (large["num_layers"], large["num_attention_heads"], large["caption_projection_dim"]) == (38, 38, 2432)
    assert (medium["num_layers"], len(medium["dual_attention_layers"]), medium["caption_projection_dim"]) == (24, 13, 1536)


def _grads(transformer, inputs) -> dict[str, torch.Tensor]:  # noqa: ANN001
    for p in transformer.parameters():
        p.grad = None
    B._loss(transformer, inputs).backward()
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_selective_checkpointing_keeps_gradients_exact() -> None:
    variant = B.StepVariant("t", fp32_lora=False)
    transformer = B.build_transformer("tiny", variant, "cpu", torch.float32)
    B.prepare(transformer, variant, rank=4)
    for p in (p for p in transformer.parameters() if p.requires_grad):
        torch.nn.init.normal_(p, std=0.02)  # non-zero B so every LoRA tensor gets a gradient
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 1, "cpu", torch.float32)
    plain = _grads(transformer, inputs)
    assert speed.checkpoint_blocks(transformer, every=2) == [0, 2]
    checkpointed = _grads(transformer, inputs)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)
    assert speed.checkpoint_blocks(transformer, every=0) == [] and not transformer.gradient_checkpointing


def test_cpu_paths_of_the_gpu_knobs() -> None:
    with speed.attention_backend("cudnn"):  # no CUDA: a no-op, not an error
        pass
    with pytest.raises(ValueError, match="not one of"):
        with speed.attention_backend("turbo"):
            pass
    t = torch.ones(2, dtype=torch.float32)
    moved = speed.to_device(t, torch.device("cpu"), torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    assert speed.fused_adamw_kwargs([torch.nn.Parameter(t)]) == {}


def test_bench_full_size_on_a_cpu_is_refused_at_once(capsys) -> None:
    """#15 item 6: `bench --model large` on a CPU built a full-size fp32 model instead of refusing."""
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("refusal is for machines without a CUDA GPU")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["bench", "--model", "large"])
    assert info.value.code == 12 and "CUDA" in capsys.readouterr().err
    assert time.perf_counter() - start < 10  # nothing full-size was built
    with pytest.raises(SystemExit) as info:
        main(["bench", "--model", "huge"])
    assert info.value.code == 2


def test_ours_is_the_trainers_step_with_the_trainers_targets_and_profile() -> None:
    from sd35hub.config import LoraSpec
    from sd35hub.hardware import profile_settings
    from sd35hub.train.lora import target_modules

    variant = B.profile_step("cpu", "tiny")
    transformer = B.build_transformer("tiny", variant, "cpu", torch.float32)
    expected = target_modules(transformer, LoraSpec(targets="attention"))
    assert any(".attn2." in name for name in expected)  # the tiny model has a dual-attention block, like Medium
    _, step = B.prepare(transformer, variant, rank=4)
    lora_layers = {n.rsplit(".lora_", 1)[0] for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora_layers == set(expected)
    inputs = B.make_inputs(B.transformer_config("tiny"), 64, 1, "cpu", torch.float32)
    before = {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
    step(inputs)
    assert any(not torch.equal(before[n], p) for n, p in transformer.named_parameters() if p.requires_grad)
    for name in ("t4", "l4", "h100"):  # one table: the bench's "ours" is the profile the trainer applies
        s, v = profile_settings(name, "sd3.5-large"), B.profile_step(name, "large")
        assert (v.quantize, v.compile, v.checkpoint_every > 0, v.optimizer) == (
            s["quantize"], s["compile"], s["gradient_checkpointing"], s["optimizer"])


def test_mfu_uses_the_cards_dense_bf16_peak() -> None:
    assert B.peak_tflops("NVIDIA H200") == 989.0 and B.peak_tflops("Tesla T4") == 65.0
    assert B.peak_tflops("cpu") is None
    r = B.BenchResult("ours", "medium", 1024, 1, 16, 0.1, 10.0, 1.0, 494.5, 1.0, 3, 1.0, 0.9, mfu=0.5)
    assert " 50%" in B.format_table([r])
