"""The README's "Using it" commands, run as shown through the real CLI on the embedded tiny model and
on a small local diffusers folder (#15: "the README's commands run as shown").

Only what needs another machine is substituted: the Hub base and dataset become the tiny model (or a
local copy of it) and the sample dataset, Hub adapters become the adapter the README's own `train`
wrote, `me/` is the local test Hub's user, `publish` adds --dry-run, and the training runs 2 steps. `check-access` and `bench` need the Hub
or a GPU (tests/test_access.py, tests/test_bench.py), `--on hf-jobs` and `sweep` run Hub jobs
(tests/test_jobs.py); `make space` is tests/test_space_app.py.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from cli_helpers import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_BASES = {"stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"}


def readme_commands() -> list[list[str]]:
    """The `sd35hub ...` lines of the README's "Using it" block (continuations joined, comments cut)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("sd35hub "):
            commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_still_shows_the_commands_this_test_runs() -> None:
    names = [c[0] for c in readme_commands()]
    assert names == ["check-access", "data", "train", "train", "publish", "train", "sweep", "generate", "convert", "merge",
                     "bench", "bench"]


def _substitute(args: list[str], model: str, work: Path, adapter: Path | None) -> list[str] | None:
    out: list[str] = []
    for arg in args:
        if arg in HUB_BASES:
            arg = model
        elif arg == "lambdalabs/naruto-blip-captions":
            arg = "sample"
        elif arg.startswith("out/") or arg.startswith("gen/") or arg.startswith("merged/"):
            arg = str(work / arg)
        elif re.match(r"^me/[\w-]+:[\d.]+$", arg):  # a published adapter of ours: the local one
            arg = f"{adapter}:{arg.split(':')[1]}"
        elif arg.startswith("me/"):  # our Hub user on the local test Hub
            arg = "alice/" + arg[3:]
        elif arg in ("kohya_lora.safetensors", "out.safetensors"):
            arg = str(work / arg)
        out.append(arg)
    return out


def _run_readme(model: str, work: Path, capsys, extra_train: list[str]) -> dict[str, str]:
    outputs: dict[str, str] = {}
    adapter = work / "out" / "naruto" / "adapter"
    for args in readme_commands():
        name = args[0]
        if name in ("check-access", "bench", "sweep") or "hf-jobs" in args:
            continue
        args = _substitute(args, model, work, adapter)
        if name == "data":
            args = [*args[:-2], "--out", str(work / "preview.png")]
        if name == "train" and "--config" in args:  # my.yaml: the first run's settings
            (work / "my.yaml").write_text(
                f"model: {{name: {json.dumps(model)}}}\ndata: {{source: sample, trigger_word: nrt style}}\n"
                f"train: {{output_dir: {json.dumps(str(work / 'out' / 'naruto'))}, max_steps: 2}}\n")
            args = [a if a != "my.yaml" else str(work / "my.yaml") for a in args]
        elif name == "train":
            args = [*args, *extra_train]
        if name == "publish":
            args.append("--dry-run")
        if name == "generate":
            args += ["--steps", "2"]
        if name == "convert":  # the README converts a kohya file: make one from our adapter first
            code, out, err = run_cli(["convert", str(adapter), str(work / "kohya_lora.safetensors"), "--to", "kohya"], capsys)
            assert code == 0, err
        code, out, err = run_cli(args, capsys)
        assert code == 0, (args, out, err)
        outputs[" ".join(args[:2])] = out
    return outputs


def _check(work: Path, outputs: dict[str, str], model_shown: str) -> None:
    run = work / "out" / "naruto"
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["base_model"] == model_shown
    assert any("is finished" in out for key, out in outputs.items() if key.startswith("train --config"))
    assert (work / "preview.png").is_file() and list((work / "gen").glob("*.png"))
    assert (work / "out.safetensors").is_file() and list((work / "merged").glob("*.safetensors"))
    card = (run / "README.md").read_text()
    assert str(work) not in card


@pytest.mark.slow
def test_readme_commands_on_the_tiny_model(tmp_path: Path, capsys, hub) -> None:
    outputs = _run_readme("tiny", tmp_path, capsys, ["--steps", "2", "--resolution", "64"])  # 512 px: test_train_recipe
    _check(tmp_path, outputs, "tiny")


@pytest.mark.slow
def test_readme_commands_on_a_local_diffusers_folder(tmp_path: Path, capsys, hub) -> None:
    """A local folder the way the Hub cache holds one: its Hub id is found, and never its path."""
    import shutil

    from sd35hub.models.tiny import tiny_model_path

    folder = tmp_path / "hf" / "models--stabilityai--stable-diffusion-3.5-medium" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_path(), folder)
    outputs = _run_readme(str(folder), tmp_path / "w", capsys, ["--steps", "2", "--resolution", "64"])
    _check(tmp_path / "w", outputs, "stabilityai/stable-diffusion-3.5-medium")
    publish = next(out for key, out in outputs.items() if key.startswith("publish"))
    assert "base_model: stabilityai/stable-diffusion-3.5-medium" in publish and str(tmp_path) not in publish
