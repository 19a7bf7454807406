"""Which SD3 variant a checkpoint is, read from its configs (never from its name alone).

Public configs of the diffusers-format repos (transformer/config.json):

| variant            | num_layers | heads x dim | caption_projection_dim | pos_embed_max_size | qk_norm  | dual_attention_layers |
|--------------------|-----------:|------------:|-----------------------:|-------------------:|----------|-----------------------|
| sd3-medium         | 24         | 24 x 64     | 1536                   | 192                | none     | none                  |
| sd3.5-medium       | 24         | 24 x 64     | 1536                   | 384                | rms_norm | 0..12                 |
| sd3.5-large        | 38         | 38 x 64     | 2432                   | 192                | rms_norm | none                  |
| sd3.5-large-turbo  | identical to sd3.5-large                                                                        |

All share joint_attention_dim 4096 (T5-XXL), pooled_projection_dim 2048 (CLIP-L 768 + CLIP-G 1280),
16 latent channels, patch 2, sample_size 128 (1024 px).

Large Turbo is Large distilled with ADD: the transformer, VAE, text encoders and scheduler configs
are the same as Large's (we found no config-level field that differs), only the weights differ. So
`detect_variant` says "sd3.5-large-turbo" only when a *name* hint says so — the repo id the user
passed, or a `_name_or_path` recorded in the configs — and otherwise "sd3.5-large". Both train and
load the same way; the difference matters for defaults (turbo samples in ~4 steps, guidance 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3-medium", "tiny", "custom")
VAE_SCALE_FACTOR = 8  # pixels per latent (4 down blocks); every SD3 VAE

# Recommended sampling defaults per variant (from the model cards): steps, guidance scale.
SAMPLING_DEFAULTS: dict[str, tuple[int, float]] = {
    "sd3.5-large": (28, 3.5),
    "sd3.5-large-turbo": (4, 0.0),
    "sd3.5-medium": (40, 4.5),
    "sd3-medium": (28, 7.0),
    "tiny": (4, 4.5),
    "custom": (28, 4.5),
}


@dataclass(frozen=True)
class ModelInfo:
    """What sd35hub needs to know about a base model, from its configs alone (no weights)."""

    model_id: str  # what the user passed: Hub id, local folder, or "tiny"
    variant: str  # one of VARIANTS
    num_layers: int  # transformer blocks (transformer_blocks.0 .. num_layers-1)
    num_attention_heads: int
    attention_head_dim: int
    dual_attention_layers: tuple[int, ...] = field(default_factory=tuple)  # blocks with attn2
    qk_norm: str | None = None
    joint_attention_dim: int = 4096  # T5 width the context embedder takes
    caption_projection_dim: int = 1536  # transformer width (= heads x head_dim)
    pooled_projection_dim: int = 2048
    sample_size: int = 128  # latent side of the native resolution
    patch_size: int = 2
    pos_embed_max_size: int = 192  # in patches: the largest image side is this x patch x 8 px
    in_channels: int = 16  # latent channels
    has_t5: bool = True  # model_index lists a text_encoder_3
    revision: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def native_resolution(self) -> int:
        """Image side in pixels the model was trained at (1024 for every real SD3/SD3.5)."""
        return self.sample_size * VAE_SCALE_FACTOR

    @property
    def max_resolution(self) -> int:
        """Largest image side in pixels the positional embedding covers."""
        return self.pos_embed_max_size * self.patch_size * VAE_SCALE_FACTOR

    @property
    def default_steps(self) -> int:
        return SAMPLING_DEFAULTS[self.variant][0]

    @property
    def default_guidance_scale(self) -> float:
        return SAMPLING_DEFAULTS[self.variant][1]


def detect_variant(
    transformer_config: dict[str, Any],
    model_index: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    *,
    name_hint: str | None = None,
) -> str:
    """The variant from the transformer config (see the module docstring for the table).

    `name_hint` (the id the user passed) only separates Large Turbo from Large, which share every
    config; it never overrides the architecture: a folder named "...-large" holding a Medium
    transformer is "sd3.5-medium".
    """
    cls = transformer_config.get("_class_name", "SD3Transformer2DModel")
    if cls != "SD3Transformer2DModel":
        return "custom"
    if _is_tiny(transformer_config):
        return "tiny"
    layers = transformer_config.get("num_layers")
    heads = transformer_config.get("num_attention_heads")
    dual = tuple(transformer_config.get("dual_attention_layers") or ())
    qk_norm = transformer_config.get("qk_norm")
    real_widths = (
        transformer_config.get("attention_head_dim") == 64
        and transformer_config.get("joint_attention_dim", 4096) == 4096
        and transformer_config.get("pooled_projection_dim", 2048) == 2048
        and transformer_config.get("in_channels", 16) == 16
    )
    if not real_widths:
        return "custom"
    if layers == 38 and heads == 38 and qk_norm == "rms_norm" and not dual:
        hints = [name_hint, transformer_config.get("_name_or_path")]
        hints += [(model_index or {}).get("_name_or_path"), (scheduler_config or {}).get("_name_or_path")]
        if any(isinstance(h, str) and "turbo" in h.lower() for h in hints):
            return "sd3.5-large-turbo"
        return "sd3.5-large"
    if layers == 24 and heads == 24:
        if dual and qk_norm == "rms_norm":
            return "sd3.5-medium"
        if not dual and not qk_norm:
            return "sd3-medium"
    return "custom"


def _is_tiny(transformer_config: dict[str, Any]) -> bool:
    from sd35hub.models.tiny import TRANSFORMER_CONFIG  # stdlib-only module at import time

    for key, value in TRANSFORMER_CONFIG.items():
        seen = transformer_config.get(key)
        if isinstance(value, tuple):
            seen = tuple(seen or ())
        if seen != value:
            return False
    return True


def model_info_from_config(
    model_id: str,
    transformer_config: dict[str, Any],
    model_index: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    *,
    revision: str | None = None,
) -> ModelInfo:
    """ModelInfo from already-read config dicts (transformer/config.json, model_index.json ...)."""
    c = transformer_config
    text_encoder_3 = (model_index or {}).get("text_encoder_3", ["transformers", "T5EncoderModel"])
    heads = int(c.get("num_attention_heads", 18))
    head_dim = int(c.get("attention_head_dim", 64))
    return ModelInfo(
        model_id=model_id,
        variant=detect_variant(c, model_index, scheduler_config, name_hint=model_id),
        num_layers=int(c.get("num_layers", 18)),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        dual_attention_layers=tuple(int(i) for i in (c.get("dual_attention_layers") or ())),
        qk_norm=c.get("qk_norm"),
        joint_attention_dim=int(c.get("joint_attention_dim", 4096)),
        caption_projection_dim=int(c.get("caption_projection_dim", heads * head_dim)),
        pooled_projection_dim=int(c.get("pooled_projection_dim", 2048)),
        sample_size=int(c.get("sample_size", 128)),
        patch_size=int(c.get("patch_size", 2)),
        pos_embed_max_size=int(c.get("pos_embed_max_size") or c.get("sample_size", 128)),
        in_channels=int(c.get("in_channels", 16)),
        has_t5=bool(text_encoder_3 and text_encoder_3[0] is not None),
        revision=revision,
    )
