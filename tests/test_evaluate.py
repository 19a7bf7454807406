"""Subject-fidelity evaluation (#18 part 7): CLIP-T, CLIP-I and DINO with small random transformers
encoders (saved with save_pretrained, or served by the local Hub), `sd35hub eval RUN` and train.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fidelity_helpers import build_tiny_encoders
from PIL import Image

from sd35hub.models.fidelity import clip_text_for, load_encoders, score


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_encoders(tmp_path_factory.mktemp("encoders"))


def _pictures(n: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def test_scores_are_the_cosines_clipmodel_and_vitmodel_compute(encoder_dirs):
    """CLIP-T = CLIPModel's logits_per_image / logit_scale; CLIP-I and DINO = mean pairwise cosine."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    clip_dir, dino_dir = encoder_dirs
    encoders = load_encoders(str(clip_dir), str(dino_dir))
    generated, instance = _pictures(3, seed=1), _pictures(2, seed=2)
    report = score(encoders, [("a red fox in the snow", generated)], instance)
    entry = report.prompts[0]

    clip, processor = CLIPModel.from_pretrained(str(clip_dir)).eval(), CLIPProcessor.from_pretrained(str(clip_dir))
    with torch.no_grad():
        out = clip(**processor(text=["a red fox in the snow"], images=generated, return_tensors="pt", padding=True))
        clip_t = (out.logits_per_image[:, 0] / clip.logit_scale.exp()).mean()
        real = clip(**processor(text=["x"], images=instance, return_tensors="pt", padding=True)).image_embeds
        clip_i = (out.image_embeds @ real.T).mean()
    vit, vit_processor = ViTModel.from_pretrained(str(dino_dir), add_pooling_layer=False).eval(), \
        AutoImageProcessor.from_pretrained(str(dino_dir))
    with torch.no_grad():
        cls_gen = vit(**vit_processor(images=generated, return_tensors="pt")).last_hidden_state[:, 0]
        cls_real = vit(**vit_processor(images=instance, return_tensors="pt")).last_hidden_state[:, 0]
    dino = torch.nn.functional.cosine_similarity(cls_gen[:, None], cls_real[None], dim=-1).mean()

    assert entry.images == 3 and report.instance_images == 2
    assert entry.clip_t == pytest.approx(float(clip_t), abs=1e-5)
    assert entry.clip_i == pytest.approx(float(clip_i), abs=1e-5)
    assert entry.dino == pytest.approx(float(dino), abs=1e-5)
    # an image compared with itself: CLIP-I and DINO exactly 1
    same = score(encoders, [("p", instance[:1])], instance[:1]).prompts[0]
    assert same.clip_i == pytest.approx(1.0, abs=1e-5) and same.dino == pytest.approx(1.0, abs=1e-5)
    # the mean is over prompts; without instance images only CLIP-T
    two = score(encoders, [("a", generated[:1]), ("b", generated[1:])], [])
    assert two.mean["clip_t"] == pytest.approx((two.prompts[0].clip_t + two.prompts[1].clip_t) / 2)
    assert two.mean["clip_i"] is None and two.prompts[0].dino is None


def test_trigger_word_replacement_for_clip_t():
    assert clip_text_for("a photo of sks dog on a beach", "sks dog", "dog") == "a photo of dog on a beach"
    assert clip_text_for("a photo of sks dog", "sks dog", None) == "a photo of sks dog"
    assert clip_text_for("a photo", None, "dog") == "a photo"


def test_encoders_load_by_hub_id_from_the_hub(hub, encoder_dirs):
    from hub_tokens import HUB_ORG
    from huggingface_hub import HfApi

    from sd35hub.errors import RepoNotFoundError

    api = HfApi()
    ids = []
    for folder in encoder_dirs:
        repo = f"{HUB_ORG}/eval-{folder.name}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        ids.append(repo)
    from_hub = load_encoders(*ids)
    local = load_encoders(*(str(f) for f in encoder_dirs))
    images = _pictures(2, seed=3)
    assert score(from_hub, [("a cat", images)], images).to_dict()["mean"] == \
        pytest.approx(score(local, [("a cat", images)], images).to_dict()["mean"])
    assert from_hub.clip_model == ids[0]
    with pytest.raises(RepoNotFoundError):
        load_encoders(f"{HUB_ORG}/no-such-clip", ids[1])


def test_a_folder_that_is_not_a_model_is_a_model_load_error(tmp_path, encoder_dirs):
    from sd35hub.errors import ModelLoadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="CLIP model"):
        load_encoders(str(tmp_path / "empty"), str(encoder_dirs[1]))


@pytest.mark.slow
def test_train_evaluate_then_sd35hub_eval_run(tmp_path, encoder_dirs):
    """train.evaluate scores the final validation images (summary, card, eval/); `sd35hub eval RUN` renders
    N images per prompt with the adapter and writes per-prompt and mean numbers, a JSON and a grid."""
    from test_train_recipe import tiny_config

    from sd35hub.frontends.cli import main
    from sd35hub.train import recipe

    clip_dir, dino_dir = (str(p) for p in encoder_dirs)
    out = tmp_path / "run"
    cfg = tiny_config(out, tmp_path / "cache", max_steps=4)
    import dataclasses

    cfg = cfg.replace(train=dataclasses.replace(cfg.train, evaluate=True, eval_clip_model=clip_dir,
                                                eval_dino_model=dino_dir))
    result = recipe.train(cfg, log=lambda s: None, progress=False)
    fidelity = result.summary["fidelity"]
    assert set(fidelity["mean"]) == {"clip_t", "clip_i", "dino"}
    assert all(isinstance(v, float) for v in fidelity["mean"].values())
    assert len(fidelity["prompts"]) == len(result.summary["validation_images"])
    assert (out / "eval" / "eval.json").is_file() and (out / "eval" / "grid.png").is_file()
    assert json.loads((out / "summary.json").read_text())["fidelity"]["mean"] == fidelity["mean"]
    assert "subject fidelity" in (out / "README.md").read_text() and "CLIP-T" in (out / "README.md").read_text()

    code = main(["eval", str(out), "--images-per-prompt", "2", "--steps", "2", "--prompt", "nrt style, a fox",
                 "--prompt", "nrt style, a house", "--clip-model", clip_dir, "--dino-model", dino_dir,
                 "--output", str(tmp_path / "ev")])
    assert code in (0, None)
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [p["prompt"] for p in data["prompts"]] == ["nrt style, a fox", "nrt style, a house"]
    assert all(p["images"] == 2 and len(p["files"]) == 2 for p in data["prompts"])
    assert data["instance_images"] == 10 and data["settings"]["steps"] == 2
    assert data["mean"]["clip_t"] == pytest.approx(sum(p["clip_t"] for p in data["prompts"]) / 2)
    grid = Image.open(tmp_path / "ev" / "grid.png")
    assert grid.width == 2 * 256 and grid.height > 3 * 256  # instance row + 2 prompt rows
    for p in data["prompts"]:
        for name in p["files"]:
            assert Image.open(tmp_path / "ev" / name).size == (64, 64)


@pytest.mark.slow
def test_a_failing_evaluation_never_loses_the_trained_run(tmp_path, encoder_dirs):
    """An encoder that cannot be loaded: the adapter, summary.json and card are still written; the summary
    says why there are no numbers."""
    import dataclasses

    from test_train_recipe import tiny_config

    from sd35hub.train import recipe

    (tmp_path / "not-a-model").mkdir()
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", max_steps=2)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, evaluate=True, eval_clip_model=str(tmp_path / "not-a-model"),
                                                eval_dino_model=str(encoder_dirs[1])))
    logs: list[str] = []
    result = recipe.train(cfg, log=logs.append, progress=False)
    assert "CLIP model" in result.summary["fidelity"]["error"]
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "README.md").is_file() and "subject fidelity" not in (tmp_path / "run" / "README.md").read_text()
    assert any("subject fidelity not measured" in line for line in logs)
