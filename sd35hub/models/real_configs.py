"""The component configs of the public SD3.5 diffusers repos, for planning and benchmarks offline.

    write_config_folder("large", Path("sd35-large-configs"))   # model_index.json + */config.json, no weights

Such a folder is a valid ``--model`` for ``sd35hub train --dry-run`` (the memory plan needs only the
configs); benchmarks/memory_journey.py instantiates random weights from the same dicts. The sizes are
those of stabilityai/stable-diffusion-3.5-{medium,large}: CLIP-L 12 x 768, CLIP-G 32 x 1280 (with
projections), T5-XXL encoder 24 x 4096 (d_ff 10240, 64 heads, gated-gelu), the 16-channel VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Public SD3.5 transformer configs (transformer/config.json of the Hub repos); sd35hub.bench times them.
SD35_CONFIGS: dict[str, dict[str, Any]] = {
    "large": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
    ),
    "medium": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
}


CLIP_L: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": 768,
    "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}  # fmt: skip
CLIP_G: dict[str, Any] = {**CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                          "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
T5_XXL: dict[str, Any] = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64,
    "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "vocab_size": 32128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
    "is_encoder_decoder": False, "use_cache": False, "pad_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
    "use_post_quant_conv": False, "force_upcast": True,
}  # fmt: skip
SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip


def config_dicts(variant: str) -> dict[str, dict[str, Any]]:
    """component folder -> config.json content, for variant "medium" or "large"."""
    transformer = {"_class_name": "SD3Transformer2DModel", **SD35_CONFIGS[variant]}
    if "dual_attention_layers" in transformer:
        transformer["dual_attention_layers"] = list(transformer["dual_attention_layers"])
    return {"text_encoder": dict(CLIP_L), "text_encoder_2": dict(CLIP_G), "text_encoder_3": dict(T5_XXL),
            "vae": dict(VAE), "transformer": transformer}  # fmt: skip


def write_config_folder(variant: str, folder: Path) -> Path:
    """A weights-free SD3.5 folder (configs only): enough for the memory plan and `train --dry-run`."""
    folder = Path(folder)
    for component, config in config_dicts(variant).items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        (folder / component / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
    return folder
