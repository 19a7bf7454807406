"""A diffusers folder with a FULL-SIZE random SD3.5 Medium/Large transformer and the real-config VAE,
for GPU runs of `sd35hub train` without downloading weights.

The text encoders keep the tiny model's tokenizers and vocabularies but get the real OUTPUT widths
(CLIP-L 768 + CLIP-G 1280 pooled = 2048, T5 d_model 4096) with one layer each, so prompt_embeds
[b, 154, 4096] and pooled_prompt_embeds [b, 2048] have the real shapes. Their memory is NOT the
real encoders' (T5-XXL alone is 9.4 GB in bf16): training-phase memory and speed are real, the
embedding-precompute phase is not.

usage: python benchmarks/random_model.py {medium,large} OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(variant: str, out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35hub.models.real_configs import SD35_CONFIGS
    from sd35hub.models.tiny import tiny_model_path

    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_model_path(), tmp)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**SD35_CONFIGS[variant])
        shutil.rmtree(tmp / "transformer")
        transformer.save_pretrained(tmp / "transformer", max_shard_size="10GB")
        del transformer
        for name, hidden in (("text_encoder", 768), ("text_encoder_2", 1280)):
            cfg = CLIPTextConfig.from_pretrained(tmp / name)
            cfg.hidden_size, cfg.projection_dim, cfg.intermediate_size = hidden, hidden, 4 * 64
            cfg.num_attention_heads, cfg.num_hidden_layers = hidden // 64, 1
            model = CLIPTextModelWithProjection(cfg)
            shutil.rmtree(tmp / name)
            model.save_pretrained(tmp / name)
        cfg = T5Config.from_pretrained(tmp / "text_encoder_3")
        cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers = 4096, 256, 8, 64, 1
        model = T5EncoderModel(cfg)
        shutil.rmtree(tmp / "text_encoder_3")
        model.save_pretrained(tmp / "text_encoder_3")
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, shift_factor=0.0609, scaling_factor=1.5305,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        shutil.rmtree(tmp / "vae")
        vae.save_pretrained(tmp / "vae")
    finally:
        torch.set_default_dtype(previous)
    (tmp / "sd35hub_tiny.json").unlink(missing_ok=True)
    (tmp / "random_full_size.json").write_text(json.dumps({"variant": variant}))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1], Path(sys.argv[2])))
