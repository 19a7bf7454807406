"""Files built the way other tools write them (#23), documented from their source, read exactly; strength
right in every target as each loader applies it; text-encoder parts kept through every conversion.

Loader semantics used to check "strength right" (from the loaders' source):
* ComfyUI (comfy/weight_adapter/lora.py): delta = (alpha / rank if an `<x>.alpha` key exists, else 1)
  * up.flatten(1) @ down.flatten(1), rank = down.shape[0]; `.diff` adds the tensor, `.diff_b` the bias.
* kohya sd-scripts (networks/lora_flux.py LoRAModule): scale = alpha / lora_dim; a `split_qkv=True` network
  saves its three rank-r members fused as down [3r, in], up block-diagonal [3*out, 3r], alpha unchanged.
* diffusers: scale = lora_alpha / r from the `lora_adapter_metadata` header (alpha = rank without it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from sd35hub.adapters.files import read_adapter, write_adapter
from sd35hub.adapters.formats import LoraModule, parts_from_state_dict, to_state_dict, unprefixed_configs
from sd35hub.errors import AdapterError

W = 32  # the tiny model's width (3 blocks; attn2 on 0 and 1)
QKV = "joint_blocks.0.x_block.attn.qkv"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def _mod(out: int, inp: int, rank: int, alpha: float, seed: int) -> LoraModule:
    return LoraModule(down=_rand(rank, inp, seed=seed), up=_rand(out, rank, seed=seed + 100), alpha=alpha)


def _delta(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.up.double().flatten(1) @ m.down.double().flatten(1))


def comfy_delta(sd: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """What ComfyUI adds to the weight for LoRA key stem `stem` (see the module docstring)."""
    pairs = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
             ("lora.up.weight", "lora.down.weight"), ("lora_B.default.weight", "lora_A.default.weight"))  # fmt: skip
    for up_leaf, down_leaf in pairs:
        if f"{stem}.{up_leaf}" in sd:
            up, down = sd[f"{stem}.{up_leaf}"].double(), sd[f"{stem}.{down_leaf}"].double()
            alpha = sd.get(f"{stem}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            return scale * (up.flatten(1) @ down.flatten(1))
    raise KeyError(stem)


def modules_with_odd_alpha() -> dict[str, LoraModule]:
    """Separate q/k/v (scale 0.75, alpha != rank) and others: the case that loses strength in ComfyUI."""
    names = {"attn.to_q": (W, W), "attn.to_k": (W, W), "attn.to_v": (W, W), "attn.to_out.0": (W, W),
             "ff.net.0.proj": (4 * W, W)}  # fmt: skip
    return {f"transformer_blocks.0.{n}": _mod(o, i, 4, 3.0, s) for s, (n, (o, i)) in enumerate(names.items())}


# --- 1. the default diffusers file at the right strength in ComfyUI --------------------------------


def test_default_diffusers_file_has_the_trained_strength_in_comfyui_and_diffusers(tmp_path: Path) -> None:
    mods = modules_with_odd_alpha()
    file = write_adapter(mods, tmp_path / "a")
    with safe_open(str(file), framework="pt") as handle:
        sd = {k: handle.get_tensor(k) for k in handle.keys()}
        config = unprefixed_configs(handle.metadata()["lora_adapter_metadata"])["transformer"]
    for name, module in mods.items():
        # ComfyUI reads no alpha for these keys: scale 1 must already be right
        assert torch.allclose(comfy_delta(sd, f"transformer.{name}"), _delta(module), atol=1e-7), name
        # stock diffusers: lora_alpha / r from the header
        stored = (
            sd[f"transformer.{name}.lora_B.weight"].double()
            @ sd[f"transformer.{name}.lora_A.weight"].double()
        )
        assert torch.allclose(config["lora_alpha"] / config["r"] * stored, _delta(module), atol=1e-7)


# --- 2. text-encoder parts, every layout, both ways ------------------------------------------------


def _te_parts() -> dict[str, dict[str, LoraModule]]:
    return {
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": _mod(W, W, 4, 2.0, 50)},
        "text_encoder_2": {"text_model.encoder.layers.1.mlp.fc1": _mod(2 * W, W, 4, 4.0, 51)},
        "text_encoder_3": {"encoder.block.0.layer.0.SelfAttention.q": _mod(32, 64, 4, 8.0, 52)},  # tiny T5: inner 32
    }


def _same_function(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(_delta(a[name]), _delta(b[name]), atol=1e-7), name


@pytest.mark.parametrize("first", ["diffusers", "kohya", "comfyui"])
@pytest.mark.parametrize("second", ["diffusers", "kohya", "comfyui"])
def test_text_encoder_parts_survive_every_conversion(tmp_path: Path, first: str, second: str) -> None:
    mods, te = modules_with_odd_alpha(), _te_parts()
    one = read_adapter(write_adapter(mods, tmp_path / f"1.{first}.safetensors", fmt=first, text_encoders=te))
    two = read_adapter(write_adapter(one.modules, tmp_path / f"2.{second}.safetensors", fmt=second,
                                     text_encoders=one.text_encoders))  # fmt: skip
    _same_function(mods, two.modules)
    assert sorted(two.text_encoders) == sorted(te)
    for component in te:
        _same_function(te[component], two.text_encoders[component])


def test_kohya_and_comfy_text_encoder_key_names() -> None:
    kohya, _ = to_state_dict({}, "kohya", _te_parts())
    comfy, _ = to_state_dict({}, "comfyui", _te_parts())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in kohya
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight" in kohya
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha" in comfy
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight" in comfy
    # ComfyUI applies each at alpha/rank: the same delta as ours
    te = _te_parts()
    assert torch.allclose(comfy_delta(comfy, "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1"),
                          _delta(te["text_encoder_2"]["text_model.encoder.layers.1.mlp.fc1"]), atol=1e-7)  # fmt: skip


def test_diffusers_save_lora_weights_with_text_encoder_is_kept(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The file StableDiffusion3Pipeline.save_lora_weights(..., text_encoder_lora_layers=...) writes."""
    from diffusers import StableDiffusion3Pipeline

    te = _te_parts()["text_encoder"]
    layers = {f"{n}.lora_A.weight": m.down for n, m in te.items()} | {
        f"{n}.lora_B.weight": m.up for n, m in te.items()
    }
    tr = modules_with_odd_alpha()
    tr_layers = {f"{n}.lora_A.weight": m.down for n, m in tr.items()} | {
        f"{n}.lora_B.weight": m.up for n, m in tr.items()
    }
    meta = {"r": 4, "lora_alpha": 3.0, "target_modules": sorted(tr)}
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "d", transformer_lora_layers=tr_layers, text_encoder_lora_layers=layers,
        transformer_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 2.0, "target_modules": ["q_proj"]},
    )  # fmt: skip
    code, out, err = run_cli(
        ["convert", str(tmp_path / "d"), str(tmp_path / "k.safetensors"), "--to", "kohya"], capsys
    )
    assert code == 0, err
    assert "+ 1 text-encoder modules" in out
    back = read_adapter(tmp_path / "k.safetensors")
    _same_function(te, back.text_encoders["text_encoder"])
    _same_function(tr, back.modules)
    code, out, _ = run_cli(
        ["convert", str(tmp_path / "d"), str(tmp_path / "again"), "--to", "diffusers"], capsys
    )
    with safe_open(str(tmp_path / "again" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("text_encoder.text_model.") for k in keys)
    assert not any(k.startswith("transformer.text_encoder") for k in keys)


# --- 3. use_rslora, 4. unet. prefix ----------------------------------------------------------------


def test_use_rslora_scale_is_alpha_over_sqrt_rank() -> None:
    mods = {"transformer_blocks.0.attn.to_q": _mod(W, W, 4, 8.0, 1)}
    sd, _ = to_state_dict(mods, "diffusers")  # alpha = rank = 4 stored, the raw pair
    config = {"r": 4, "lora_alpha": 8.0, "use_rslora": True}
    parts = parts_from_state_dict(sd, {"transformer": config})
    module = parts.transformer["transformer_blocks.0.attn.to_q"]
    assert math.isclose(module.scale, 8.0 / math.sqrt(4))  # on the stored pair
    kohya, _ = to_state_dict(parts.transformer, "kohya")
    raw = sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].double() @ sd[
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].double()  # fmt: skip
    got = comfy_delta(kohya, "lora_unet_joint_blocks_0_x_block_attn_qkv")[:W]
    assert torch.allclose(got, 4.0 * raw, atol=1e-7)  # 8 / sqrt(4), not 8 / 4


def test_unet_prefix_is_read_as_the_transformer(tmp_path: Path) -> None:
    sd, _ = to_state_dict({"transformer_blocks.0.attn.to_q": _mod(W, W, 4, 4.0, 1)}, "diffusers")
    unet = {"unet." + k.removeprefix("transformer."): v for k, v in sd.items()}
    save_file(unet, str(tmp_path / "u.safetensors"))
    write_adapter(read_adapter(tmp_path / "u.safetensors").modules, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys())[0] == "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"


# --- 5. ComfyUI LoraSave / TrainLoraNode: .diff, .diff_b, conv on x_embedder.proj ------------------


def lorasave_file() -> dict[str, torch.Tensor]:
    """What LoraSave (default bias_diff=True) writes: SVD pairs in fp16 without alpha, `.diff_b` for every
    bias, `.diff` for every 1-D weight (zeros where unchanged), conv pairs [out, r, 1, 1] / [r, in, k, k]."""
    return {
        f"diffusion_model.{QKV}.lora_up.weight": _rand(3 * W, 4, seed=1).half(),
        f"diffusion_model.{QKV}.lora_down.weight": _rand(4, W, seed=2).half(),
        f"diffusion_model.{QKV}.diff_b": _rand(3 * W, seed=3).half(),
        "diffusion_model.x_embedder.proj.lora_up.weight": _rand(W, 4, 1, 1, seed=4).half(),
        "diffusion_model.x_embedder.proj.lora_down.weight": _rand(4, 16, 2, 2, seed=5).half(),
        "diffusion_model.x_embedder.proj.diff_b": _rand(W, seed=6).half(),
        "diffusion_model.joint_blocks.0.x_block.attn.ln_q.diff": torch.zeros(8, dtype=torch.float16),
        "diffusion_model.joint_blocks.0.x_block.mlp.fc2.diff_b": torch.zeros(W, dtype=torch.float16),
    }


def test_lorasave_file_is_read_exactly_and_loads_through_peft(tmp_path: Path) -> None:
    sd = lorasave_file()
    parts = parts_from_state_dict(sd)
    assert parts.dropped == 2  # the all-zero 1-D diff and bias delta change nothing
    q = parts.transformer["transformer_blocks.0.attn.to_q"]
    assert torch.allclose(_delta(q), comfy_delta(sd, f"diffusion_model.{QKV}")[:W])
    assert torch.equal(q.bias, sd[f"diffusion_model.{QKV}.diff_b"][:W].float())
    conv = parts.transformer["pos_embed.proj"]
    assert conv.is_conv and torch.allclose(_delta(conv), comfy_delta(sd, "diffusion_model.x_embedder.proj"))
    # through peft into the tiny model: base + delta, bias + delta_b (what ComfyUI patches)
    from lora_helpers import tiny_pipe

    from sd35hub.adapters.files import Adapter, load_into_transformer

    pipe = tiny_pipe()
    tr = pipe.transformer
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in tr.named_modules()
              if n in ("pos_embed.proj", "transformer_blocks.0.attn.to_v")}  # fmt: skip
    load_into_transformer(tr, Adapter(parts.transformer, None, "comfyui"), "ls")
    tr.fuse_lora(adapter_names=["ls"])
    v = dict(tr.named_modules())["transformer_blocks.0.attn.to_v"].base_layer
    p = dict(tr.named_modules())["pos_embed.proj"].base_layer
    assert torch.allclose(v.weight - before["transformer_blocks.0.attn.to_v"][0],
                          comfy_delta(sd, f"diffusion_model.{QKV}")[2 * W :].float(), atol=1e-6)  # fmt: skip
    assert torch.allclose(v.bias - before["transformer_blocks.0.attn.to_v"][1],
                          sd[f"diffusion_model.{QKV}.diff_b"][2 * W :].float(), atol=1e-6)  # fmt: skip
    assert torch.allclose(
        p.weight - before["pos_embed.proj"][0],
        comfy_delta(sd, "diffusion_model.x_embedder.proj").reshape(W, 16, 2, 2).float(),
        atol=1e-6,
    )
    # and it converts back to ComfyUI with the same deltas
    comfy, _ = to_state_dict(parts.transformer, "comfyui")
    assert torch.allclose(
        comfy_delta(comfy, f"diffusion_model.{QKV}"), comfy_delta(sd, f"diffusion_model.{QKV}")
    )
    assert torch.allclose(
        comfy[f"diffusion_model.{QKV}.diff_b"].float(), sd[f"diffusion_model.{QKV}.diff_b"].float()
    )


def test_trainloranode_flattened_conv_and_full_diff() -> None:
    """TrainLoraNode flattens the conv LoRA to 2-D ([r, in*k*k]); LoraSave full_diff writes `.diff`."""
    up, down = _rand(W, 4, seed=1), _rand(4, 64, seed=2)
    sd = {"diffusion_model.x_embedder.proj.lora_up.weight": up, "diffusion_model.x_embedder.proj.lora_down.weight": down,
          "diffusion_model.x_embedder.proj.alpha": torch.tensor(2.0),
          "diffusion_model.joint_blocks.1.x_block.mlp.fc2.diff": _rand(W, 4 * W, seed=3)}  # fmt: skip
    parts = parts_from_state_dict(sd)
    conv = parts.transformer["pos_embed.proj"]
    assert tuple(conv.down.shape) == (4, 16, 2, 2) and conv.scale == 0.5
    full = parts.transformer["transformer_blocks.1.ff.net.2"]
    assert torch.equal((full.up @ full.down), sd["diffusion_model.joint_blocks.1.x_block.mlp.fc2.diff"])


def test_nonzero_diff_on_a_norm_is_refused_with_the_cause() -> None:
    sd = {"diffusion_model.joint_blocks.0.x_block.attn.ln_q.diff": torch.ones(8)}
    with pytest.raises(AdapterError, match="1-D weight .a norm scale"):
        parts_from_state_dict(sd)


# --- 6. kohya split_qkv -----------------------------------------------------------------------------


def kohya_split_qkv_file(
    rank: int = 2, alpha: float = 1.0
) -> tuple[dict[str, torch.Tensor], list[LoraModule]]:
    """What lora_sd3.py's state_dict() saves for split_qkv=True: three rank-r members fused."""
    members = [_mod(W, W, rank, alpha, s) for s in (10, 11, 12)]
    down = torch.cat([m.down for m in members])
    up = torch.block_diag(*[m.up for m in members])
    stem = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    return {
        f"{stem}.lora_down.weight": down,
        f"{stem}.lora_up.weight": up,
        f"{stem}.alpha": torch.tensor(alpha),
    }, members


def test_split_qkv_follows_ss_network_args(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    sd, members = kohya_split_qkv_file()
    save_file(
        sd,
        str(tmp_path / "split.safetensors"),
        metadata={"ss_network_args": json.dumps({"split_qkv": "True"})},
    )
    adapter = read_adapter(tmp_path / "split.safetensors")
    for part, member in zip(("to_q", "to_k", "to_v"), members, strict=True):
        assert torch.allclose(_delta(adapter.modules[f"transformer_blocks.0.attn.{part}"]), _delta(member))
    code, out, _ = run_cli(["adapter-info", str(tmp_path / "split.safetensors")], capsys)
    assert code == 0 and "split_qkv=True" in out
    save_file(sd, str(tmp_path / "plain.safetensors"))  # without the header: alpha applies to the fused rank
    plain = read_adapter(tmp_path / "plain.safetensors")
    assert math.isclose(plain.modules["transformer_blocks.0.attn.to_q"].scale * 3, members[0].scale)


def test_to_kohya_says_how_to_continue_training(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    write_adapter(modules_with_odd_alpha(), tmp_path / "a")
    code, out, _ = run_cli(
        ["convert", str(tmp_path / "a"), str(tmp_path / "k.safetensors"), "--to", "kohya"], capsys
    )
    assert code == 0 and "split_qkv=True" in out and "--network_dim 4" in out


# --- 7. other layouts ComfyUI loads for SD3 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "stem", "down", "up"),
    [
        (
            "onetrainer",
            "lora_transformer_transformer_blocks_0_attn_to_q",
            "lora_down.weight",
            "lora_up.weight",
        ),
        ("lycoris", "lycoris_transformer_blocks_0_attn_to_q", "lora_down.weight", "lora_up.weight"),
        (
            "diffusers",
            "base_model.model.transformer_blocks.0.attn.to_q",
            "lora_A.default.weight",
            "lora_B.default.weight",
        ),
        ("diffusers", "transformer.transformer_blocks.0.attn.to_q", "lora.down.weight", "lora.up.weight"),
    ],
)
def test_other_layouts_read_at_comfyui_strength(layout: str, stem: str, down: str, up: str) -> None:
    sd = {f"{stem}.{down}": _rand(4, W, seed=1), f"{stem}.{up}": _rand(W, 4, seed=2)}
    if layout in ("onetrainer", "lycoris"):
        sd[f"{stem}.alpha"] = torch.tensor(1.0)
    parts = parts_from_state_dict(sd)
    assert parts.layout == layout
    assert torch.allclose(_delta(parts.transformer["transformer_blocks.0.attn.to_q"]), comfy_delta(sd, stem))


@pytest.mark.parametrize(
    ("leaf", "kind"),
    [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA")],
)
def test_lycoris_products_and_dora_are_refused_with_the_reason(leaf: str, kind: str) -> None:
    with pytest.raises(AdapterError, match=f"{kind}.*not a low-rank pair"):
        parts_from_state_dict({f"diffusion_model.{QKV}.{leaf}": torch.zeros(4, 4)})


def test_generate_applies_text_encoder_lora_like_stock_diffusers(tmp_path: Path) -> None:
    """A transformer + CLIP-L + CLIP-G LoRA (alpha != rank) through our pipeline loader gives the latents stock
    diffusers' load_lora_weights gives; blending it off gives the base again."""
    from lora_helpers import generate_latents, tiny_pipe

    from sd35hub.adapters.files import disable_pipeline_adapters, load_into_pipeline, set_pipeline_adapters

    te = {"text_encoder": {f"text_model.encoder.layers.{i}.self_attn.q_proj": _mod(W, W, 4, 2.0, 60 + i) for i in (0, 1)},
          "text_encoder_2": {"text_model.encoder.layers.0.mlp.fc1": _mod(64, W, 4, 8.0, 70),
                             "text_model.encoder.layers.1.self_attn.v_proj": _mod(W, W, 4, 8.0, 71)}}  # fmt: skip
    for modules in te.values():
        for m in modules.values():
            m.up = m.up * 20  # visible through the tiny random encoders
    file = write_adapter(modules_with_odd_alpha(), tmp_path / "te", text_encoders=te)
    stock = tiny_pipe()
    base = generate_latents(stock)
    stock.load_lora_weights(str(file.parent))
    expected = generate_latents(stock)
    ours = tiny_pipe()
    load_into_pipeline(ours, read_adapter(file), "a")
    set_pipeline_adapters(ours, ["a"], [1.0])
    assert torch.allclose(generate_latents(ours), expected, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3
    disable_pipeline_adapters(ours)
    assert torch.allclose(generate_latents(ours), base, atol=1e-6)


def test_merge_keeps_text_encoder_parts_and_bias_deltas(tmp_path: Path) -> None:
    from sd35hub.blend.merge import write_merged

    sources = []
    for i, weight in enumerate((0.7, -0.4)):
        mods = modules_with_odd_alpha()
        for m in mods.values():
            m.up = m.up * (i + 1)
        mods["transformer_blocks.0.attn.to_q"].bias = _rand(W, seed=90 + i)
        te = {"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": _mod(W, W, 4, 2.0 + i, 80 + i)}}
        sources.append((str(write_adapter(mods, tmp_path / f"s{i}", text_encoders=te)), weight, mods, te))
    merged = read_adapter(write_merged([(s, w) for s, w, _, _ in sources], tmp_path / "m"))
    q = "transformer_blocks.0.attn.to_q"
    want = sum(w * _delta(m[q]) for _, w, m, _ in sources)
    assert torch.allclose(_delta(merged.modules[q]), want, atol=1e-6)
    assert torch.allclose(merged.modules[q].bias.double(), sum(w * m[q].bias.double() for _, w, m, _ in sources), atol=1e-6)
    te_name = "text_model.encoder.layers.0.self_attn.q_proj"
    want_te = sum(w * _delta(t["text_encoder"][te_name]) for _, w, _, t in sources)
    assert torch.allclose(_delta(merged.text_encoders["text_encoder"][te_name]), want_te, atol=1e-6)


@pytest.mark.slow
def test_blend_engine_applies_a_text_encoder_only_adapter(tmp_path: Path) -> None:
    """generate / the Space (BlendEngine): a CLIP-only LoRA changes the image; weight 0 and eviction undo it."""
    import numpy as np

    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef, GenerationRequest

    te = {"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": _mod(W, W, 4, 4.0, 61)}}
    te["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"].up *= 40
    file = write_adapter({}, tmp_path / "te_only", text_encoders=te)
    engine = BlendEngine("tiny", max_cached_adapters=2)

    def pixels(weight: float | None) -> np.ndarray:
        refs = [] if weight is None else [AdapterRef(str(file.parent), weight)]
        request = GenerationRequest(prompt="a red fox", adapters=refs, steps=2, width=64, height=64, seed=3)
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    base = pixels(None)
    assert np.abs(pixels(1.0) - base).max() > 0  # the text-encoder LoRA is applied
    assert np.array_equal(pixels(None), base)  # and switched off for the base model
    assert any("lora_A" in n for n, _ in engine.pipe.text_encoder.named_parameters())
    engine.unload(str(file.parent))
    assert not any("lora_A" in n for n, _ in engine.pipe.text_encoder.named_parameters())  # freed
