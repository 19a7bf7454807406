"""Small random CLIP and DINO encoders for the evaluation tests, saved with save_pretrained (no mocks)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_encoders(root: Path) -> tuple[Path, Path]:
    """(clip folder, dino folder): a 32-px CLIPModel with the tiny SD3.5 model's CLIP tokenizer and a
    32-px ViTModel, random weights (seeded), each with its processor."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from sd35hub.models.tiny import tiny_model_path

    clip_dir, dino_dir = root / "tiny-clip", root / "tiny-dino"
    if (clip_dir / "config.json").is_file() and (dino_dir / "config.json").is_file():
        return clip_dir, dino_dir
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model_path() / "tokenizer"))
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16))
    clip.save_pretrained(str(clip_dir))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(clip_dir))
    torch.manual_seed(1)
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(str(dino_dir))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(dino_dir))
    return clip_dir, dino_dir
