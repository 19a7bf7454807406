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
                   gradient_accumulation: int = 1, batch_shapes: int = 1) -> int:
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
    will feed. Up to 2, every shape gets its own static graph (the measured fastest kernels; e.g. one
    more compile for a smaller last batch). Beyond that (several aspect buckets: 6 token counts x 2
    batch sizes at 1024 px, each a compile of every block kind), dynamo's automatic dynamic shapes turn
    the dimensions that change into symbols after the first change, so a few graphs cover every
    bucket (batch size 1 stays a graph of its own: dynamo specializes sizes 0 and 1). CUDA graphs are
    still recorded per shape.
    """
    allow_recompiles()
    keep_compile_cache()
    if mode == "auto":
        on_gpu = next(transformer.parameters()).is_cuda
        checkpointing = getattr(transformer, "gradient_checkpointing", False)
        mode = "reduce-overhead" if on_gpu and not checkpointing and gradient_accumulation == 1 else None
    blocks = transformer.transformer_blocks
    options = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
    dynamic = None if batch_shapes > 2 else False  # None: static first, dynamic once a shape changes
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND, fullgraph=fullgraph, dynamic=dynamic, **options)
    if mode == "reduce-overhead" and not getattr(transformer, "_sd35hub_graph_steps", False):
        transformer.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
        transformer._sd35hub_graph_steps = True
    return len(blocks)


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
