"""LoRA's down-projection fused into the base layer's matrix product (a speed lever, issue #19).

peft's ``lora.Linear`` computes ``base(x) + B(A(x)) * s``: two matrix products read the activations x
(the base one, out × in, and LoRA's narrow A, r × in), and with fp32 LoRA weights peft first copies x
to fp32 (``_cast_input_dtype``), which autocast then casts back. Fused, one product runs over the
stacked weight ``[W; A]`` ((out + r) × in): its first ``out`` columns are the base output, the last ``r``
are ``x Aᵀ``; B then runs on those r columns. The backward is fused the same way: ``dx = [g, g_h] [W; A]``,
one product with inner size out + r, where ``g_h = s · g B``.

The stacked weight is a buffer of the base weight's dtype whose first rows ARE the base weight (the
base layer's ``weight`` becomes a view of it, so no second copy) and whose last rows hold a copy of
A in that dtype, i.e. exactly the bf16 cast autocast would make of the fp32 master A on every forward.
That copy is refreshed after every optimizer step (:func:`refresh`; :func:`fuse_lora_down` returns
the hook to register), outside the compiled region, so the compiled blocks never mutate a buffer.

Applied only where it computes the same thing: a vanilla LoRA (no DoRA, no dropout, no LoRA bias, one
active adapter, not merged) on a plain ``nn.Linear`` base, in the weight's dtype or under an autocast
whose dtype is the weight's. Elsewhere the layer runs peft's own forward. Exact on the CPU tiny model
(tests/test_levers.py); call it after the model is on its device (``.to`` would split the view).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ADAPTER = "default"


class _FusedLoraFn(torch.autograd.Function):
    """y = x [W; A]ᵀ + [bias; 0]; out = y[:, :o] + s · y[:, o:] Bᵀ. ``lora_a`` only routes A's gradient:
    its values are read from the stacked weight's last rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stacked: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        rank = lora_b.shape[1]
        y = F.linear(x, stacked, bias)
        base, h = y.split([stacked.shape[0] - rank, rank], dim=-1)
        h = h.contiguous()  # saved for B's gradient: keep r columns alive, not all of y
        out = base + F.linear(h, lora_b) * scaling
        ctx.save_for_backward(x, stacked, h, lora_b)
        ctx.scaling = scaling
        ctx.a_dtype = lora_a.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, stacked, h, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        h2, x2 = h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1])
        g_h = (g @ lora_b) * s  # [N, r]: the gradient reaching x Aᵀ
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (torch.cat([g, g_h], dim=1) @ stacked).view(x.shape)  # one product over [W; A]
        if ctx.needs_input_grad[3]:
            grad_a = (g_h.t() @ x2).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h2) * s
        return grad_x, None, None, grad_a, grad_b, None


def _lora_linear_class() -> type:
    from peft.tuners.lora import Linear

    return Linear


def fusable(module: Any) -> bool:
    """A vanilla single-adapter peft lora.Linear on a plain nn.Linear, not merged or disabled."""
    if not isinstance(module, _lora_linear_class()) or type(module.base_layer) is not torch.nn.Linear:
        return False
    return (list(module.lora_A) == [ADAPTER] and not module.lora_variant and not module.merged
            and not module.disable_adapters and not getattr(module, "fan_in_fan_out", False)
            and isinstance(module.lora_dropout[ADAPTER], torch.nn.Identity)
            and module.lora_B[ADAPTER].bias is None and module.lora_A[ADAPTER].bias is None)


class FusedLoraLinear(_lora_linear_class()):  # type: ignore[misc]
    """peft's lora.Linear with the down-projection in the base product (the class a fused layer gets)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        stacked = self._sd35hub_stacked
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype_ok = (torch.get_autocast_dtype(x.device.type) == stacked.dtype) if autocast else x.dtype == stacked.dtype
        if args or kwargs or not dtype_ok or list(self.active_adapters) != [ADAPTER] or self.merged or self.disable_adapters:
            return super().forward(x, *args, **kwargs)
        lora_b = self.lora_B[ADAPTER].weight.to(stacked.dtype)  # the cast autocast makes of the fp32 master
        return _FusedLoraFn.apply(x.to(stacked.dtype), stacked, self._sd35hub_bias, self.lora_A[ADAPTER].weight,
                                  lora_b, float(self.scaling[ADAPTER]))


def fuse_lora_down(model: Any) -> Callable[..., None]:
    """Fuse every fusable LoRA layer of ``model`` in place; returns :func:`refresh` bound to them, to call
    (or register with ``optimizer.register_step_post_hook``) after every change of the LoRA A weights."""
    layers = []
    for module in model.modules():
        if type(module) is not _lora_linear_class() or not fusable(module):
            continue
        base, lora_a = module.base_layer, module.lora_A[ADAPTER].weight
        out = base.weight.shape[0]
        stacked = torch.empty(out + lora_a.shape[0], base.weight.shape[1], dtype=base.weight.dtype,
                              device=base.weight.device)
        with torch.no_grad():
            stacked[:out].copy_(base.weight)
            stacked[out:].copy_(lora_a)
        base.weight = torch.nn.Parameter(stacked[:out], requires_grad=False)  # a view: one copy of W
        bias = None
        if base.bias is not None:
            bias = torch.zeros(stacked.shape[0], dtype=stacked.dtype, device=stacked.device)
            bias[:out].copy_(base.bias.detach())
        # buffers, not plain attributes: compiled graphs treat them as fixed inputs (CUDA graphs copy any other
        # tensor input into their own memory on every replay)
        module.register_buffer("_sd35hub_stacked", stacked, persistent=False)
        module.register_buffer("_sd35hub_bias", bias, persistent=False)
        module.__class__ = FusedLoraLinear
        layers.append(module)
    tails = [m._sd35hub_stacked[m.base_layer.weight.shape[0]:] for m in layers]
    masters = [m.lora_A[ADAPTER].weight for m in layers]

    def refresh(*_: Any) -> None:
        """Copy the current A weights into the stacked weights' last rows (one foreach copy)."""
        if tails:
            with torch.no_grad():
                torch._foreach_copy_(tails, [a.detach() for a in masters])

    refresh.layers = len(layers)  # type: ignore[attr-defined]
    return refresh


def unfuse_lora_down(model: Any) -> int:
    """Undo :func:`fuse_lora_down`: the base weight gets its own storage back, the layer peft's class."""
    count = 0
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            base = module.base_layer
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            del module._sd35hub_stacked, module._sd35hub_bias
            module.__class__ = _lora_linear_class()
            count += 1
    return count


def skip_lora_input_cast(model: Any) -> int:
    """Stop peft copying a LoRA layer's input to the LoRA weights' dtype (fp32 masters under bf16 autocast:
    autocast casts it straight back to bf16 for the product, so the copy changes no number). Only for a
    step run under autocast; returns the layers changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, _lora_linear_class()):
            module.cast_input_dtype_enabled = False
            count += 1
    return count
