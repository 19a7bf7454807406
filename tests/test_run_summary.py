"""summary.json has one schema, sd35hub.run_summary.RunSummary: it round-trips exactly, a malformed file is one
ConfigError listing every problem, and the files written before schema_version existed still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd35hub.errors import ConfigError
from sd35hub.run_summary import (
    ADAPTER_FILE,
    SCHEMA_VERSION,
    EmbeddingsSummary,
    FidelitySummary,
    LoraSummary,
    PriorSummary,
    RunSummary,
    ValidationImage,
)


def _full() -> RunSummary:
    """Every field and section set (values as the trainer writes them)."""
    return RunSummary(
        base_model="stabilityai/stable-diffusion-3.5-medium", variant="sd3.5-medium", trigger_word="sks dog",
        dataset="alice/dogs", steps=40, epochs=2.5, samples_seen=160, final_loss=0.1875, validation_loss=0.25,
        initial_validation_loss=0.3125, resolution_buckets=[(512, 512), (640, 384)], skipped={"corrupt image": 1},
        validation_images=[ValidationImage("samples/final_0.png", "a photo of sks dog"),
                           ValidationImage("samples/final_1.png", "")],
        loss_plot="loss.png", precision="bf16", quantization="nf4", seed=7,
        lora=LoraSummary(rank=8, alpha=8.0, targets=["to_k", "to_q"], dropout=0.05, blocks="0-11", preset="attention",
                         variant="dora", rslora=True, init="pissa", text_encoders=["clip_l"], text_encoder_rank=4,
                         text_encoder_alpha=4.0, text_encoder_lr=5e-5),
        learning_rate=1e-4, optimizer="adamw8bit", batch_size=2, gradient_accumulation=2, lr_scheduler="cosine",
        timestep_sampling="logit_normal", loss_weighting="none", ema_decay=0.999, duration_s=123.45,
        peak_memory_gib=9.876, peak_memory_of="host", sd35hub_version="0.9.0", validation_loss_on="held-out",
        held_out=3, mask_t5_padding=True,
        embeddings=EmbeddingsSummary(file="adapter/embeddings.safetensors", tokens=["<s0>", "<s1>"],
                                     encoders=["clip_l", "clip_g"], keys=["clip_l", "clip_g"], embedding_lr=1e-3,
                                     embedding_steps=20, init="dog"),
        prior_preservation=PriorSummary(class_prompt="a photo of a dog", class_images=4, generated=2,
                                        prior_loss_weight=1.0, class_samples_seen=80),
        fidelity=FidelitySummary(clip_model="openai/clip-vit-base-patch32", dino_model="facebook/dino-vits16",
                                 instance_images=5, mean={"clip_t": 0.3, "clip_i": 0.8, "dino": None},
                                 prompts=[{"prompt": "a photo of sks dog", "clip_t": 0.3, "clip_i": 0.8, "dino": None}],
                                 json="eval/eval.json", grid="eval/grid.png"),
        memory={"phases": {"train": {"gpu_peak_gib": 1.5}}, "host_peak_gib": 2.0, "plan": None},
        phases={"import": 0.75, "config": 1.25, "models": 9.5},
    )  # fmt: skip


def test_write_then_read_gives_the_same_summary_exactly(tmp_path: Path) -> None:
    summary = _full()
    path = summary.write(tmp_path)
    assert path == tmp_path / "summary.json"
    again = RunSummary.read(tmp_path)
    assert again == summary
    assert again.to_json() == summary.to_json() == path.read_text(encoding="utf-8")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["schema_version"] == SCHEMA_VERSION and raw["phases"] == {"import": 0.75, "config": 1.25, "models": 9.5}
    assert raw["resolution_buckets"] == [[512, 512], [640, 384]] and raw["lora"]["variant"] == "dora"
    # the smallest summary round-trips too, and leaves its absent sections out of the file
    small = RunSummary(base_model="tiny")
    small.write(tmp_path)
    assert RunSummary.read(tmp_path) == small
    assert not {"embeddings", "prior_preservation", "fidelity", "memory"} & set(json.loads(path.read_text()))
    assert set(json.loads(path.read_text())["lora"]) == {"rank", "alpha", "targets", "dropout", "blocks", "preset"}


def test_a_malformed_summary_lists_every_problem_in_one_config_error(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({
        "steps": "many",
        "epochs": True,
        "resolution_buckets": [[1024], "a"],
        "skipped": {"corrupt": "two"},
        "validation_images": ["a.png", {"path": "../secret.png", "prompt": "p"}],
        "lora": {"rank": "16", "targets": "to_q"},
        "adapter_file": "/etc/passwd",
        "peak_memory_of": "tpu",
        "phases": {"import": "soon", "models": 1.0},
        "embeddings": {"tokens": ["<s0>"]},
        "some_future_key": {"ignored": True},
    }))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        RunSummary.read(tmp_path)
    problems = info.value.problems
    named = [p.split(": ", 2)[1] for p in problems[:-1]]
    assert named == ["base_model", "adapter_file", "steps", "epochs", "resolution_buckets[0]", "resolution_buckets[1]",
                     "skipped.corrupt", "validation_images[0]", "validation_images[1].path", "lora.rank",
                     "lora.targets", "peak_memory_of", "embeddings.file", "phases.import"], problems  # field order
    assert all(p.startswith(str(tmp_path / "summary.json")) for p in problems)
    said = dict(zip(named, (p.split(": ", 2)[2] for p in problems), strict=False))
    assert "not inside the run folder" in said["adapter_file"] and "not inside" in said["validation_images[1].path"]
    assert said["steps"] == 'expected an integer, got "many"' and said["epochs"] == "expected a number, got true"
    assert said["lora.targets"] == 'expected a list of strings, got "to_q"' and said["embeddings.file"] == "missing"
    assert "rerun training" in problems[-1] and "fix the fields above" in problems[-1]
    assert info.value.exit_code == 2 and f"({len(problems)} problems)" in str(info.value)


# What sd35hub wrote before schema_version existed (train.outputs.build_summary + finish), byte for byte in form.
OLD_SUMMARY = r"""{
  "base_model": "tiny",
  "variant": "tiny",
  "adapter_file": "adapter/pytorch_lora_weights.safetensors",
  "trigger_word": "sks",
  "dataset": "sample",
  "steps": 8,
  "epochs": 1.0,
  "samples_seen": 8,
  "final_loss": 0.9734,
  "validation_loss": 1.0123,
  "initial_validation_loss": 1.0456,
  "resolution_buckets": [
    [
      64,
      64
    ]
  ],
  "skipped": {},
  "validation_images": [
    {
      "path": "samples/final_0.png",
      "prompt": "sks, a red square"
    }
  ],
  "loss_plot": "loss.png",
  "precision": "fp32",
  "quantization": null,
  "seed": 42,
  "lora": {
    "rank": 4,
    "alpha": 4,
    "targets": [
      "to_k",
      "to_out.0",
      "to_q",
      "to_v"
    ],
    "dropout": 0.0,
    "blocks": "all",
    "preset": "attention",
    "variant": "lokr",
    "rslora": false,
    "init": "gaussian"
  },
  "learning_rate": 0.0001,
  "optimizer": "adamw",
  "batch_size": 1,
  "gradient_accumulation": 1,
  "lr_scheduler": "constant",
  "timestep_sampling": "logit_normal",
  "loss_weighting": "none",
  "ema_decay": null,
  "duration_s": 3.21,
  "peak_memory_gib": 1.234,
  "sd35hub_version": "0.8.0",
  "validation_loss_on": "held-out",
  "held_out": 2,
  "peak_memory_of": "host",
  "prior_preservation": {
    "class_prompt": "a square",
    "class_images": 2,
    "generated": 2,
    "prior_loss_weight": 1.0,
    "class_samples_seen": 8
  },
  "fidelity": {
    "error": "the CLIP model openai/clip-x cannot be loaded"
  },
  "memory": {
    "phases": {
      "train": {
        "host_peak_gib": 1.2
      }
    },
    "host_peak_gib": 1.234,
    "gpu_peak_reserved_gib": 0.0,
    "plan": null
  }
}"""


def test_a_summary_written_before_schema_version_still_reads(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(OLD_SUMMARY)
    summary = RunSummary.read(tmp_path)
    assert summary.schema_version == SCHEMA_VERSION and summary.phases == {} and summary.mask_t5_padding is False
    assert (summary.base_model, summary.steps, summary.final_loss, summary.peak_memory_of) == ("tiny", 8, 0.9734, "host")
    assert summary.resolution_buckets == [(64, 64)]
    assert summary.validation_images == [ValidationImage("samples/final_0.png", "sks, a red square")]
    assert summary.lora == LoraSummary(rank=4, alpha=4.0, targets=["to_k", "to_out.0", "to_q", "to_v"], dropout=0.0,
                                       blocks="all", preset="attention", variant="lokr", rslora=False, init="gaussian")
    assert summary.prior_preservation == PriorSummary("a square", 2, 2, 1.0, 8)
    assert summary.fidelity == FidelitySummary(error="the CLIP model openai/clip-x cannot be loaded")
    assert summary.memory is not None and summary.memory["host_peak_gib"] == 1.234
    # written again, every old key keeps its value; only schema_version, phases and mask_t5_padding are added
    old, new = json.loads(OLD_SUMMARY), summary.to_dict()
    assert {k: new[k] for k in old} == old
    assert set(new) - set(old) == {"schema_version", "phases", "mask_t5_padding"}
    # and the card and a finished run's TrainResult read it
    from sd35hub.hub.card import CardInfo

    info = CardInfo.from_output_dir(tmp_path)
    assert info.lora["variant"] == "lokr" and info.prior_preservation == json.loads(OLD_SUMMARY)["prior_preservation"]


def test_a_summary_from_a_newer_sd35hub_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "base_model": "tiny"}))
    with pytest.raises(ConfigError, match="newer sd35hub.*upgrade sd35hub"):
        RunSummary.read(tmp_path)
    with pytest.raises(ConfigError, match="schema_version: expected a positive integer"):
        RunSummary.from_dict({"schema_version": "2", "base_model": "tiny"})


def test_a_missing_or_broken_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no summary.json: point at the output folder"):
        RunSummary.read(tmp_path)
    for text in ("{not json", "[1, 2]", "\udcff"):
        (tmp_path / "summary.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ConfigError, match="summary.json"):
            RunSummary.read(tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_a_path_that_links_outside_the_run_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.png", run / "samples" / "final_0.png")
    RunSummary(base_model="tiny", validation_images=[ValidationImage("samples/final_0.png", "p")]).write(run)
    with pytest.raises(ConfigError, match="validation_images\\[0\\].path.*links to"):
        RunSummary.read(run)
    assert RunSummary.from_dict(json.loads((run / "summary.json").read_text())).validation_images  # no folder: no links


def test_the_adapter_path_is_the_adapter_file_name_of_sd35hub_adapters() -> None:
    from sd35hub.adapters.files import ADAPTER_FILENAME

    assert ADAPTER_FILE == f"adapter/{ADAPTER_FILENAME}"


def test_a_finished_runs_result_and_the_card_read_the_same_summary(tmp_path: Path) -> None:
    from sd35hub.hub.card import CardInfo
    from sd35hub.train.outputs import read_result

    summary = _full()
    summary.write(tmp_path)
    result = read_result(tmp_path)
    assert result.run_summary == summary and result.summary == summary.to_dict()
    assert (result.steps, result.samples_seen, result.final_loss, result.duration_s) == (40, 160, 0.1875, 123.45)
    info = CardInfo.from_summary(summary)
    assert info == CardInfo.from_summary(summary.to_dict())
    assert info.lora == summary.lora.to_dict() and info.embeddings == summary.embeddings.to_dict()  # type: ignore[union-attr]


def test_every_card_field_is_a_summary_field_and_is_carried_over() -> None:
    """CardInfo is the card's view of RunSummary, not a second schema: each of its fields is one of the summary's
    (a card field the schema lacks would never be filled), and from_summary carries every one of them over."""
    import dataclasses

    from sd35hub.hub.card import CardInfo

    card = {f.name for f in dataclasses.fields(CardInfo)}
    assert card <= {f.name for f in dataclasses.fields(RunSummary)}
    summary, info = _full(), CardInfo.from_summary(_full())
    for name in card:
        value = getattr(summary, name)
        expected = value.to_dict() if hasattr(value, "to_dict") else value
        assert getattr(info, name) == expected, name
