"""A small but real training output folder (the layout `sd35hub train` writes), for card and publish tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd35hub.run_summary import LoraSummary, RunSummary, ValidationImage

BASE_MODEL = "stabilityai/stable-diffusion-3.5-medium"


def make_training_output(root: Path, **summary_overrides: Any) -> Path:
    """Write OUTPUT/ with a real safetensors adapter, sample PNGs, loss plot, config, summary and junk
    that must never be published (checkpoints, optimizer state, cache, logs)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter").mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=generator),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
    }
    save_file(tensors, str(root / "adapter" / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    (root / "samples").mkdir(exist_ok=True)
    for index, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (16, 16), color).save(root / "samples" / f"val_{index}.png")
    Image.new("RGB", (32, 16), (255, 255, 255)).save(root / "loss.png")
    (root / "training_config.yaml").write_text(
        "model:\n  base: stabilityai/stable-diffusion-3.5-medium\n"
        "data:\n  source: /home/alice/private/photos\n  cache_dir: /tmp/sd35hub-cache\n"
        "hub:\n  repo_id: alice/my-lora\n  token: hf_shouldneverbepublished123\n"
        "train:\n  lr: 0.0001\n  output_dir: C:\\Users\\alice\\out\n",
        encoding="utf-8",
    )
    summary = RunSummary(
        base_model=BASE_MODEL,
        variant="sd3.5-medium",
        adapter_file="adapter/pytorch_lora_weights.safetensors",
        trigger_word="sks style",
        dataset="lambdalabs/naruto-blip-captions",
        steps=500,
        epochs=10.0,
        samples_seen=2000,
        final_loss=0.1234,
        validation_loss=0.2,
        initial_validation_loss=0.31,
        resolution_buckets=[(1024, 1024), (1216, 832)],
        skipped={"corrupt image": 2, "empty caption": 1},
        validation_images=[
            ValidationImage(path="samples/val_0.png", prompt="sks style, a red fox"),
            ValidationImage(path="samples/val_1.png", prompt="sks style, a blue | lake"),
        ],
        loss_plot="loss.png",
        precision="bf16",
        quantization=None,
        seed=42,
        lora=LoraSummary(rank=16, alpha=16.0, targets=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.0),
        learning_rate=1e-4,
        optimizer="adamw",
        batch_size=1,
        gradient_accumulation=4,
        duration_s=900.0,
        peak_memory_gib=12.5,
        sd35hub_version="0.1.0",
    )
    if summary_overrides:  # JSON values, checked like any summary.json
        summary = RunSummary.from_dict({**summary.to_dict(), **summary_overrides})
    summary.write(root)
    for junk in ("checkpoints/step-100/optimizer.safetensors", "checkpoint-200/adapter.safetensors",
                 "cache/latents/abc.safetensors", "logs/events.out.tfevents.1", "logs/train.log"):
        path = root / junk
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"never upload me")
    return root
