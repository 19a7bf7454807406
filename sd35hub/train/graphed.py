"""The whole training step (forward, backward, clip, AdamW) as ONE CUDA graph (a speed lever, issue #19).

`speed.compile_blocks` already records a CUDA graph per compiled block ("reduce-overhead"): what is left
to the host is everything between the blocks (embeddings, the final layer, the loss), the gradient
clipping and the optimizer step, and one graph launch per block and direction. Captured whole, a step
is one ``graph.replay()`` plus the learning-rate update.

Rules for a step function captured here (all hold for ``optimize_micro_batch`` on cached inputs):
- inputs live in fixed tensors, refilled in place (``copy_``) between steps;
- the blocks are compiled WITHOUT CUDA graphs of their own (``compile_blocks(mode=None)``) or not at all;
- the optimizer is capturable and reads its learning rate from a tensor (:func:`make_capturable`), which
  the LR scheduler refills (``fill_``) on the host after each replay; the scheduler is not captured;
- gradients are None when the capture starts (``zero_grad(set_to_none=True)``), so backward writes
  them into the graph's memory, and every replay writes them there again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def make_capturable(optimizer: Any) -> None:
    """Learning rate as a device tensor and ``capturable=True`` on every param group (torch AdamW, fused or
    not): the captured kernels then read the rate the scheduler writes, and step counters stay on the GPU."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if device.type == "cuda":
            group["capturable"] = True


class GraphedStep:
    """Call it like the step function it wraps. Call 1 runs the step eagerly (compile, lazy init), call 2
    captures it and replays the graph, later calls replay. Each call is exactly one optimizer step."""

    def __init__(self, step: Callable[[], torch.Tensor], after: Callable[[], Any] | None = None) -> None:
        self.step, self.after = step, after or (lambda: None)
        self.calls = 0
        self.graph: Any = None
        self.loss: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if not torch.cuda.is_available() or self.calls == 1:
            loss = self._side_stream() if torch.cuda.is_available() else self.step()
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss = self.step()
            self.graph.replay()
            loss = self.loss.clone()  # the graph's loss tensor is rewritten by the next replay
        self.after()
        return loss

    def _side_stream(self) -> torch.Tensor:
        """Warm-up on a side stream, as torch.cuda.graph's documentation asks before a capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self.step()
        torch.cuda.current_stream().wait_stream(stream)
        return loss
