"""Model card: Hub metadata that validates and round-trips, body facts, tolerance of partial summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData
from training_output import BASE_MODEL, make_training_output

from sd35hub.errors import ConfigError
from sd35hub.hub.card import CardInfo, build_model_card, repo_image_path, variant_from_base, write_model_card


@pytest.fixture()
def output_dir(tmp_path: Path) -> Path:
    return make_training_output(tmp_path / "out")


def test_card_metadata_round_trips_through_model_card_load(output_dir: Path) -> None:
    path = write_model_card(output_dir, repo_id="alice/naruto-style")
    card = ModelCard.load(path)  # parses YAML front matter into ModelCardData
    assert isinstance(card.data, ModelCardData)
    data = card.data.to_dict()
    assert data["base_model"] == BASE_MODEL
    assert data["base_model_relation"] == "adapter"
    assert data["license"] == "other"
    assert data["license_name"] == "stabilityai-ai-community"
    assert data["license_link"] == f"https://huggingface.co/{BASE_MODEL}/blob/main/LICENSE.md"
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image"
    assert {"lora", "diffusers", "text-to-image", "sd3.5", "sd3.5-medium", "template:sd-lora"} <= set(data["tags"])
    assert not {"sd3", "SD3", "sd3.5-large"} & set(data["tags"])
    assert data["instance_prompt"] == "sks style"
    assert data["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert data["widget"] == [
        {"text": "sks style, a red fox", "output": {"url": "images/val_0.png"}},
        {"text": "sks style, a blue | lake", "output": {"url": "images/val_1.png"}},
    ]
    # Re-serialising the loaded card gives the same metadata: nothing is lost in the YAML round trip.
    assert ModelCard(str(card)).data.to_dict() == data


def test_card_body_has_snippet_settings_losses_license_and_skips(output_dir: Path) -> None:
    text = str(build_model_card(CardInfo.from_output_dir(output_dir), repo_id="alice/naruto-style"))
    body = text.split("\n---\n", 1)[1]
    assert f'StableDiffusion3Pipeline.from_pretrained("{BASE_MODEL}", dtype=torch.bfloat16)' in body
    assert (
        'pipe.load_lora_weights("alice/naruto-style", weight_name="pytorch_lora_weights.safetensors", '
        'adapter_name="naruto_style")' in body
    )
    assert 'pipe.set_adapters(["naruto_style"], [1.0])' in body
    for row in ("| LoRA rank | 16 |", "| LoRA alpha | 16 |", "| steps | 500 |", "| learning rate | 0.0001 |",
                "| precision | bf16 |", "| seed | 42 |", "`1024×1024`, `1216×832`", "`to_out.0`",
                "| final training loss | 0.1234 |", "| validation loss after training | 0.2 |",
                "| corrupt image | 2 |", "| empty caption | 1 |"):
        assert row in body, row
    assert "![training loss](images/loss.png)" in body
    assert "![sample 1](images/val_0.png)" in body
    assert "(https://huggingface.co/datasets/lambdalabs/naruto-blip-captions)" in body
    assert "USD 1M" in body and "https://stability.ai/community-license-agreement" in body
    assert "Enterprise" in body
    assert f"A LoRA adapter for [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL})" in body


def test_snippet_compiles(output_dir: Path) -> None:
    text = str(build_model_card(CardInfo.from_output_dir(output_dir), repo_id="alice/x"))
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "card-snippet", "exec")


def test_local_card_links_files_next_to_it(output_dir: Path) -> None:
    text = write_model_card(output_dir).read_text(encoding="utf-8")
    assert "](samples/val_0.png)" in text and "](loss.png)" in text
    assert 'load_lora_weights("adapter", weight_name="pytorch_lora_weights.safetensors"' in text
    for link in ("samples/val_0.png", "samples/val_1.png", "loss.png", "adapter/pytorch_lora_weights.safetensors"):
        assert (output_dir / link).is_file()


@pytest.mark.parametrize(
    ("base", "variant", "expected_tags", "steps"),
    [
        ("stabilityai/stable-diffusion-3.5-large", None, {"sd3.5-large"}, 28),
        ("stabilityai/stable-diffusion-3.5-large-turbo", None, {"sd3.5-large", "sd3.5-large-turbo"}, 4),
        ("someone/finetune-of-medium", "sd3.5-medium", {"sd3.5-medium"}, 40),  # Medium samples with 40 steps
    ],
)
def test_variant_tags_and_sampler_defaults(
    tmp_path: Path, base: str, variant: str | None, expected_tags: set[str], steps: int
) -> None:
    out = make_training_output(tmp_path / "o", base_model=base, variant=variant)
    card = ModelCard(str(build_model_card(CardInfo.from_output_dir(out), repo_id="alice/x")))
    tags = set(card.data.tags)
    assert expected_tags <= tags and "sd3" not in tags
    assert {"sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"} & tags == expected_tags
    assert f"num_inference_steps={steps}" in card.text
    assert card.data.license_link == f"https://huggingface.co/{base}/blob/main/LICENSE.md"


def test_minimal_summary_and_missing_files_give_a_valid_card_without_dead_links(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({
        "base_model": "stabilityai/stable-diffusion-3.5-large",
        "dataset": "/home/alice/private/photos",  # a local path: never linked nor put in metadata
        "validation_images": [{"path": "samples/gone.png", "prompt": "p"}],
    }))
    card = ModelCard(str(build_model_card(CardInfo.from_output_dir(out), repo_id="alice/x")))
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-large"
    assert card.data.datasets is None and "/home/alice" not in str(card)
    assert "gone.png" not in str(card) and "loss.png" not in str(card)
    assert card.data.get("instance_prompt") is None and card.data.get("widget") is None
    assert "a local dataset" in card.text


def test_non_hub_base_is_named_not_linked(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"base_model": "tiny", "variant": "tiny"}))
    card = ModelCard(str(build_model_card(CardInfo.from_output_dir(out), repo_id=None)))
    assert card.data.base_model is None  # no Hub relation claimed for a local model
    assert card.data.license_link == "https://stability.ai/community-license-agreement"
    # #15.13: the demo's card had the title "the tiny ... of sd35hub LoRA", a blank "derivative of",
    # and a snippet from_pretrained("tiny") that cannot run
    text = card.text
    assert text.lstrip().startswith("# sd35hub tiny-model demo LoRA")
    assert "A LoRA adapter for the embedded tiny SD3.5-architecture test model of sd35hub" in text
    assert "derivative of  " not in text and "derivative of and" not in text and "[](" not in text
    assert "random weights, not\nStable Diffusion 3.5" in text or "not\nStable Diffusion 3.5" in text
    assert 'from_pretrained("tiny")' not in text and "from_pretrained(tiny_model_path())" in text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "snippet", "exec")


def test_output_dir_without_summary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="summary.json"):
        CardInfo.from_output_dir(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CardInfo.from_output_dir(tmp_path)


def test_helpers() -> None:
    assert repo_image_path("samples/val_0.png") == "images/val_0.png"
    assert repo_image_path("samples/step_10/grid.png") == "images/step_10/grid.png"
    assert repo_image_path("loss.png") == "images/loss.png"
    assert variant_from_base("stabilityai/stable-diffusion-3.5-medium") == "sd3.5-medium"
    assert variant_from_base("stabilityai/stable-diffusion-3-medium-diffusers") is None


@pytest.mark.parametrize("on,label", [("training", "validation loss (training samples, fixed noise) after training"),
                                      ("held-out", "validation loss (2 held-out samples) after training")])
def test_card_says_what_the_validation_loss_was_computed_on(tmp_path: Path, on: str, label: str) -> None:
    out = make_training_output(tmp_path / "o", validation_loss_on=on, held_out=2 if on == "held-out" else 0)
    card = build_model_card(CardInfo.from_output_dir(out), repo_id="alice/x")
    assert f"| {label} | 0.2 |" in str(card)


def _local_run(tmp_path: Path, base: str) -> Path:
    out = make_training_output(tmp_path / "o", base_model=base, variant="sd3.5-medium")
    return out


def test_a_local_base_is_never_published_and_its_hub_id_is_asked_for(tmp_path: Path) -> None:
    """#15.12: a run on --model /some/folder published the path in the card text and snippet, a blank
    license sentence, the Hub's home page as base link, and no base_model."""
    from sd35hub.hub.card import LOCAL_BASE

    out = _local_run(tmp_path, LOCAL_BASE)
    local = str(build_model_card(CardInfo.from_output_dir(out), repo_id=None))
    assert "a local copy of a Stable Diffusion 3.5 model" in local and "PATH/TO/BASE" in local
    with pytest.raises(ConfigError, match="--base-model-id"):
        build_model_card(CardInfo.from_output_dir(out), repo_id="alice/x")
    card = ModelCard(str(build_model_card(CardInfo.from_output_dir(out, base_model_id=BASE_MODEL), repo_id="alice/x")))
    assert card.data.base_model == BASE_MODEL and card.data.base_model_relation == "adapter"
    assert card.data.license_link == f"https://huggingface.co/{BASE_MODEL}/blob/main/LICENSE.md"
    assert f"derivative of [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL})" in card.text
    assert f"[base model page](https://huggingface.co/{BASE_MODEL})" in card.text
    assert f'from_pretrained("{BASE_MODEL}"' in card.text
    with pytest.raises(ConfigError, match="not a Hub id"):
        CardInfo.from_output_dir(out, base_model_id="/home/alice/sd35")


def test_a_local_folder_resolves_to_the_hub_repo_it_came_from(tmp_path: Path) -> None:
    from sd35hub.hub.card import LOCAL_BASE, base_model_hub_id, public_base_name

    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-3.5-large" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    assert base_model_hub_id(str(snapshot)) == "stabilityai/stable-diffusion-3.5-large"
    saved = tmp_path / "saved"
    (saved / "transformer").mkdir(parents=True)
    (saved / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (saved / "transformer" / "config.json").write_text(json.dumps({"_name_or_path": "stabilityai/stable-diffusion-3.5-medium"}))
    assert base_model_hub_id(str(saved)) == "stabilityai/stable-diffusion-3.5-medium"
    unknown = tmp_path / "mine"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_name_or_path": "/home/alice/sd35"}))
    assert base_model_hub_id(str(unknown)) is None and public_base_name(str(unknown)) == LOCAL_BASE
    assert base_model_hub_id(str(unknown), "me/my-sd35") == "me/my-sd35"
    assert public_base_name("tiny") == "tiny" and base_model_hub_id("tiny") is None
    assert public_base_name(BASE_MODEL) == BASE_MODEL


def test_publishing_with_base_model_id_fixes_the_adapter_header(tmp_path: Path) -> None:
    from safetensors import safe_open

    from sd35hub.hub.card import LOCAL_BASE
    from sd35hub.hub.publish import plan_publication

    out = _local_run(tmp_path, LOCAL_BASE)
    files, card = plan_publication(out, "alice/x", base_model_id=BASE_MODEL)
    adapter = next(f for f in files if f.path_in_repo == "pytorch_lora_weights.safetensors")
    (tmp_path / "a.safetensors").write_bytes(adapter.content)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["sd35hub"])["base_model"] == BASE_MODEL
        assert len(list(handle.keys())) == 2
    assert str(tmp_path) not in card and LOCAL_BASE not in card


@pytest.mark.parametrize("of,label", [("gpu", "peak GPU memory"), ("host", "peak host memory (no GPU)")])
def test_card_labels_peak_memory_by_what_was_measured(tmp_path: Path, of: str, label: str) -> None:
    """#15 item 5: a CPU run's peak resident set was labelled "peak GPU memory"."""
    out = make_training_output(tmp_path / "o", peak_memory_of=of)
    card = str(build_model_card(CardInfo.from_output_dir(out), repo_id="alice/x"))
    assert f"| {label} | 12.5 GiB |" in card
    if of == "host":
        assert "peak GPU memory" not in card


def test_the_merged_card_is_written_by_the_card_module_atomically(tmp_path: Path) -> None:
    """#17: one card writer. merge's card comes from hub.card (atomic write; local paths shown by file name only),
    and blend/merge.py builds no card of its own."""
    from sd35hub.hub.card import write_merged_card

    (tmp_path / "README.md").write_text("old card")
    local = str(tmp_path / "secret_folder" / "a.safetensors")
    path = write_merged_card(tmp_path, [(local, 0.7), ("owner/b", -0.3)], "stabilityai/stable-diffusion-3.5-medium",
                             ["sks"], "pytorch_lora_weights.safetensors")
    card = ModelCard.load(path)
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium"
    assert card.data.base_model_relation == "adapter" and card.data.instance_prompt == "sks"
    assert "| `a.safetensors` | 0.7 |" in card.text and "| `owner/b` | -0.3 |" in card.text
    assert "secret_folder" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temp file left behind
    merge_source = (Path(__file__).resolve().parents[1] / "sd35hub" / "blend" / "merge.py").read_text()
    assert "ModelCardData" not in merge_source and "atomic_write_text" not in merge_source
