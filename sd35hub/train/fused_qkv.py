"""Q, K and V projections of each SD3 attention as one product, with each layer's own LoRA (issue #19 lever).

In a joint attention block ``to_q`` / ``to_k`` / ``to_v`` read the same normalized image tokens and
``add_q_proj`` / ``add_k_proj`` / ``add_v_proj`` the same context tokens (Medium's ``attn2`` has its own
image-token group). Unfused, each group is 3 base products, 3 LoRA down-projections and 3 up-projections
(9 reads of the same x by 6 of them), and the backward sums 6 partial input gradients. Fused, per group:

    y = x [Wq; Wk; Wv]ᵀ + [bq; bk; bv]          one base product (the stacked frozen weight)
    h = x [Aq; Ak; Av]ᵀ                          one LoRA down-projection, K -> 3r
    y = y + s · h · blockdiag(Bq, Bk, Bv)ᵀ       one up-projection; then q, k, v = split(y)

and the backward's input gradient is one base product (inner size 3·out) plus one rank-3r product.

The trained tensors stay peft's own ``lora_A`` / ``lora_B`` of each original layer: they are read on every
forward (concatenated, so gradients flow back to each), nothing is re-parametrized, and the saved adapter
is unchanged. The stacked base weight is a non-persistent buffer of the attention module whose rows ARE
the three base weights (each base layer's ``weight`` becomes a view of it: no second copy of W, and an
in-place change of a base weight, e.g. peft's merge, is seen by the fused product).

A group is fused only where it computes the same thing: three vanilla single-adapter LoRA layers (no
DoRA, no dropout, no LoRA bias, not merged, the same scaling) on plain ``nn.Linear`` bases, or three
plain ``nn.Linear`` layers. At each call the processor falls back to the layers' own forwards when an
adapter is disabled, merged or switched, or when the dtypes disagree outside autocast. FP8 base layers
(``speed.float8_base``) are not ``nn.Linear``: those groups stay unfused. Call it after the model is on
its device (``.to`` would split the views) and after LoRA is attached. Exact on the CPU tiny model
(tests/test_levers.py); under bf16 autocast the products round as peft's do up to summation order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sd35hub.train.fused_lora import ADAPTER, _lora_linear_class, fusable

GROUPS = {"sample": ("to_q", "to_k", "to_v"), "context": ("add_q_proj", "add_k_proj", "add_v_proj")}
_FUSED_ATTR = "_sd35hub_qkv"  # on the attention module: {group: names} of the fused groups


def _group_kind(layers: list[Any]) -> str | None:
    """'lora' (three vanilla LoRA layers, one scaling), 'base' (three plain Linear) or None (not fusable)."""
    if all(type(m) is _lora_linear_class() and fusable(m) for m in layers):
        bases = [m.base_layer for m in layers]
        if len({float(m.scaling[ADAPTER]) for m in layers}) != 1:
            return None
        kind = "lora"
    elif all(type(m) is torch.nn.Linear for m in layers):
        bases, kind = layers, "base"
    else:
        return None
    w = [b.weight for b in bases]
    if len({(t.shape[1], t.dtype, t.device) for t in w}) != 1 or len({b.bias is None for b in bases}) != 1:
        return None
    if kind == "lora" and len({(m.lora_A[ADAPTER].weight.dtype, m.lora_B[ADAPTER].weight.dtype) for m in layers}) != 1:
        return None
    return kind


def _live(layers: list[Any], kind: str) -> bool:
    """At call time: the fused product computes what the layers' own forwards would."""
    if kind == "base":
        return True
    return all(list(m.active_adapters) == [ADAPTER] and not m.merged and not m.disable_adapters
               and isinstance(m.lora_dropout[ADAPTER], torch.nn.Identity) for m in layers)


def project(attn: Any, x: torch.Tensor, group: str) -> list[torch.Tensor]:
    """The three projections of ``group`` of ``attn`` applied to ``x`` (fused where installed)."""
    names = GROUPS[group]
    layers = [getattr(attn, n) for n in names]
    fused = getattr(attn, _FUSED_ATTR, {})
    kind = fused.get(group)
    if kind is None or not _live(layers, kind):
        return [m(x) for m in layers]
    weight, bias = getattr(attn, f"_sd35hub_{group}_w"), getattr(attn, f"_sd35hub_{group}_b")
    autocast = torch.is_autocast_enabled(x.device.type)
    lora_dtype = layers[0].lora_A[ADAPTER].weight.dtype if kind == "lora" else weight.dtype
    if not autocast and not (x.dtype == weight.dtype == lora_dtype):
        return [m(x) for m in layers]  # peft's own dtype promotions
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))  # once, instead of once per product
    y = F.linear(x, weight, bias)
    if kind == "lora":
        lora_a = torch.cat([m.lora_A[ADAPTER].weight for m in layers])  # [3r, in]: x is read once
        lora_b = torch.block_diag(*[m.lora_B[ADAPTER].weight for m in layers])  # [3 out, 3r]
        y = y + F.linear(F.linear(x, lora_a), lora_b) * float(layers[0].scaling[ADAPTER])
    return list(y.split([m.out_features for m in layers], dim=-1))


class FusedQKVJointProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0`` semantics) with fused q/k/v groups."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, tokens = hidden_states.shape[0], hidden_states.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(t) for t in project(attn, hidden_states, "sample"))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (heads(t) for t in project(attn, encoder_hidden_states, "context"))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = torch.cat([query, c_query], 2), torch.cat([key, c_key], 2), torch.cat([value, c_value], 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :tokens], out[:, tokens:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


def _joint_processor_class() -> type:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return JointAttnProcessor2_0


def fuse_qkv(model: Any) -> int:
    """Install the fused q/k/v projections on every SD3 attention of ``model`` that runs diffusers' joint
    processor; returns the number of groups fused (a Large block: 2, a Medium dual-attention block: 3)."""
    count = 0
    for attn in model.modules():
        if type(getattr(attn, "processor", None)) is not _joint_processor_class():
            continue
        fused = {}
        for group, names in GROUPS.items():
            layers = [getattr(attn, n, None) for n in names]
            if any(m is None for m in layers) or (kind := _group_kind(layers)) is None:
                continue
            bases = [m.base_layer for m in layers] if kind == "lora" else layers
            w0 = bases[0].weight
            stacked = torch.empty(sum(b.weight.shape[0] for b in bases), w0.shape[1], dtype=w0.dtype, device=w0.device)
            bias = None if bases[0].bias is None else torch.empty(stacked.shape[0], dtype=bases[0].bias.dtype,
                                                                   device=w0.device)
            row = 0
            for b in bases:
                rows = slice(row, row + b.weight.shape[0])
                with torch.no_grad():
                    stacked[rows].copy_(b.weight)
                    if bias is not None:
                        bias[rows].copy_(b.bias)
                b.weight = torch.nn.Parameter(stacked[rows], requires_grad=False)  # a view: one copy of W
                if bias is not None:
                    b.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
                row = rows.stop
            # buffers: compiled graphs treat them as fixed inputs; non-persistent: not in any state dict
            attn.register_buffer(f"_sd35hub_{group}_w", stacked, persistent=False)
            attn.register_buffer(f"_sd35hub_{group}_b", bias, persistent=False)
            fused[group] = kind
        if fused:
            setattr(attn, _FUSED_ATTR, fused)
            attn._sd35hub_qkv_processor = attn.processor
            attn.processor = FusedQKVJointProcessor()
            count += len(fused)
    return count


def unfuse_qkv(model: Any) -> int:
    """Undo :func:`fuse_qkv`: each base weight (and bias) gets its own storage back, the attention its
    processor; returns the number of groups unfused."""
    count = 0
    for attn in model.modules():
        fused = getattr(attn, _FUSED_ATTR, None)
        if not fused:
            continue
        for group, kind in fused.items():
            for m in (getattr(attn, n) for n in GROUPS[group]):
                b = m.base_layer if kind == "lora" else m
                b.weight = torch.nn.Parameter(b.weight.detach().clone(), requires_grad=False)
                if b.bias is not None:
                    b.bias = torch.nn.Parameter(b.bias.detach().clone(), requires_grad=False)
            delattr(attn, f"_sd35hub_{group}_w")
            delattr(attn, f"_sd35hub_{group}_b")
            count += 1
        attn.processor = attn._sd35hub_qkv_processor
        del attn._sd35hub_qkv_processor
        delattr(attn, _FUSED_ATTR)
    return count
