"""Key names of every SD3 LoRA layout we read, parsed into (component, namespace, module, leaf).

Documented from the writers' and loaders' own source (not copied):

* diffusers / peft (`StableDiffusion3Pipeline.save_lora_weights`, peft `get_peft_model_state_dict`):
  `transformer.<module>.lora_A.weight` / `lora_B.weight` (`lora_B.bias` with `lora_bias=True`),
  text encoders `text_encoder.<module>…`, `text_encoder_2.<module>…`; alpha in the header. peft's raw
  state dict names carry the adapter (`.lora_A.default.weight`) and `base_model.model.`; the old
  attention-processor LoRA uses `.lora.down.weight` / `.lora.up.weight`. ComfyUI reads all of these
  for SD3 (comfy/lora.py `model_lora_keys_unet`: `transformer.`, `base_model.model.`; comfy/weight_adapter/
  lora.py: `lora_B.weight`, `lora.up.weight`, `lora_B.default.weight`).
* kohya sd-scripts (`networks/lora_sd3.py`): `lora_unet_<MMDiT module, '.'->'_'>.lora_down.weight` /
  `.lora_up.weight` / `.alpha`; text encoders `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5).
* ComfyUI (LoraSave, TrainLoraNode, its loader): `diffusion_model.<MMDiT module>.lora_up.weight` …, plus
  `.diff` (a full weight delta), `.diff_b` (a bias delta); text encoders `text_encoders.clip_l.transformer.
  <module>`, `text_encoders.clip_g.transformer.…`, `text_encoders.t5xxl.transformer.…`.
* OneTrainer: `lora_transformer_<diffusers module, '.'->'_'>`; SimpleTuner's LyCORIS: `lycoris_<…>`
  (both diffusers module names with underscores; ComfyUI maps both for SD3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd35hub.adapters.formats_mmdit import BLOCK_LINEAR, BLOCK_QKV, GLOBAL_LINEAR, MMDIT_SUFFIXES
from sd35hub.errors import AdapterError

TRANSFORMER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
TE_LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
COMFY_TE = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}

# Leaf suffix -> normalized leaf. Longest first when matching.
LEAVES = {
    "lora_A.weight": "down", "lora_A.default.weight": "down", "lora_down.weight": "down",
    "lora.down.weight": "down", "lora_linear_layer.down.weight": "down",
    "lora_B.weight": "up", "lora_B.default.weight": "up", "lora_up.weight": "up",
    "lora.up.weight": "up", "lora_linear_layer.up.weight": "up",
    "lora_B.bias": "lora_bias", "lora_B.default.bias": "lora_bias",
    "alpha": "alpha", "diff": "diff", "diff_b": "diff_b",
}  # fmt: skip
_LEAF_ORDER = sorted(LEAVES, key=len, reverse=True)

# Leaves of adapter kinds that are not a low-rank pair: refused with the reason.
_NOT_LORA = (
    (re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LoHa (LyCORIS Hadamard product)"),
    (re.compile(r"\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t2)$"), "LoKr (LyCORIS Kronecker product)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.default)?(\.weight)?)$"), "DoRA"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a Tucker core (lora_mid)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R\.weight|boft_R|boft_s)$"), "OFT/BOFT"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.(w_norm|b_norm|set_weight|reshape_weight)$"), "ComfyUI norm/set/reshape patches"),
)
NOT_LORA_REASON = (
    "it is not a low-rank pair (delta_W = B A): diffusers/peft cannot load it as a LoRA, it cannot be "
    "blended by weight or converted exactly except at full rank. Load it in a tool that supports it "
    "(ComfyUI), or export a plain LoRA from it (LyCORIS `extract`, ComfyUI LoraSave). DoRA, LoKr and LoHa files "
    "trained by sd35hub load as they are in `sd35hub generate`, the Space and `sd35hub convert` (docs/formats.md)"
)


@dataclass(frozen=True)
class ParsedKey:
    component: str  # transformer | text_encoder | text_encoder_2 | text_encoder_3
    namespace: str  # diffusers | mmdit (transformer), te (text encoders: the HF model's own names)
    module: str  # e.g. transformer_blocks.0.attn.to_q, joint_blocks.0.x_block.attn.qkv, text_model...
    leaf: str  # down | up | alpha | lora_bias | diff | diff_b
    layout: str  # diffusers | peft | kohya | comfyui | onetrainer | lycoris


# --- module-name tables for the underscored layouts ------------------------------------------------

_DIFFUSERS_BLOCK_SUFFIXES = list(BLOCK_LINEAR) + [p for parts in BLOCK_QKV.values() for p in parts]
_UNDERSCORED_BLOCK = {s.replace(".", "_"): s for s in _DIFFUSERS_BLOCK_SUFFIXES}
_UNDERSCORED_GLOBAL = {name.replace(".", "_"): name for name in GLOBAL_LINEAR}
_MMDIT_UNDERSCORED_BLOCK = {s.replace(".", "_"): s for s in MMDIT_SUFFIXES}
_MMDIT_UNDERSCORED_GLOBAL = {v.replace(".", "_"): v for v in GLOBAL_LINEAR.values()}

_CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")  # fmt: skip
_T5_LEAVES = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
              "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo")  # fmt: skip
_CLIP_DOTTED = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_T5_DOTTED = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_CLIP_US = re.compile(r"^text_model_encoder_layers_(\d+)_(.+)$")
_T5_US = re.compile(r"^encoder_block_(\d+)_(.+)$")
_BLOCK_US = re.compile(r"^transformer_blocks_(\d+)_(.+)$")
_JOINT_US = re.compile(r"^joint_blocks_(\d+)_(.+)$")


def te_module_known(component: str, name: str) -> bool:
    """Whether `name` is a LoRA-able linear of that text encoder (CLIP for 1/2, T5 for 3)."""
    if component == "text_encoder_3":
        match = _T5_DOTTED.match(name)
        return bool(match and match.group(2) in _T5_LEAVES)
    if name == "text_projection":
        return True
    match = _CLIP_DOTTED.match(name)
    return bool(match and match.group(2) in _CLIP_LEAVES)


def _te_from_underscored(component: str, body: str, key: str) -> str:
    if component == "text_encoder_3":
        match = _T5_US.match(body)
        for leaf in _T5_LEAVES:
            if match and leaf.replace(".", "_") == match.group(2):
                return f"encoder.block.{match.group(1)}.{leaf}"
    else:
        if body == "text_projection":
            return body
        match = _CLIP_US.match(body)
        for leaf in _CLIP_LEAVES:
            if match and leaf.replace(".", "_") == match.group(2):
                return f"text_model.encoder.layers.{match.group(1)}.{leaf}"
    raise AdapterError(f"{key!r} is not a known {TE_LABELS[component]} text-encoder linear layer.")


def diffusers_from_underscored(body: str, key: str) -> str:
    """'transformer_blocks_0_attn_to_q' -> 'transformer_blocks.0.attn.to_q' (parsed against the table)."""
    match = _BLOCK_US.match(body)
    if match and match.group(2) in _UNDERSCORED_BLOCK:
        return f"transformer_blocks.{match.group(1)}.{_UNDERSCORED_BLOCK[match.group(2)]}"
    if body in _UNDERSCORED_GLOBAL:
        return _UNDERSCORED_GLOBAL[body]
    raise AdapterError(f"{key!r} is not a known SD3 transformer layer (diffusers names).")


def mmdit_from_underscored(body: str, key: str) -> str:
    """'joint_blocks_0_x_block_attn_qkv' -> 'joint_blocks.0.x_block.attn.qkv' (underscores are ambiguous)."""
    match = _JOINT_US.match(body)
    if match and match.group(2) in _MMDIT_UNDERSCORED_BLOCK:
        return f"joint_blocks.{match.group(1)}.{_MMDIT_UNDERSCORED_BLOCK[match.group(2)]}"
    if body in _MMDIT_UNDERSCORED_GLOBAL:
        return _MMDIT_UNDERSCORED_GLOBAL[body]
    raise AdapterError(f"kohya LoRA module 'lora_unet_{body}' ({key!r}) is not a known SD3 MMDiT layer.")


# --- parsing ---------------------------------------------------------------------------------------

_DIFFUSERS_STEMS = ("transformer_blocks.", "context_embedder", "time_text_embed.", "norm_out.", "proj_out",
                    "pos_embed.")  # fmt: skip


def split_leaf(key: str) -> tuple[str, str]:
    """(stem, normalized leaf); refuses LoHa/LoKr/DoRA/... leaves with the reason."""
    for pattern, kind in _NOT_LORA:
        if pattern.search(key):
            raise AdapterError(f"{key!r}: this is a {kind} adapter; {NOT_LORA_REASON}.")
    for suffix in _LEAF_ORDER:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], LEAVES[suffix]
    raise AdapterError(
        f"Unexpected key {key!r}: expected a LoRA tensor (lora_A/lora_B, lora_down/lora_up, alpha, "
        "or ComfyUI .diff/.diff_b)."
    )


def parse_key(key: str) -> ParsedKey:
    """One state-dict key of any supported layout -> where it goes."""
    stem, leaf = split_leaf(key)
    layout = "peft" if ".default." in key else "diffusers"
    if stem.startswith("lora_unet_"):
        return ParsedKey(TRANSFORMER, "mmdit", mmdit_from_underscored(stem[10:], key), leaf, "kohya")
    for component, prefix in KOHYA_TE.items():
        if stem.startswith(prefix):
            return ParsedKey(
                component, "te", _te_from_underscored(component, stem[len(prefix) :], key), leaf, "kohya"
            )
    if stem.startswith("lora_te_"):  # SD1-style single text encoder prefix: ComfyUI maps it to CLIP-L
        name = _te_from_underscored("text_encoder", stem[8:], key)
        return ParsedKey("text_encoder", "te", name, leaf, "kohya")
    if stem.startswith("lora_transformer_"):
        return ParsedKey(
            TRANSFORMER, "diffusers", diffusers_from_underscored(stem[17:], key), leaf, "onetrainer"
        )
    if stem.startswith("lycoris_"):
        return ParsedKey(TRANSFORMER, "diffusers", diffusers_from_underscored(stem[8:], key), leaf, "lycoris")
    if stem.startswith("diffusion_model."):
        return ParsedKey(TRANSFORMER, "mmdit", stem[16:], leaf, "comfyui")
    for component, prefix in COMFY_TE.items():
        if stem.startswith(prefix):
            return _te(component, stem[len(prefix) :], leaf, "comfyui", key)
    for component in TEXT_ENCODERS:
        if stem.startswith(component + "."):
            return _te(component, stem[len(component) + 1 :], leaf, layout, key)
    for prefix in ("transformer.", "base_model.model.", "unet."):
        if stem.startswith(prefix):
            return ParsedKey(TRANSFORMER, "diffusers", stem[len(prefix) :], leaf, layout)
    if stem.startswith(_DIFFUSERS_STEMS):
        return ParsedKey(TRANSFORMER, "diffusers", stem, leaf, layout)
    raise AdapterError(
        f"Unknown LoRA key {key!r}. sd35hub reads SD3 LoRAs in the diffusers/peft, kohya, ComfyUI, "
        "OneTrainer and LyCORIS (SimpleTuner) layouts: see docs/formats.md."
    )


def _te(component: str, name: str, leaf: str, layout: str, key: str) -> ParsedKey:
    if not te_module_known(component, name):
        raise AdapterError(f"{key!r} is not a known {TE_LABELS[component]} text-encoder linear layer.")
    return ParsedKey(component, "te", name, leaf, layout)


def te_key(component: str, name: str, fmt: str) -> str:
    """The stem of a text-encoder module in layout `fmt` (diffusers, kohya, comfyui)."""
    if fmt == "kohya":
        return KOHYA_TE[component] + name.replace(".", "_")
    if fmt == "comfyui":
        return COMFY_TE[component] + name
    return f"{component}.{name}"
