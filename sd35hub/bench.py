"""`sd35hub bench`: training-step time and peak memory, ours next to a reference step, same run.

The transformer is built from the real SD3.5 Medium / Large configs with random weights (nothing
is downloaded). Inputs are what a cached training step sees: latents [b, 16, res/8, res/8],
prompt_embeds [b, 154, 4096] (77 CLIP + 77 T5 tokens), pooled_prompt_embeds [b, 2048].

- reference: the step the way diffusers' train_dreambooth_lora_sd3.py does it (bf16 weights,
  ``add_adapter`` LoRA, autocast, eager, default AdamW), optionally with its gradient
  checkpointing or bitsandbytes NF4 base;
- ours: the step sd35hub's trainer runs for the chosen hardware profile — the same function
  (:func:`sd35hub.train.step.optimize_micro_batch` under an ``accelerate.Accelerator``), the same LoRA
  targets (:func:`sd35hub.train.lora.attach_lora`, the ``attention`` preset: Medium's ``attn2`` included),
  optimizer (:func:`sd35hub.train.optim.build_optimizer`) and the profile's settings from
  :func:`sd35hub.hardware.profile_settings` (PROFILE_STEPS is derived from it, not a second table).

MFU: the counted FLOPs per step divided by the step time and by the GPU's dense bf16 peak (PEAK_TFLOPS).
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sd35hub.models.real_configs import SD35_CONFIGS

ATTENTION_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]

@dataclass(frozen=True)
class StepVariant:
    """How one training step is run."""

    name: str
    compile: bool = False  # torch.compile each block (regional)
    compile_mode: str | None = "auto"  # auto (CUDA graphs unless checkpointing) | None | reduce-overhead | max-autotune-no-cudagraphs
    checkpoint_every: int = 0  # 0 = no gradient checkpointing, 1 = every block, k = every k-th block
    quantize: str = "none"  # none | nf4 (bitsandbytes, frozen base)
    attention: str = "auto"  # SDPA backend: auto | cudnn | flash
    fp32_lora: bool = True  # LoRA master weights in fp32 under bf16 autocast
    optimizer: str = "adamw"  # ours: train.optimizer (adamw is fused on CUDA); the reference: torch's default AdamW
    float8: bool = False  # FP8 matmuls for the frozen base (torchao float8; Ada/Hopper)
    reference: bool = False
    # issue #19's levers (ours only; each exact on the CPU tiny model, tests/test_levers.py)
    fused_lora: bool = False  # LoRA's down-projection inside the base product (sd35hub.train.fused_lora)
    lora_input_cast: bool = True  # False: peft does not copy a LoRA layer's input to fp32 (autocast casts it back)
    graph_step: bool = False  # the whole step as one CUDA graph (sd35hub.train.graphed); blocks compiled graph-less
    inductor: tuple[tuple[str, Any], ...] = ()  # extra torch._inductor options for the compiled blocks
    fused_qkv: bool = False  # q/k/v (and add_q/k/v) of each attention as one product, own LoRAs (train.fused_qkv)


REFERENCE_STEPS = {
    "eager": StepVariant("reference eager", reference=True, fp32_lora=False),
    "checkpointing": StepVariant("reference + checkpointing", reference=True, fp32_lora=False, checkpoint_every=1),
    "nf4": StepVariant("reference NF4 + checkpointing", reference=True, fp32_lora=False, checkpoint_every=1, quantize="nf4"),
}

PROFILE_NAMES = ("cpu", "t4", "l4", "a100-40", "a100-80", "h100", "h200")
_LABELS = {"t4": "t4 (16 GB)", "l4": "l4 (24 GB)"}
_VARIANTS = {"large": "sd3.5-large", "medium": "sd3.5-medium", "tiny": "tiny"}

# Dense bf16 peak of the card (NVIDIA data sheets, without sparsity), for the MFU column.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def profile_step(profile: str, model: str = "large") -> StepVariant:
    """The step the trainer runs for ``profile`` on ``model``: read from the profile table the trainer
    uses (sd35hub.hardware), and the recipe's attention rule (cuDNN SDPA on CUDA)."""
    from sd35hub.hardware import profile_settings

    s = profile_settings(profile, _VARIANTS.get(model, model))
    return StepVariant(
        f"sd35hub {_LABELS.get(profile, profile)}", compile=s["compile"], quantize=s["quantize"],
        checkpoint_every=1 if s["gradient_checkpointing"] else 0, optimizer=s["optimizer"],
        attention="auto" if profile == "cpu" else "cudnn",
    )  # fmt: skip


# Kept for callers that list the profiles (the CLI's option check).
PROFILE_STEPS = {name: profile_step(name) for name in PROFILE_NAMES}


@dataclass
class BenchResult:
    variant: str
    model: str
    resolution: int
    batch: int
    rank: int
    s_per_step: float
    samples_per_s: float
    peak_gib: float
    tflops: float | None
    warmup_s: float
    steps: int
    loss_start: float
    loss_end: float
    mfu: float | None = None  # achieved FLOP/s over the card's dense bf16 peak (PEAK_TFLOPS)
    extra: dict[str, Any] = field(default_factory=dict)


def transformer_config(model: str) -> dict[str, Any]:
    if model == "tiny":
        from sd35hub.models.tiny import tiny_model_path

        cfg = json.loads((tiny_model_path() / "transformer" / "config.json").read_text())
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    if model not in SD35_CONFIGS:
        from sd35hub.errors import ConfigError

        raise ConfigError(f"bench --model {model!r} is not one of tiny, medium, large")
    return dict(SD35_CONFIGS[model])


def build_transformer(model: str, variant: StepVariant, device: Any, dtype: Any) -> Any:
    """Random-init transformer with the real config, LoRA-free, frozen, on ``device``."""
    import torch
    from diffusers import SD3Transformer2DModel

    cfg = transformer_config(model)
    torch.manual_seed(0)
    if variant.quantize == "nf4":
        return _build_nf4_transformer(cfg, device, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init directly in bf16: Large is 8B params (16 GB, not 32)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    return transformer


def _build_nf4_transformer(cfg: dict[str, Any], device: Any, dtype: Any) -> Any:
    """bitsandbytes NF4 base through diffusers' own quantizer (what from_pretrained does with a
    BitsAndBytesConfig), applied to a random-init model built on the meta device."""
    import tempfile

    import torch
    from diffusers import BitsAndBytesConfig, SD3Transformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cpu"):
                model = SD3Transformer2DModel(**cfg)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        transformer = SD3Transformer2DModel.from_pretrained(tmp, quantization_config=quant, dtype=dtype, device_map={"": device})
    transformer.requires_grad_(False)
    return transformer


def make_inputs(cfg: dict[str, Any], resolution: int, batch: int, device: Any, dtype: Any, text_tokens: int = 154,
                seed: int = 1) -> dict[str, Any]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    side = resolution // 8
    return {
        "latents": torch.randn(batch, cfg["in_channels"], side, side, generator=g).to(device, dtype),
        "noise": torch.randn(batch, cfg["in_channels"], side, side, generator=g).to(device, dtype),
        "prompt_embeds": torch.randn(batch, text_tokens, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        "pooled_prompt_embeds": torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
        "sigmas": torch.sigmoid(torch.randn(batch, generator=g)).to(device),
    }


def _loss(transformer: Any, inputs: dict[str, Any]) -> Any:
    """The reference's loss, written out as diffusers' SD3 script does: noisy = (1-σ)·x0 + σ·noise,
    target = noise − x0, fp32 MSE. Ours is sd35hub.train.flow.flow_loss; the tiny-model test checks
    that both give the same first loss."""
    sigmas = inputs["sigmas"].view(-1, 1, 1, 1)
    x0, noise = inputs["latents"], inputs["noise"]
    noisy = ((1.0 - sigmas) * x0 + sigmas * noise).to(x0.dtype)
    pred = transformer(
        hidden_states=noisy, timestep=inputs["sigmas"] * 1000.0, encoder_hidden_states=inputs["prompt_embeds"],
        pooled_projections=inputs["pooled_prompt_embeds"], return_dict=False,
    )[0]
    return ((pred.float() - (noise - x0).float()) ** 2).mean()


def prepare(transformer: Any, variant: StepVariant, rank: int) -> tuple[Any, Callable[[dict[str, Any]], Any]]:
    """Attach LoRA and apply the variant's speed knobs; returns (optimizer, step function).

    The reference attaches diffusers' script's 8 attention targets with ``add_adapter`` and runs its
    loop (autocast, backward, clip, AdamW). Ours is the trainer's: ``attach_lora`` (fp32 LoRA weights),
    ``build_optimizer``, ``accelerate.Accelerator.prepare`` and ``optimize_micro_batch``."""
    import torch

    from sd35hub.train import speed

    device_type = "cuda" if next(transformer.parameters()).is_cuda else "cpu"
    if variant.reference:
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTENTION_TARGETS)
        )
        params = [p for p in transformer.parameters() if p.requires_grad]
        if variant.fp32_lora:
            for p in params:
                p.data = p.data.float()
    else:
        from sd35hub.config import LoraSpec
        from sd35hub.train.lora import attach_lora

        params = attach_lora(transformer, LoraSpec(rank=rank, alpha=rank, targets="attention", init="gaussian"),
                             fp32_params=variant.fp32_lora)
    if variant.float8:
        speed.float8_base(transformer, emulate=device_type != "cuda")
    refresh = _apply_lora_levers(transformer, variant)
    if variant.checkpoint_every:
        if variant.reference:
            transformer.enable_gradient_checkpointing()
        else:
            speed.checkpoint_blocks(transformer, variant.checkpoint_every)
    if variant.compile:
        speed.compile_blocks(transformer, mode=None if variant.graph_step else variant.compile_mode,
                             options=dict(variant.inductor) or None)

    if variant.reference:  # the reference keeps PyTorch's defaults, as diffusers' script does
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

        def reference_step(inputs: dict[str, Any]) -> Any:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                loss = _loss(transformer, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return optimizer, reference_step

    from accelerate import Accelerator

    from sd35hub.config import TrainSpec
    from sd35hub.train.flow import flow_loss
    from sd35hub.train.optim import build_optimizer, build_scheduler
    from sd35hub.train.step import optimize_micro_batch

    speed.enable_tf32()
    spec = TrainSpec(learning_rate=1e-4, optimizer=variant.optimizer)
    optimizer = build_optimizer(params, spec)
    if refresh is not None:  # the stacked weights' copy of A follows every update
        optimizer.register_step_post_hook(refresh)
    scheduler = build_scheduler(optimizer, spec, total_steps=10_000)
    handlers = []
    if variant.graph_step:  # no autocast weight cache across a capture
        from accelerate.utils import AutocastKwargs

        handlers.append(AutocastKwargs(cache_enabled=False))
    acc = Accelerator(cpu=device_type == "cpu", mixed_precision="bf16" if device_type == "cuda" else "no",
                      kwargs_handlers=handlers)
    model, acc_optimizer = acc.prepare(transformer, optimizer)
    inputs_box: dict[str, Any] = {}

    def one_step() -> Any:  # the trainer's own step (sd35hub.train.step)
        inputs = inputs_box["inputs"]
        return optimize_micro_batch(
            acc, model, params, acc_optimizer,
            lambda: flow_loss(model, inputs["latents"], inputs["prompt_embeds"], inputs["pooled_prompt_embeds"],
                              inputs["noise"], inputs["sigmas"]),
            attention=variant.attention, max_grad_norm=1.0,
        )  # fmt: skip

    if variant.graph_step:
        from sd35hub.train.graphed import GraphedStep, make_capturable

        make_capturable(optimizer)
        graphed = GraphedStep(one_step, after=scheduler.step)

        def graphed_step(inputs: dict[str, Any]) -> Any:  # inputs: the same tensors every call, refilled in place
            inputs_box["inputs"] = inputs
            return graphed()

        return acc_optimizer, graphed_step

    def our_step(inputs: dict[str, Any]) -> Any:
        inputs_box["inputs"] = inputs
        loss = one_step()
        scheduler.step()
        return loss

    return acc_optimizer, our_step


def _apply_lora_levers(transformer: Any, variant: StepVariant) -> Callable[..., None] | None:
    """The LoRA-layer levers of ``variant``; returns the fused layers' refresh hook (None when not fused)."""
    from sd35hub.train import fused_lora, fused_qkv

    if variant.reference and (variant.fused_lora or variant.fused_qkv or not variant.lora_input_cast):
        from sd35hub.errors import ConfigError

        raise ConfigError("fused_lora / fused_qkv / lora_input_cast are levers of our step, not of the reference step")
    if variant.fused_lora and variant.fused_qkv:
        from sd35hub.errors import ConfigError

        raise ConfigError("fused_lora and fused_qkv both rewrite the q/k/v layers' products; choose one")
    if not variant.lora_input_cast:
        fused_lora.skip_lora_input_cast(transformer)
    if variant.fused_qkv:
        fused_qkv.fuse_qkv(transformer)
    return fused_lora.fuse_lora_down(transformer) if variant.fused_lora else None


def count_flops(transformer: Any, inputs: dict[str, Any]) -> float:
    """FLOPs of one forward + backward (matmuls and attention), counted by PyTorch on this input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(inputs["latents"].device.type, dtype=torch.bfloat16, enabled=inputs["latents"].is_cuda):
        _loss(transformer, inputs).backward()
    for p in transformer.parameters():
        p.grad = None
    return float(counter.get_total_flops())


def run_variant(model: str, variant: StepVariant, *, resolution: int, batch: int, rank: int, steps: int,
                warmup: int, device: str, flops: float | None = None, budget_s: float | None = None,
                curve_steps: int = 0) -> BenchResult:
    """Time one variant. ``flops`` (per step, from an earlier variant of the same model and inputs)
    is reused; otherwise they are counted here on the eager step (a compiled step can't be counted).
    ``budget_s``: stop the timed steps (at least 3) once they took that long. Every step's loss lands in
    ``extra["losses"]`` (the same inputs each step: variants of the same math give the same trajectory).
    ``curve_steps``: then that many more steps on fresh seeded inputs (noise, timesteps, latents; the same
    for every variant), their losses in ``extra["curve"]`` (FP8 vs bf16: issue #19 goal 2)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if variant.compile:
        from sd35hub.train import speed

        speed.reset_compiler()  # graphs of a previous model must not count against the recompile limit
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    transformer = build_transformer(model, variant, device, dtype)
    cfg = transformer_config(model)
    inputs = make_inputs(cfg, resolution, batch, device, dtype)
    _, step = prepare(transformer, variant, rank)
    if flops is None and not variant.compile:
        flops = count_flops(transformer, inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    losses = [step(inputs)]
    loss_start = float(losses[0])
    for _ in range(max(warmup - 1, 0)):
        losses.append(step(inputs))
    sync()
    warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    loss = loss_start
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(inputs)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if budget_s is not None and len(times) >= 3 and sum(times) > budget_s:
            break
    s_per_step = sorted(times)[len(times) // 2]
    curve = []
    for i in range(curve_steps):
        fresh = make_inputs(cfg, resolution, batch, "cpu", dtype, seed=1000 + i)
        for key in ("latents", "noise", "sigmas"):
            inputs[key].copy_(fresh[key])  # in place: a captured step reads these tensors
        curve.append(step(inputs))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tflops = (flops / s_per_step / 1e12) if flops else None
    card_peak = peak_tflops(torch.cuda.get_device_name(0)) if device == "cuda" else None
    result = BenchResult(
        variant=variant.name, model=model, resolution=resolution, batch=batch, rank=rank, s_per_step=s_per_step,
        samples_per_s=batch / s_per_step, peak_gib=peak, tflops=tflops,
        warmup_s=warmup_s, steps=len(times), loss_start=loss_start, loss_end=float(loss),
        mfu=(tflops / card_peak) if tflops and card_peak else None,
        extra={"flops": flops, "losses": [float(v) for v in losses], "curve": [float(v) for v in curve]},
    )
    del transformer, step, inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s from its name (None when unknown: no MFU column)."""
    upper = device_name.upper()
    for tag, peak in PEAK_TFLOPS.items():
        if tag in upper.replace("-", " ").split() or tag in upper:
            return peak
    return None


def bench(model: str = "tiny", *, profile: str = "auto", reference: str = "eager", resolution: int | None = None,
          batch: int = 1, rank: int = 16, steps: int = 10, warmup: int = 3, float8: bool = False,
          variants: list[StepVariant] | None = None) -> list[BenchResult]:
    """Run the reference step and ours in the same process; results in that order. ``float8`` adds
    our step with FP8 base layers (`model.float8`) as a third row; on the CPU its casts are emulated."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model != "tiny" and device == "cpu":  # a full-size fp32 SD3.5 on the CPU: minutes of allocation, no answer
        from sd35hub.errors import HardwareError

        raise HardwareError(
            f"`sd35hub bench --model {model}` times training steps of the full-size SD3.5 {model.title()} on a CUDA "
            "GPU, and none is visible. Run it on a GPU machine, or use --model tiny here."
        )
    if profile == "auto":
        profile = "h100" if device == "cuda" else "cpu"
    if resolution is None:
        resolution = 1024 if model != "tiny" else 128
    ours = profile_step(profile, model)
    chosen = variants or [REFERENCE_STEPS[reference], ours]
    if float8:
        from sd35hub.errors import ConfigError
        from sd35hub.train import speed

        if ours.quantize != "none":
            raise ConfigError(f"--float8 replaces the base layers that profile {profile}'s {ours.quantize} base "
                              "quantizes; use --profile h100 or a100-80")
        if device == "cuda":
            speed.check_float8_device("cuda")  # before minutes of warm-up, not after
        suffix = " + FP8 base" + (" (emulated)" if device == "cpu" else "")
        chosen = [*chosen, replace(ours, name=ours.name + suffix, float8=True)]
    results = []
    flops = None
    for variant in chosen:
        r = run_variant(model, variant, resolution=resolution, batch=batch, rank=rank, steps=steps, warmup=warmup,
                        device=device, flops=flops)
        flops = r.extra["flops"]
        results.append(r)
    return results


def format_table(results: list[BenchResult]) -> str:
    base = results[0].s_per_step if results else math.nan
    lines = [
        f"{'variant':34s} {'model':6s} {'res':>5s} {'b':>2s} {'s/step':>8s} {'samples/s':>9s} {'peak GiB':>8s} "
        f"{'TFLOP/s':>8s} {'MFU':>5s} {'vs ref':>7s} {'warmup s':>8s}"
    ]
    for r in results:
        tf = f"{r.tflops:8.1f}" if r.tflops else f"{'-':>8s}"
        mfu = f"{100 * r.mfu:4.0f}%" if r.mfu else f"{'-':>5s}"
        lines.append(
            f"{r.variant:34s} {r.model:6s} {r.resolution:5d} {r.batch:2d} {r.s_per_step:8.4f} {r.samples_per_s:9.2f} "
            f"{r.peak_gib:8.2f} {tf} {mfu} {base / r.s_per_step:6.2f}x {r.warmup_s:8.1f}"
        )
    return "\n".join(lines)


def results_json(results: list[BenchResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
