"""colab/SD35_Training.ipynb executed top to bottom, twice, on CPU: tiny model, sample dataset, local Hub.

Parameters are injected papermill-style (a cell tagged ``injected-parameters`` right after the one
tagged ``parameters``) and the notebook runs in a kernel of this test's own Python (a kernelspec
written to a temp JUPYTER_PATH), so CI on a clean machine needs nothing but the dev extra.
The second execution asks for more steps: it must continue from the first run's checkpoint.
"""

from __future__ import annotations

import json
import os
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
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Parameters injected by tests/test_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
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

    from sd35hub.adapters import AdapterMetadata, save_adapter
    from sd35hub.models.load import load_pipeline

    transformer = load_pipeline("tiny").transformer
    add_random_lora(transformer, seed=3)
    path = save_adapter(transformer, tmp / "blend", metadata=AdapterMetadata(rank=4, alpha=8.0, base_model="tiny"))
    file = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    hub.seed_repo(repo_id, {"pytorch_lora_weights.safetensors": file.read_bytes(), "README.md": "---\ntags: [lora]\n---\n"})


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


def test_first_execution_writes_adapter_card_preview_and_validation_images(runs, hub) -> None:
    out, files = runs["out"], runs["first_files"]
    for name in ("adapter/pytorch_lora_weights.safetensors", "README.md", "preview.png", "loss.png", "summary.json",
                 "samples/step_000000.png", "samples/step_000002.png", "samples/step_000004.png",
                 "gallery/samples.png", "gallery/schedulers.png", "gallery/cfg_sweep.png", "gallery/blend.png"):
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


def test_adapter_is_really_published_to_the_local_hub(runs, hub) -> None:
    remote = hub.files(runs["repo"])
    assert "README.md" in remote and any(p.endswith(".safetensors") for p in remote)
    local = (runs["out"] / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()
    assert local in remote.values()  # the second run's adapter (8 steps) is what the Hub holds now
    assert not any("checkpoint" in p for p in remote)


def test_second_execution_resumes_from_the_checkpoint(runs) -> None:
    from sd35hub.notebook import read_runs

    out = runs["out"]
    first, second = read_runs(out)
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
    assert "HF_TOKEN" not in "".join(c.source for c in code if "userdata" in c.source)  # no token in code
    assert not any("hf_" in c.source for c in code)


def test_every_code_cell_is_a_short_call_into_sd35hub() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 12, cell.source
            assert "def " not in cell.source and "class " not in cell.source, cell.source
