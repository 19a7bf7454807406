"""SD3 LoRA key layouts: detection, exact conversion (bitwise round trips), fused-qkv algebra, foreign keys."""

from __future__ import annotations

import pytest
import torch

from sd35hub.adapters.formats import (
    LoraModule,
    detect_format,
    fuse_qkv,
    modules_from_state_dict,
    split_qkv,
    to_state_dict,
)
from sd35hub.errors import AdapterError, AdapterIncompatibleError

DIM = 32  # tiny transformer width


def _module(out: int, inp: int, rank: int, alpha: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        down=torch.randn(rank, inp, generator=g), up=torch.randn(out, rank, generator=g), alpha=alpha
    )


def synthetic_modules(num_layers: int = 3) -> dict[str, LoraModule]:
    """Real SD3 module names, incl. attn2, the pre-only last block (norm1_context [2*dim]) and norm_out."""
    mods: dict[str, LoraModule] = {}
    seed = 0
    for i in range(num_layers):
        last = i == num_layers - 1
        names = {
            "attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM), "attn.to_out.0": (DIM, DIM),
            "attn.add_q_proj": (DIM, DIM), "attn.add_k_proj": (DIM, DIM), "attn.add_v_proj": (DIM, DIM),
            "ff.net.0.proj": (4 * DIM, DIM), "ff.net.2": (DIM, 4 * DIM), "norm1.linear": (6 * DIM, DIM),
            "norm1_context.linear": ((2 if last else 6) * DIM, DIM),
        }  # fmt: skip
        if not last:
            names.update({"attn.to_add_out": (DIM, DIM), "ff_context.net.0.proj": (4 * DIM, DIM)})
        if i == 0:
            names.update({"attn2.to_q": (DIM, DIM), "attn2.to_k": (DIM, DIM), "attn2.to_v": (DIM, DIM)})
        for suffix, (out, inp) in names.items():
            seed += 1
            mods[f"transformer_blocks.{i}.{suffix}"] = _module(
                out, inp, 4, 8.0 if suffix != "ff.net.2" else 2.0, seed
            )
    mods["norm_out.linear"] = _module(2 * DIM, DIM, 4, 8.0, 999)
    mods["proj_out"] = _module(64, DIM, 4, 8.0, 1000)
    mods["context_embedder"] = _module(DIM, 64, 4, 8.0, 1001)
    return mods


def _assert_same(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down), name
        assert torch.equal(a[name].up, b[name].up), name
        assert a[name].alpha == b[name].alpha, name


def _delta(m: LoraModule) -> torch.Tensor:
    return m.scale * m.up.double() @ m.down.double()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_round_trip_is_bitwise_exact(fmt: str) -> None:
    mods = synthetic_modules()
    state_dict, header = to_state_dict(mods, fmt)
    assert detect_format(state_dict) == fmt
    from sd35hub.adapters.formats import _fold, unprefixed_config

    back = modules_from_state_dict(state_dict, fmt, unprefixed_config(header.get("lora_adapter_metadata")))
    # diffusers files carry alpha = rank with the scale folded into lora_B (here 2 and 0.5: bitwise)
    _assert_same({n: _fold(m) for n, m in mods.items()} if fmt == "diffusers" else mods, back)
    assert all(back[n].alpha == back[n].rank for n in back) or fmt != "diffusers"
    # and the foreign layout itself survives foreign -> diffusers -> foreign bit for bit
    again, _ = to_state_dict(back, fmt)
    assert sorted(again) == sorted(state_dict)
    assert all(torch.equal(again[k], state_dict[k]) for k in state_dict)


def test_kohya_and_comfy_key_names() -> None:
    kohya, _ = to_state_dict(synthetic_modules(), "kohya")
    comfy, _ = to_state_dict(synthetic_modules(), "comfyui")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha" in kohya
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in kohya
    assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight" in kohya
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in kohya
    assert "diffusion_model.joint_blocks.0.x_block.mlp.fc1.lora_up.weight" in comfy
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (
        3 * DIM,
        12,
    )  # block-diag


def test_fused_qkv_is_exact_both_ways() -> None:
    # Separate q/k/v -> block-diagonal fused LoRA with triple rank; the fused delta equals the stacked deltas.
    q, k, v = (_module(DIM, DIM, 4, 8.0, s) for s in (1, 2, 3))
    fused = fuse_qkv([q, k, v])
    assert fused.rank == 12 and fused.scale == q.scale
    assert torch.allclose(_delta(fused), torch.cat([_delta(q), _delta(k), _delta(v)]), atol=1e-10)
    # Shared down (what kohya trains): rank stays r; split shares A and each part is exact.
    shared = LoraModule(down=q.down, up=torch.randn(3 * DIM, 4), alpha=2.0)
    parts = split_qkv(shared)
    assert all(p is not None and torch.equal(p.down, shared.down) for p in parts)
    assert torch.allclose(torch.cat([_delta(p) for p in parts]), _delta(shared), atol=1e-10)
    refused = fuse_qkv(parts)
    assert refused.rank == 4 and torch.equal(refused.up, shared.up) and torch.equal(refused.down, shared.down)
    # A missing member is an all-zero block that split drops again.
    partial = split_qkv(fuse_qkv([q, None, v]))
    assert partial[1] is None and torch.equal(partial[0].up, q.up) and torch.equal(partial[2].down, v.down)
    # Unequal scales: folded, still exact in value.
    k2 = _module(DIM, DIM, 4, 1.0, 4)
    mixed = fuse_qkv([q, k2, v])
    assert torch.allclose(_delta(mixed), torch.cat([_delta(q), _delta(k2), _delta(v)]), atol=1e-5)


def test_last_block_norm_is_swapped() -> None:
    mods = synthetic_modules()
    kohya, _ = to_state_dict(mods, "kohya")
    up = mods["transformer_blocks.2.norm1_context.linear"].up
    converted = kohya["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(converted[:DIM], up[DIM:]) and torch.equal(converted[DIM:], up[:DIM])
    # A 6*dim AdaLayerNormZero (not the last block) is not swapped.
    assert torch.equal(
        kohya["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"],
        mods["transformer_blocks.0.norm1_context.linear"].up,
    )


@pytest.mark.parametrize(
    ("key", "arch"),
    [
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", "Stable Diffusion XL"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "FLUX.1"),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "FLUX.1"),
        ("unet.down_blocks.1.attentions.0.proj_in.lora_A.weight", "Stable Diffusion XL"),
    ],
)
def test_foreign_architectures_are_named(key: str, arch: str) -> None:
    with pytest.raises(AdapterIncompatibleError, match=arch) as info:
        detect_format({key: torch.zeros(1, 1)})
    assert "Stable Diffusion 3.5" in str(info.value)


def test_unknown_layout_and_broken_pairs() -> None:
    with pytest.raises(AdapterError, match="LoHa"):
        detect_format({"foo.hada_w1_a": torch.zeros(1)})
    with pytest.raises(AdapterError, match="Unknown LoRA key"):
        detect_format({"foo.lora_A.weight": torch.zeros(1)})
    with pytest.raises(AdapterError, match="no up"):
        modules_from_state_dict({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, DIM)},
                                "diffusers", None)  # fmt: skip
    with pytest.raises(AdapterError, match="not a known SD3"):
        modules_from_state_dict({"lora_unet_joint_blocks_0_x_block_bogus.lora_down.weight": torch.zeros(4, DIM)},
                                "kohya", None)  # fmt: skip


def test_diffusers_without_metadata_means_alpha_equals_rank() -> None:
    state_dict, _ = to_state_dict(
        {"transformer_blocks.0.attn.to_q": _module(DIM, DIM, 4, 8.0, 1)}, "diffusers"
    )
    assert (
        modules_from_state_dict(state_dict, "diffusers", None)["transformer_blocks.0.attn.to_q"].alpha == 4.0
    )
