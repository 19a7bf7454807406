"""Masked loss: masks from *.mask.png or alpha, cropped with their image, cached on the latent grid; a
masked-out pixel gets exactly zero gradient; the preview shows the mask; training with masks learns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35hub.config import Config, DataSpec, LoraSpec, ModelSpec, TrainSpec, load_config
from sd35hub.data.buckets import BucketBatcher, bucket_set
from sd35hub.data.masks import latent_mask, pixel_weights
from sd35hub.data.sources import open_samples
from sd35hub.errors import ConfigError
from sd35hub.train.flow import flow_loss


class _Echo(torch.nn.Module):
    """A 'transformer' whose prediction is a free parameter: d loss / d prediction is its .grad."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.pred = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, hidden_states, **_: object):
        return (self.pred,)


def _inputs(b: int = 2, h: int = 8, w: int = 8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 16, h, w, generator=g), torch.randn(b, 4, 8, generator=g), torch.randn(b, 8, generator=g),
            torch.randn(b, 16, h, w, generator=g), torch.tensor([0.3, 0.8]))


def test_masked_out_pixels_get_exactly_zero_gradient_and_the_rest_is_a_weighted_mean():
    latents, pe, pooled, noise, sigmas = _inputs()
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :3] = 0.0  # left 3 columns ignored
    mask[1, :, 0, 5] = 0.5
    model = _Echo(tuple(latents.shape))
    loss = flow_loss(model, latents, pe, pooled, noise, sigmas, pixel_weights=pixel_weights(mask, 0.0))
    loss.backward()
    grad = model.pred.grad
    assert torch.count_nonzero(grad[:, :, :, :3]) == 0  # exactly zero, not small
    assert (grad[:, :, :, 3:] != 0).all()
    err = (model.pred.detach() - (noise - latents)) ** 2
    expected = torch.stack([(err[i] * mask[i]).sum() / (mask[i].sum() * 16) for i in range(2)]).mean()
    torch.testing.assert_close(loss.detach(), expected)
    # what the masked-out region's target is does not matter at all
    noise2 = noise.clone()
    noise2[:, :, :, :3] = 100.0
    assert flow_loss(model, latents, pe, pooled, noise2, sigmas, pixel_weights=mask).item() == loss.item()
    # an all-ones mask is the plain loss; unmasked_weight=1 turns the mask off
    plain = flow_loss(model, latents, pe, pooled, noise, sigmas)
    torch.testing.assert_close(flow_loss(model, latents, pe, pooled, noise, sigmas, pixel_weights=torch.ones(2, 1, 8, 8)), plain)
    torch.testing.assert_close(flow_loss(model, latents, pe, pooled, noise, sigmas, pixel_weights=pixel_weights(mask, 1.0)), plain)


def test_real_transformer_output_gets_no_gradient_in_the_masked_out_region():
    from diffusers import SD3Transformer2DModel

    from sd35hub.models.tiny import tiny_model_path

    model = SD3Transformer2DModel.from_pretrained(str(tiny_model_path()), subfolder="transformer")
    outputs: list[torch.Tensor] = []

    def keep(module, args, kwargs, out):
        out[0].retain_grad()
        outputs.append(out[0])

    model.register_forward_hook(keep, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    pe, pooled = torch.randn(2, 12, 64, generator=g), torch.randn(2, 64, generator=g)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, 4:, :] = 0.0
    flow_loss(model, latents, pe, pooled, noise, torch.tensor([0.4, 0.6]), pixel_weights=mask).backward()
    grad = outputs[0].grad
    assert torch.count_nonzero(grad[:, :, 4:, :]) == 0 and (grad[:, :, :4, :] != 0).all()


def _half_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


@pytest.fixture
def masked_folder(tmp_path) -> Path:
    from sd35hub.data.sample import sample_dataset_path

    folder = tmp_path / "data"
    folder.mkdir()
    for i, png in enumerate(sorted(sample_dataset_path().glob("*.png"))[:8]):
        shutil.copy(png, folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder / f"{png.stem}.txt")
        if i < 6:
            _half_mask(Image.open(png).size).save(folder / f"{png.stem}.mask.png")
    # one RGBA image: its alpha is the mask
    rgba = Image.new("RGBA", (480, 320), (200, 50, 50, 255))  # transparent half: composited on white
    rgba.putalpha(_half_mask((480, 320)))
    rgba.save(folder / "zz_alpha.png")
    return folder


def test_masks_are_found_cropped_with_their_image_and_hash_into_the_cache_key(masked_folder):
    spec = DataSpec(source=str(masked_folder), masked_loss=True, resolution=64, min_size=64)
    stream = open_samples(spec)
    samples = list(stream)
    assert len(samples) == 9  # *.mask.png are not training images
    assert stream.stats.fixed["no_mask"] == 2
    with_mask = [s for s in samples if s.mask is not None]
    assert len(with_mask) == 7 and all(s.mask.size == s.image.size for s in with_mask)
    plain = {s.key: s.content_hash for s in open_samples(DataSpec(source=str(masked_folder), resolution=64, min_size=64))}
    assert all(plain[s.key] != s.content_hash for s in with_mask)  # a changed mask is encoded again
    assert all(plain[s.key] == s.content_hash for s in samples if s.mask is None)
    # random crops: the mask goes through the same geometry as the image (alpha image: left half opaque)
    spec = DataSpec(source=str(masked_folder), masked_loss=True, resolution=64, min_size=64, crop="random")
    for batch in BucketBatcher(open_samples(spec), bucket_set(64), batch_size=1, seed=3, crop="random"):
        assert (batch.masks is None) == batch.keys[0].startswith(("006_", "007_"))
        if batch.keys == ["zz_alpha.png"]:  # 96x64 after resizing, then a random 64-wide window
            m, red = batch.masks[0, 0], batch.pixel_values[0, 1] < 0  # red where opaque, white elsewhere
            assert 0.0 < m.mean() < 1.0
            sharp = (m > 0.95) | (m < 0.05)
            assert torch.equal((m > 0.5)[sharp], red[sharp]) and sharp.float().mean() > 0.9
    lm = latent_mask(torch.ones(1, 1, 64, 64), (8, 8), 1)
    assert lm.shape == (1, 1, 8, 8)


def test_masked_loss_config_is_validated():
    with pytest.raises(ConfigError, match="unmasked_weight"):
        load_config(None, ["data.unmasked_weight=1.5"])


def test_preview_shows_the_mask(masked_folder, tmp_path):
    from sd35hub.data.preview import preview_grid

    plain = preview_grid(DataSpec(source=str(masked_folder), resolution=64, min_size=64), n=1, out=tmp_path / "a.png")
    masked = preview_grid(DataSpec(source=str(masked_folder), resolution=64, min_size=64, masked_loss=True), n=1,
                          out=tmp_path / "b.png")
    a, b = np.asarray(Image.open(plain.out)).astype(int), np.asarray(Image.open(masked.out)).astype(int)
    # the 64 px sample sits at (100, 100) of its 264 px tile; its mask keeps the left half
    left, right = (slice(104, 160), slice(102, 128)), (slice(104, 160), slice(136, 162))
    assert np.abs(a[left] - b[left]).max() == 0  # kept half unchanged
    assert np.abs(a[right] - b[right]).mean() > 20  # ignored half tinted


@pytest.mark.slow
def test_masked_training_learns_and_caches_masks(masked_folder, tmp_path):
    from sd35hub.data.cache import CacheIndex
    from sd35hub.train import recipe

    def config(out: str, unmasked: float) -> Config:
        return Config(
            model=ModelSpec(name="tiny"),
            data=DataSpec(source=str(masked_folder), resolution=64, min_size=64, holdout=2, masked_loss=True,
                          unmasked_weight=unmasked, cache_dir=str(tmp_path / "cache"), trigger_word="nrt style"),
            lora=LoraSpec(rank=4, alpha=8.0),
            train=TrainSpec(output_dir=str(tmp_path / out), max_steps=16, batch_size=2, learning_rate=2e-3,
                            validation_steps=1, checkpoint_every=0, log_every=4, seed=7),
        )

    result = recipe.train(config("run", 0.0), log=lambda s: None, progress=False)
    assert result.validation_loss < result.initial_validation_loss
    index = CacheIndex.load(tmp_path / "cache")
    assert index.settings["masked_loss"] is True
    from sd35hub.data.cache_index import CachedBatches

    batch = CachedBatches(index, batch_size=9).load(CachedBatches(index, batch_size=9).epoch_batches(0)[0])
    assert batch["mask"].shape[1:] == (1, *batch["latents_mean"].shape[-2:])
    assert 0.0 <= batch["mask"].min() < 0.5 < batch["mask"].max() <= 1.0
    # unmasked_weight is loss math only: the cache is reused as it is
    again = recipe.train(config("again", 0.2).replace(train=config("again", 0.2).train.__class__(
        output_dir=str(tmp_path / "again"), max_steps=1, batch_size=2, validation_steps=1, checkpoint_every=0)),
        log=lambda s: None, progress=False)
    assert CacheIndex.load(tmp_path / "cache").encoded == 0 and again.steps == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 16
