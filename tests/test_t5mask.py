"""data.mask_t5_padding: T5 padding embeddings are zero in the cache, validation prompts and generation;
the real tokens' embeddings are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lora_helpers import tiny_pipe
from PIL import Image

from sd35hub.models.t5mask import install_t5_padding_mask


def _t5_part(pipe, prompts, length=16):
    embeds, _, _, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                         do_classifier_free_guidance=False, max_sequence_length=length)
    return embeds[:, -length:]  # [CLIP 77 | T5 length]


def test_padding_positions_are_zero_and_real_tokens_unchanged(tmp_path):
    pipe = tiny_pipe()
    prompts = ["a red circle", "a blue square on a green background"]
    plain = _t5_part(pipe, prompts)
    install_t5_padding_mask(install_t5_padding_mask(pipe))  # idempotent
    masked = _t5_part(pipe, prompts)
    keep = pipe.tokenizer_3(prompts, padding="max_length", max_length=16, truncation=True,
                            return_tensors="pt").attention_mask.bool()
    assert (~keep).any() and keep.any()
    assert torch.count_nonzero(masked[~keep]) == 0 and plain[~keep].abs().max() > 0
    torch.testing.assert_close(masked[keep], plain[keep], rtol=0, atol=0)


def test_cache_and_validation_see_the_same_masked_embeddings(tmp_path):
    from sd35hub.config import DataSpec
    from sd35hub.data.cache import CachedBatches, build_cache
    from sd35hub.train import validation

    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (96, 96), (200, 20, 20)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    spec = DataSpec(source=str(folder), resolution=64, min_size=64, mask_t5_padding=True, max_sequence_length=16)
    pipe = tiny_pipe()
    index = build_cache(spec, pipe, tmp_path / "cache", model_id="tiny", batch_size=1, device="cpu",
                        dtype=torch.float32, seed=0, progress=False)
    assert index.settings["mask_t5_padding"] is True
    batches = CachedBatches(index, batch_size=1)
    cached = batches.load(batches.epoch_batches(0)[0])["prompt_embeds"]
    shown = validation.encode_prompts(pipe, ["a red square"], guidance=1.0, max_sequence_length=16, device="cpu")
    torch.testing.assert_close(cached, shown.embeds["prompt_embeds"], rtol=0, atol=0)
    assert torch.count_nonzero(cached[0, -1]) == 0  # the last T5 position is padding


def test_generate_flag_masks_and_is_recorded(tmp_path: Path):
    from sd35hub.blend.request import diffusers_snippet
    from sd35hub.frontends.cli import main
    from sd35hub.pngmeta import read_png_params

    tiny = ["--model", "tiny", "--steps", "2", "--width", "64", "--height", "64", "--cfg", "4.5", "--prompt", "a fox"]
    main(["generate", *tiny, "--output", str(tmp_path / "a")])
    main(["generate", *tiny, "--mask-t5-padding", "--output", str(tmp_path / "b")])
    a, b = (next((tmp_path / d).glob("*.png")) for d in "ab")
    assert np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max() > 0
    params = read_png_params(b)["sd35hub"]
    assert params["mask_t5_padding"] is True and "install_t5_padding_mask(pipe)" in diffusers_snippet(params)


def test_phased_encoders_mask_the_same_way(tmp_path):
    """The trainer's default path (each encoder loaded alone) zeroes the same positions as a pipeline."""
    from sd35hub.config import DataSpec
    from sd35hub.data.cache import CachedBatches, build_cache
    from sd35hub.data.encode import PhasedEncoders

    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (96, 96), (20, 200, 20)).save(folder / "a.png")
    (folder / "a.txt").write_text("a green square")
    spec = DataSpec(source=str(folder), resolution=64, min_size=64, mask_t5_padding=True, max_sequence_length=16)
    loaded = []
    for name, encoders in (("pipe", tiny_pipe()),
                           ("phased", PhasedEncoders("tiny", device="cpu", dtype=torch.float32, max_sequence_length=16,
                                                     joint_attention_dim=tiny_pipe().transformer.config.joint_attention_dim))):
        index = build_cache(spec, encoders, tmp_path / name, model_id="tiny", batch_size=1, device="cpu",
                            dtype=torch.float32, seed=0, progress=False)
        batches = CachedBatches(index, batch_size=1)
        loaded.append(batches.load(batches.epoch_batches(0)[0])["prompt_embeds"])
    torch.testing.assert_close(loaded[1], loaded[0], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(loaded[1][0, -1]) == 0
