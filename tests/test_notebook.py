"""colab/SD35_Training.ipynb executed top to bottom, twice, on CPU: tiny model, sample dataset, local Hub.

Parameters are injected papermill-style (a cell tagged ``injected-parameters`` right after the one
tagged ``parameters``) and the notebook runs in a kernel of this test's own Python (a kernelspec
written to a temp JUPYTER_PATH), so CI on a clean machine needs nothing but the dev extra.
The second execution asks for more steps: it must continue from the first run's checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "SD35_Training.ipynb"
KERNEL = "sd35hub-test-python"


def inject_parameters(notebook: Any, params: dict[str, Any]) -> Any:
    """Insert ``NAME = repr(value)`` lines after the cell tagged ``parameters`` (papermill's convention)."""
    index = next(
        i for i, c in enumerate(notebook.cells) if "parameters" in c.get("metadata", {}).get("tags", [])
    )
    source = "# Parameters injected by tests/test_notebook.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items()
    )
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)
    return notebook


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """A kernelspec running this interpreter (the venv's ipykernel), with the test session's Hub env."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "SD35HUB_")) or k in ("MPLBACKEND",)}
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sd35hub tests", "language": "python", "env": env}  # fmt: skip
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root)
    yield KERNEL
    if previous is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = previous


def execute(params: dict[str, Any], workdir: Path, kernel_name: str) -> Any:
    notebook = inject_parameters(nbformat.read(NOTEBOOK, as_version=4), params)
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=300,
                            resources={"metadata": {"path": str(workdir)}})  # fmt: skip
    client.execute()
    return notebook


def text_of(notebook: Any) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
            parts.append(output.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def seed_blend_adapter(hub: Any, repo_id: str, tmp: Path) -> None:
    """A second, already published adapter on the local Hub (random LoRA on the tiny model)."""
    from lora_helpers import add_random_lora

    from sd35hub.adapters.files import AdapterMetadata, save_adapter
    from sd35hub.models.load import load_pipeline

    transformer = load_pipeline("tiny").transformer
    add_random_lora(transformer, seed=3)
    path = save_adapter(
        transformer, tmp / "blend", metadata=AdapterMetadata(rank=4, alpha=8.0, base_model="tiny")
    )
    file = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    hub.seed_repo(
        repo_id,
        {"pytorch_lora_weights.safetensors": file.read_bytes(), "README.md": "---\ntags: [lora]\n---\n"},
    )


@pytest.fixture(scope="module")
def runs(hub, kernel_name, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    suffix = uuid.uuid4().hex[:8]
    blend_repo = f"alice/nb-blend-{suffix}"
    seed_blend_adapter(hub, blend_repo, tmp)
    out = tmp / "out"
    params = dict(
        MODEL="tiny", DATASET="sample", TRIGGER_WORD="nrt style", RANK=4, MAX_STEPS=4, RESOLUTION=64,
        REPO_ID=f"alice/nb-lora-{suffix}", OUTPUT_DIR=str(out), CHECKPOINT_DIR=None, CHECKPOINT_EVERY=2,
        VALIDATION_EVERY=2, PROFILE="cpu", INFERENCE_STEPS=2, INFERENCE_SIZE=64, BLEND_WITH=blend_repo,
        CLIP_MODEL="openai/clip-vit-large-patch14",  # not on the local Hub: the skip path with its reason
        EXTRA=["train.batch_size=2", "train.validation_steps=1", "train.learning_rate=2e-3", "train.log_every=1",
               "lora.alpha=8", "data.max_samples=10", "data.holdout=2"],
        PUBLISH=True, DRY_RUN=False, HUB_ENDPOINT=hub.endpoint,
    )  # fmt: skip
    first = execute(params, tmp, kernel_name)
    first_files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    second = execute({**params, "MAX_STEPS": 8}, tmp, kernel_name)  # "run all" again, after the first run
    return {"out": out, "first": first, "second": second, "first_files": first_files,
            "repo": params["REPO_ID"], "blend": blend_repo}  # fmt: skip


@pytest.mark.slow
def test_first_execution_writes_adapter_card_preview_and_validation_images(runs, hub) -> None:
    out, files = runs["out"], runs["first_files"]
    for name in (
        "adapter/pytorch_lora_weights.safetensors",
        "README.md",
        "preview.png",
        "loss.png",
        "summary.json",
        "samples/step_000000.png",
        "samples/step_000002.png",
        "samples/step_000004.png",
        "gallery/samples.png",
        "gallery/schedulers.png",
        "gallery/cfg_sweep.png",
        "gallery/blend.png",
    ):
        assert name in files, name
    text = text_of(runs["first"])
    assert "hardware profile cpu" in text
    assert "no checkpoint in" in text and "started at step 0" in text
    assert "CLIP score skipped: openai/clip-vit-large-patch14 could not be loaded" in text
    assert f"/spaces/sd35hub/lora-blend?adapter={runs['repo']}" in text
    # the grids carry every cell's parameters; the blend used both adapters
    from sd35hub.pngmeta import read_png_params

    blend = read_png_params(out / "gallery" / "blend.png")["sd35hub"]["grid"]
    assert [len(cell["adapters"]) for cell in blend] == [0, 1, 1, 2]
    assert blend[-1]["adapters"][1]["repo_id"] == runs["blend"]
    schedulers = read_png_params(out / "gallery" / "schedulers.png")["sd35hub"]["grid"]
    assert [c["scheduler"] for c in schedulers] == ["euler", "heun", "dpmpp-2m", "unipc"]


@pytest.mark.slow
def test_adapter_is_really_published_to_the_local_hub(runs, hub) -> None:
    remote = hub.files(runs["repo"])
    assert "README.md" in remote and any(p.endswith(".safetensors") for p in remote)
    local = (runs["out"] / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()
    assert local in remote.values()  # the second run's adapter (8 steps) is what the Hub holds now
    assert not any("checkpoint" in p for p in remote)


@pytest.mark.slow
def test_second_execution_resumes_from_the_checkpoint(runs) -> None:
    from sd35hub.frontends.colab import read_runs

    out = runs["out"]
    first, second = read_runs(out / "checkpoints")
    assert first["start_step"] == 0 and first["resumed_from"] is None and first["end_step"] == 4
    assert second["start_step"] == 4 and second["end_step"] == 8
    assert Path(second["resumed_from"]).name == "checkpoint-000004"
    assert "resumed at step 4" in text_of(runs["second"])
    # steps 1..4 were not trained again: each step's loss appears once, in order
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_committed_notebook_has_no_outputs_and_one_parameters_cell() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    sources = "\n".join(c.source for c in code)
    # tokens come from Colab secrets / the login cache only
    assert not re.search(r"hf_[A-Za-z0-9]{8,}|token\s*=", sources)
    assert "nb.login()" in sources


def test_every_code_cell_is_a_short_call_into_sd35hub() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 12, cell.source
            assert "def " not in cell.source and "class " not in cell.source, cell.source


# ----------------------------------------------------------------------- the helpers, one by one
def _plan(**kwargs: Any) -> Any:
    from sd35hub.frontends.colab import build_plan

    defaults: dict[str, Any] = dict(model="tiny", dataset="sample", output_dir="out")
    return build_plan(**{**defaults, **kwargs})


class _T4:
    name, total_memory, major = "Tesla T4", 15 * 1024**3, 7


def test_plan_reports_every_config_problem_at_once_before_loading_anything() -> None:
    from sd35hub.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _plan(rank=0, resolution=100, repo_id="not a repo", extra=["train.optimizer=sgd"])
    text = str(info.value)
    for flag in ("lora.rank", "data.resolution", "hub.repo_id", "train.optimizer"):
        assert flag in text
    with pytest.raises(ConfigError, match="unknown key train.learning_rat"):
        _plan(extra=["train.learning_rat=1e-4"])


def test_plan_leaves_open_settings_to_the_profile_and_keeps_the_users() -> None:
    from sd35hub.hardware import detect_profile

    t4 = detect_profile("auto", device_props=_T4(), variant="sd3.5-large")
    plan = _plan(
        model="stabilityai/stable-diffusion-3.5-large", profile=t4, extra=["train.learning_rate=5e-5"]
    )
    # the trainer gets the open settings and decides them exactly as the resolved plan shows
    assert plan.config.train.profile == "t4" and plan.config.train.batch_size is None
    assert plan.resolved.data.resolution == 768 and plan.resolved.train.mixed_precision == "fp16"
    assert plan.resolved.train.learning_rate == 5e-5 and plan.config.data.resolution is None
    mine = _plan(model="stabilityai/stable-diffusion-3.5-large", profile=t4, resolution=1024, rank=16)
    assert mine.resolved.data.resolution == 1024 and mine.config.data.resolution == 1024
    assert "data.resolution = 1024 (your setting)" in mine.describe()


def test_prepare_run_falls_back_from_drive_outside_colab_and_resumes_when_a_checkpoint_exists(
    tmp_path, capsys
) -> None:
    from sd35hub.frontends.colab import prepare_run

    plan = prepare_run(_plan(output_dir=str(tmp_path), checkpoint_dir="/content/drive/MyDrive/sd35hub/ckpt"))
    assert plan.config.train.checkpoint_dir is None and plan.config.train.resume is None
    assert plan.checkpoint_dir == tmp_path / "checkpoints"
    assert capsys.readouterr().out.splitlines() == [
        f"Google Drive is only available in Colab: checkpoints go to {tmp_path / 'checkpoints'}",
        f"no checkpoint in {tmp_path / 'checkpoints'}: starting from step 0",
    ]
    (tmp_path / "checkpoints" / "checkpoint-000012").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-000012" / "state.json").write_text('{"step": 12}')
    (tmp_path / "checkpoints" / ".tmp-checkpoint-000014-x").mkdir()  # a crash mid-write is no checkpoint
    assert prepare_run(plan).config.train.resume == "latest"
    assert capsys.readouterr().out.splitlines() == [
        f"found 1 checkpoint(s) in {tmp_path / 'checkpoints'}: resuming from checkpoint-000012"
    ]


def test_login_and_access_checks_against_the_local_hub(hub, monkeypatch) -> None:
    from sd35hub.errors import LicenseNotAcceptedError, NotLoggedInError, WritePermissionError
    from sd35hub.frontends.colab import check_access, login, target_repo

    assert login() == "alice"  # HF_TOKEN, resolved by huggingface_hub itself
    repo = f"bob/gated-base-{uuid.uuid4().hex[:6]}"  # gated for alice (not her repo)
    hub.seed_repo(repo, {"README.md": "---\nlicense: other\n---\n", "model_index.json": "{}"})
    hub.gate(repo, mode="manual")
    plan = _plan(model=repo, dataset="lambdalabs/naruto-blip-captions")
    with pytest.raises(LicenseNotAcceptedError) as info:
        check_access(plan, "alice")
    assert f"{hub.endpoint}/{repo}" in str(info.value)  # the exact link to accept it
    hub.grant(repo, "alice")
    checked = check_access(plan, "alice")
    assert (
        checked.config.hub.repo_id
        == "alice/sd35-naruto-blip-captions-lora"
        == target_repo(None, "alice", "a/naruto-blip-captions")
    )
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    with pytest.raises(WritePermissionError, match="read-only token"):
        check_access(plan, "alice")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NotLoggedInError, match="Secrets"):
        login(interactive=False)


def test_space_link_preselects_the_adapter() -> None:
    from sd35hub.frontends.colab_tools import space_link

    assert space_link("me/my-lora", endpoint="https://huggingface.co") == (
        "https://huggingface.co/spaces/sd35hub/lora-blend?adapter=me/my-lora"
    )
    assert space_link("me/my-lora", weight=0.8, space_id="a/b", endpoint="https://hf.co/").endswith(
        "/spaces/a/b?adapter=me/my-lora:0.8"
    )


def test_clip_score_with_a_local_clip_model(tmp_path) -> None:
    """A small random CLIPModel (vision + text towers) saved with its processor: the score is computed,
    bounded, deterministic, and order-sensitive (image i is scored against prompt i)."""
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sd35hub.frontends.colab_tools import clip_score
    from sd35hub.models.tiny import tiny_model_path

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path() / "tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    images = [Image.new("RGB", (48, 48), c) for c in ((220, 30, 30), (30, 30, 220))]
    prompts = ["a red circle", "a blue square"]
    score = clip_score(images, prompts, str(tmp_path / "clip"), device="cpu")
    assert 0.0 <= score <= 100.0
    assert clip_score(images, prompts, str(tmp_path / "clip"), device="cpu") == score
    swapped = clip_score(images, prompts[::-1], str(tmp_path / "clip"), device="cpu")
    assert swapped != score
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, prompts[:1], str(tmp_path / "clip"))


def test_evaluate_reads_the_run_through_the_card_info(tmp_path) -> None:
    import json as _json

    from training_output import make_training_output

    from sd35hub.errors import ConfigError
    from sd35hub.frontends.colab_tools import evaluate

    out = make_training_output(tmp_path / "o")
    summary = _json.loads((out / "summary.json").read_text())
    result = evaluate(out, None)
    assert result.clip_score is None and "no CLIP model configured" in result.clip_message
    on_disk = [v for v in summary["validation_images"] if (out / v["path"]).is_file()]
    assert result.images == len(on_disk) > 0
    assert result.loss_plot == out / summary["loss_plot"] and result.loss_plot.is_file()
    assert (result.final_loss, result.validation_loss) == (summary["final_loss"], summary["validation_loss"])
    with pytest.raises(ConfigError, match="summary.json"):
        evaluate(tmp_path / "missing", None)
