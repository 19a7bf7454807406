"""Speed and memory knobs for the SD3 transformer training step.

Each function changes one thing and says why; the hardware profiles and `sd35hub bench` pick
which ones to apply. Measurements behind the defaults are in docs/performance.md and
benchmarks/NOTES.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


COMPILE_BACKEND: Any = "inductor"  # torch.compile backend for the blocks (tests use a counting backend)


def compile_blocks(transformer: Any, *, mode: str | None = "auto", fullgraph: bool = False,
                   gradient_accumulation: int = 1, batch_shapes: int = 1, shapes: str = "auto",
                   options: dict[str, Any] | None = None) -> int:
    """torch.compile each transformer block in place ("regional compilation").

    The blocks share one code path, so dynamo traces it once per block *kind* (normal,
    dual-attention, the last context_pre_only block) and reuses the graph for all of them: warm-up
    is a few graphs instead of the whole 38-block model, and inductor's on-disk cache makes later
    runs start faster still. Returns the number of blocks compiled.

    ``mode="auto"`` adds CUDA graphs ("reduce-overhead") on a GPU when neither gradient
    checkpointing (its recompute replays a graph whose outputs are still in use) nor gradient
    accumulation (gradients of micro-batch 1 would live in graph memory that micro-batch 2's replay
    overwrites) is on. Measured on an H100 the eager-launched step was launch-bound (35% of the wall
    time in kernels for SD3.5 Medium at 1024 px); CUDA graphs took it from 0.17 to 0.08 s/step.
    With CUDA graphs every top-level transformer call starts a new graph "step"
    (``cudagraph_mark_step_begin``), so training, held-out loss and sampling can interleave.

    Every block kind x input shape (aspect bucket) is one compiled graph of the same code object,
    so dynamo's default recompile limit (8) is raised (:data:`RECOMPILE_LIMIT`): past it, dynamo silently runs the block
    eagerly (measured on an H100: Medium `sd35hub train` 0.575 s/step that way, 0.309 s compiled).
    Validation and sampling should run under :func:`eager` so they add no graphs of their own.

    ``batch_shapes``: how many block input shapes (token count = bucket area, batch size) training
    will feed; ``shapes``: "static" gives every shape its own graph, "dynamic" uses dynamo's automatic
    dynamic shapes (the dimensions that change become symbols after the first change, so a few graphs
    cover every bucket; batch size 1 stays a graph of its own: dynamo specializes sizes 0 and 1), and
    "auto" is static up to :data:`STATIC_SHAPES_MAX` shapes (:func:`dynamic_shapes`). CUDA graphs are
    recorded per shape either way. Measured on an H200 with 3 buckets (4 shapes): the same step time
    both ways, and the static run finished sooner (30 steps: 156 s vs 181 s).

    ``options``: extra inductor options (e.g. ``{"coordinate_descent_tuning": True}``) on top of the
    mode's own (torch.compile takes a mode or options, not both; the mode is expanded here).
    """
    allow_recompiles()
    keep_compile_cache()
    if mode == "auto":
        on_gpu = next(transformer.parameters()).is_cuda
        checkpointing = getattr(transformer, "gradient_checkpointing", False)
        mode = "reduce-overhead" if on_gpu and not checkpointing and gradient_accumulation == 1 else None
    blocks = transformer.transformer_blocks
    kwargs = _compile_kwargs(mode, options) if COMPILE_BACKEND == "inductor" else {}
    graphs = bool(kwargs.get("options", {}).get("triton.cudagraphs")) or mode in ("reduce-overhead", "max-autotune")
    dynamic = None if dynamic_shapes(shapes, batch_shapes) else False  # None: static first, dynamic once a shape changes
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
    if graphs and not getattr(transformer, "_sd35hub_graph_steps", False):
        transformer.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
        transformer._sd35hub_graph_steps = True
    return len(blocks)


def _compile_kwargs(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """torch.compile's ``mode=`` alone, or the mode's inductor options merged with ``options``."""
    if not options:
        return {"mode": mode}
    import torch._inductor

    return {"options": {**torch._inductor.list_mode_options(mode or "default"), **options}}


# Block input shapes up to which "auto" compiles one static graph per shape (each ~15-25 s of warm-up
# for Medium, cached on disk for later runs). With partial batches filled, a shape is a bucket area:
# the 13 buckets at 1024 px have 6.
STATIC_SHAPES_MAX = 6


def dynamic_shapes(shapes: str, batch_shapes: int) -> bool:
    """Whether the blocks compile with dynamic shapes: ``shapes`` is auto | static | dynamic."""
    if shapes not in ("auto", "static", "dynamic"):
        raise ValueError(f"compile shapes {shapes!r} is not one of auto, static, dynamic")
    return shapes == "dynamic" or (shapes == "auto" and batch_shapes > STATIC_SHAPES_MAX)


# nn.Linear layers of the blocks that float8_base leaves in bf16: adaLN modulation (`norm*.linear`,
# one row per sample), the text stream (`add_*`, `to_add_out`, `ff_context`: batch x 154 tokens, ~4% of
# the FLOPs, and FP8 matmuls need row counts divisible by 16) and LoRA's own trainable layers.
_FLOAT8_SKIP = ("norm", "add_", "ff_context", "lora_")


def float8_base(transformer: Any, *, emulate: bool = False, cast_weights_once: bool = True) -> int:
    """FP8 matmuls for the frozen base linear layers of every transformer block (torchao float8).

    Forward and input-gradient matmuls of the image stream's attention projections and feed-forwards run in FP8
    (e4m3 activations and weights, e5m2 output gradients, dynamic per-tensor scales) on Ada/Hopper
    tensor cores, at about twice bf16 throughput; LoRA's own layers, adaLN and everything outside the
    blocks stay in bf16/fp32. The base is frozen, so ``cast_weights_once`` casts each weight to FP8 (one
    per-tensor scale) here instead of on every forward and backward as torchao's training layers do: the
    same numbers, no per-step cast, and half the weight memory. The weight gradient torchao would compute
    is dead code for a frozen base, which torch.compile removes (:func:`compile_blocks`, after this).
    Returns the layers converted.
    ``emulate`` runs the same casts with fp32 matmuls (CPU tests). Needs ``pip install torchao``.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        from sd35hub.errors import ConfigError

        raise ConfigError("model.float8 needs torchao: pip install 'sd35hub[fp8]' (or torchao), "
                          "or set model.float8=false") from exc
    converted: list[str] = []

    def wanted(module: Any, name: str) -> bool:
        ok = (name.startswith("transformer_blocks.") and not any(part in name for part in _FLOAT8_SKIP)
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            converted.append(name)
        return ok

    config = Float8LinearConfig(emulate=emulate, pad_inner_dim=True)  # pad: any token count still runs
    convert_to_float8_training(transformer, module_filter_fn=wanted, config=config)
    if cast_weights_once:
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        for name in converted:
            layer = transformer.get_submodule(name)
            fp8 = hp_tensor_to_float8_dynamic(layer.weight.detach(), config.cast_config_weight.target_dtype,
                                              layer.linear_mm_config, gemm_input_role=GemmInputRole.WEIGHT)
            layer.weight = torch.nn.Parameter(fp8, requires_grad=False)
    return len(converted)


def check_float8_device(device: Any) -> None:
    """FP8 tensor cores exist from compute capability 8.9 (Ada: L4, RTX 40xx; Hopper: H100)."""
    from sd35hub.errors import ConfigError

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(f"model.float8 needs an NVIDIA GPU with FP8 tensor cores (L4, H100); training runs on "
                          f"{dev.type}. Set model.float8=false")
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 9):
        raise ConfigError(f"model.float8 needs FP8 tensor cores (compute capability 8.9+: L4, RTX 40xx, H100); "
                          f"{torch.cuda.get_device_name(dev)} is {major}.{minor}. Set model.float8=false")


def keep_compile_cache() -> Path:
    """Keep inductor's on-disk cache (compiled kernels and graphs) in ``$SD35HUB_CACHE/inductor``
    instead of /tmp, so later runs skip most of the warm-up; a TORCHINDUCTOR_CACHE_DIR set by the user
    wins. (Inductor writes its /tmp default into that variable the first time it looks, e.g. on
    ``torch._dynamo.reset()``, so that value counts as unset.)"""
    from sd35hub.paths import default_cache_dir

    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default
    except ImportError:  # another torch layout: only an unset variable is ours to fill
        inductor_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or (inductor_default is not None and current == inductor_default()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_dir() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


# Graphs one compiled block function may hold when compiled statically: block kinds (Medium 3, Large 2)
# x token counts (13 buckets at 1024 px have 6 distinct areas) x batch sizes (a bucket's last batch of
# an epoch may be smaller) = 36, x ~2 for any other guard split. compile_blocks goes dynamic past 2 shapes anyway.
RECOMPILE_LIMIT = 128


def reset_compiler(recompile_limit: int = RECOMPILE_LIMIT) -> None:
    """Forget compiled graphs (e.g. of another model in the same process) and allow enough
    recompiles for every block kind x input shape (one per aspect-ratio bucket)."""
    import torch._dynamo

    torch._dynamo.reset()
    allow_recompiles(recompile_limit)


def allow_recompiles(recompile_limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit (default 8) to ``recompile_limit``."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), recompile_limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * recompile_limit)


def checkpoint_blocks(transformer: Any, every: int = 1) -> list[int]:
    """Gradient checkpointing on every ``every``-th block only (1 = all blocks, like diffusers).

    Checkpointing a block frees its activations after the forward pass and recomputes them in the
    backward (~1/3 more compute for that block). Checkpointing only a fraction of the blocks buys
    most of the memory back at a fraction of the recompute cost. Returns the checkpointed indices.
    """
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        transformer.gradient_checkpointing = False
        return []
    chosen = {id(b) for i, b in enumerate(transformer.transformer_blocks) if i % every == 0}

    def _maybe_checkpoint(block: Any, *args: Any) -> Any:
        if id(block) in chosen:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    transformer.gradient_checkpointing = True
    transformer._gradient_checkpointing_func = _maybe_checkpoint
    return [i for i, b in enumerate(transformer.transformer_blocks) if id(b) in chosen]


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run torch.compile'd code eagerly inside the block: held-out loss and validation sampling use
    other shapes and no_grad, and would otherwise compile (and CUDA-graph) a second set of graphs for
    a few calls, costing warm-up time and recompile budget."""
    with torch.compiler.set_stance("force_eager"):
        yield


@contextlib.contextmanager
def attention_backend(name: str = "auto") -> Iterator[None]:
    """Choose the fused attention kernel PyTorch's SDPA dispatches to, for forward and backward.

    "cudnn" (cuDNN's fused flash attention) is the fastest bf16 attention on Hopper at SD3.5's
    sequence lengths (~4k tokens at 1024 px); flash / efficient stay as fallbacks for shapes or
    dtypes cuDNN refuses. "auto" leaves PyTorch's default order.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    if name == "auto" or not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }[name]
    with sdpa_kernel(order, set_priority=True):
        yield


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> GPU copy that does not block the host: pinned staging + non_blocking, so the next
    batch is copied while the GPU still runs the previous step. Plain ``.to`` elsewhere."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def enable_tf32() -> None:
    """Allow TF32 for any fp32 matmul left (LoRA master weights, loss): ~8x faster, ~1e-3 rel error."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fused_adamw_kwargs(params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """AdamW as one fused kernel over all LoRA tensors when they all live on a CUDA device."""
    params = list(params)
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {}
