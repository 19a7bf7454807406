"""Hostile adapter files (#22 class 4): every one is a typed AdapterError with a clear message, on load, in
every command — never a traceback, never a silently wrong result. Property-based (hypothesis) on top of
the named cases; files are built in the diffusers, kohya and ComfyUI layouts for the tiny model (32 wide,
3 blocks, attn2 on blocks 0 and 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sd35hub.adapters.files import read_adapter
from sd35hub.adapters.formats import LoraModule, to_state_dict
from sd35hub.errors import AdapterError, AdapterIncompatibleError

W = 32  # tiny transformer width
COUNTS: dict[str, int] = {"named": 0, "generated": 0, "rejected": 0, "accepted": 0}


def _mod(out: int, inp: int, rank: int = 4, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(down=torch.randn(rank, inp, generator=g) * 0.1, up=torch.randn(out, rank, generator=g) * 0.1,
                      alpha=8.0)  # fmt: skip


def valid_modules() -> dict[str, LoraModule]:
    return {
        "transformer_blocks.0.attn.to_q": _mod(W, W, seed=1),
        "transformer_blocks.0.attn.to_k": _mod(W, W, seed=2),
        "transformer_blocks.0.attn.to_v": _mod(W, W, seed=3),
        "transformer_blocks.1.attn2.to_q": _mod(W, W, seed=4),
        "transformer_blocks.1.ff.net.0.proj": _mod(4 * W, W, seed=5),
        "transformer_blocks.2.norm1_context.linear": _mod(2 * W, W, seed=6),
    }


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> Path:
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


def _diffusers(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state_dict, _ = to_state_dict(valid_modules(), "diffusers")
    state_dict.update(changes)
    return state_dict


Q = "transformer.transformer_blocks.0.attn.to_q"
CASES = {
    "wrong in features": ({f"{Q}.lora_A.weight": torch.zeros(4, 48)}, None, "delta 32x48"),
    "wrong out features": ({f"{Q}.lora_B.weight": torch.zeros(40, 4)}, None, "40x32"),
    "block beyond the model": ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, W),
                                "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(W, 4)},
                               None, "beyond the base's 3 blocks"),
    "attn2 without dual attention": ({"transformer.transformer_blocks.2.attn2.to_q.lora_A.weight": torch.zeros(4, W),
                                      "transformer.transformer_blocks.2.attn2.to_q.lora_B.weight": torch.zeros(W, 4)},
                                     None, "no dual attention"),
    "unknown module": ({"transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": torch.zeros(4, W),
                        "transformer.transformer_blocks.0.attn.to_zz.lora_B.weight": torch.zeros(W, 4)},
                       None, "base has no layer"),
    "int32 tensor": ({f"{Q}.lora_A.weight": torch.ones(4, W, dtype=torch.int32)}, None, "dtype int32"),
    "bool tensor": ({f"{Q}.lora_B.weight": torch.ones(W, 4, dtype=torch.bool)}, None, "dtype bool"),
    "rank 0": ({f"{Q}.lora_A.weight": torch.zeros(0, W), f"{Q}.lora_B.weight": torch.zeros(W, 0)}, None, "rank 0"),
    "inf weight": ({f"{Q}.lora_B.weight": torch.full((W, 4), math.inf)}, None, "non-finite"),
    "nan weight": ({f"{Q}.lora_A.weight": torch.full((4, W), math.nan)}, None, "non-finite"),
    "1e30 weight": ({f"{Q}.lora_B.weight": torch.full((W, 4), 1e30)}, None, "far beyond"),
    "duplicate prefixed and bare": ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, W)}, None,
                                    "Duplicate"),
    "metadata alpha text": ({}, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "eight"})},
                            "not a number"),
    "metadata alpha null": ({}, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": None})},
                            "not a number"),
    "metadata alpha negative": ({}, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": -1})},
                                "positive"),
    "metadata not an object": ({}, {"lora_adapter_metadata": "[1, 2]"}, "not a JSON object"),
    "up missing": ({}, None, "no up"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_hostile_diffusers_files_are_adapter_errors(tmp_path: Path, case: str) -> None:
    changes, header, message = CASES[case]
    tensors = _diffusers(**changes)
    if case == "up missing":
        del tensors[f"{Q}.lora_B.weight"]
    COUNTS["named"] += 1
    with pytest.raises(AdapterError, match=message):
        read_adapter(_write(tmp_path, tensors, header))


def test_kohya_alpha_vector_and_comfy_duplicates(tmp_path: Path) -> None:
    kohya, _ = to_state_dict(valid_modules(), "kohya")
    kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"] = torch.ones(4)
    with pytest.raises(AdapterError, match="one number"):
        read_adapter(_write(tmp_path, kohya))
    kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"] = torch.tensor(math.nan)
    with pytest.raises(AdapterError, match="positive finite"):
        read_adapter(_write(tmp_path, kohya))
    comfy, _ = to_state_dict(valid_modules(), "comfyui")
    mixed = {**comfy, **_diffusers()}  # the same layers under MMDiT and diffusers names
    with pytest.raises(AdapterError, match="twice, in two layouts"):
        read_adapter(_write(tmp_path, mixed))
    COUNTS["named"] += 3


def test_a_large_adapter_is_named_without_a_base(tmp_path: Path) -> None:
    large = {"transformer.transformer_blocks.40.attn.to_q.lora_A.weight": torch.zeros(4, 2432),
             "transformer.transformer_blocks.40.attn.to_q.lora_B.weight": torch.zeros(2432, 4)}  # fmt: skip
    with pytest.raises(AdapterIncompatibleError, match="SD3.5 Large.*beyond the base's 38 blocks"):
        read_adapter(_write(tmp_path, large))


@pytest.mark.parametrize("command", ["adapter-info", "convert", "merge"])
def test_every_command_gives_one_line_and_exit_9(tmp_path: Path, capsys, command: str) -> None:  # noqa: ANN001
    path = _write(tmp_path, _diffusers(**{f"{Q}.lora_B.weight": torch.full((W, 4), 1e30)}))
    args = {
        "adapter-info": ["adapter-info", str(path)],
        "convert": ["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "kohya"],
        "merge": ["merge", f"{path}:0.5", "--out", str(tmp_path / "merged")],
    }[command]
    code, out, err = run_cli(args, capsys)
    assert code == 9
    assert "far beyond" in err and "Traceback" not in err + out
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged").exists()


# --- generated hostile files ---------------------------------------------------------------------

_MUTATIONS = ("shape", "dtype", "value", "rename", "duplicate", "drop", "alpha", "header")


@st.composite
def hostile_files(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    fmt = draw(st.sampled_from(["diffusers", "kohya", "comfyui"]))
    state_dict, header = to_state_dict(valid_modules(), fmt)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(state_dict)))
        kind = draw(st.sampled_from(_MUTATIONS))
        tensor = state_dict[key]
        if kind == "shape":
            dims = draw(st.lists(st.integers(0, 70), min_size=0, max_size=4))
            state_dict[key] = torch.zeros(dims)
        elif kind == "dtype":
            dtype = draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8]))
            state_dict[key] = tensor.to(dtype)
        elif kind == "value":
            value = draw(st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -3e38, 1e5]))
            flat = tensor.clone().float().reshape(-1)
            flat[0] = value
            state_dict[key] = flat.reshape(tensor.shape)
        elif kind == "rename":
            new = draw(st.sampled_from([
                key.replace("0", "9"), key.replace("to_q", "to_zz"), key.replace("attn", "attn2"),
                key.replace("lora_A", "lora_C"), "lora_te1_" + key, key.replace(".", "_", 2), "unet." + key,
                key.replace("transformer_blocks", "single_transformer_blocks"), key + ".default",
            ]))  # fmt: skip
            state_dict[new] = state_dict.pop(key)
        elif kind == "duplicate":
            state_dict[
                key.removeprefix("transformer.") if key.startswith("transformer.") else "transformer." + key
            ] = tensor.clone()
        elif kind == "drop":
            del state_dict[key]
        elif kind == "alpha":
            value = draw(st.sampled_from([0.0, -4.0, math.nan, math.inf, 1e9]))
            state_dict[key.rsplit(".lora_", 1)[0].removesuffix(".weight") + ".alpha"] = torch.tensor(
                draw(st.sampled_from([[value], [value, value], value]))
            )
        else:
            text = draw(st.sampled_from(["{", "null", "[]", '{"transformer.lora_alpha": "x"}',
                                         '{"transformer.lora_alpha": null}', '{"transformer.alpha_pattern": 3}',
                                         '{"transformer.use_rslora": true, "transformer.lora_alpha": 2}']))  # fmt: skip
            header = {**header, "lora_adapter_metadata": text}
    return state_dict, header


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_files())
def test_generated_hostile_files_are_typed_errors_or_valid_adapters(
    tmp_path: Path, case: tuple[dict[str, torch.Tensor], dict[str, str]]
) -> None:
    tensors, header = case
    COUNTS["generated"] += 1
    if not tensors:
        return
    path = tmp_path / "gen.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    try:
        adapter = read_adapter(path)
    except AdapterError as exc:
        COUNTS["rejected"] += 1
        assert str(exc) and "\n" not in str(exc)[:200]
        return
    COUNTS["accepted"] += 1  # what loads must be a sound adapter for the tiny model
    from sd35hub.adapters.check import check_transformer
    from sd35hub.models.info import model_info_from_config
    from sd35hub.models.tiny import TRANSFORMER_CONFIG

    check_transformer(adapter.modules, model_info_from_config("tiny", TRANSFORMER_CONFIG))
    for module in adapter.modules.values():
        assert module.rank >= 1 and math.isfinite(module.alpha) and module.alpha > 0
        assert bool(torch.isfinite(module.up).all()) and float(module.up.abs().max()) <= 1e4
