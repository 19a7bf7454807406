"""Hub repos for the Space tests: two adapters of the tiny base (cards with base_model + trigger words +
a preview image), one adapter whose card names SD3.5 Large, one of the wrong shape with no base in its
card, and a gated copy of the tiny base owned by bob (alice, the HF_TOKEN user, never accepted it)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from lora_helpers import add_random_lora

from sd35hub.adapters.files import AdapterMetadata, save_adapter
from sd35hub.frontends.space.support import TINY_HUB_BASE

LARGE = "stabilityai/stable-diffusion-3.5-large"
SPACE_APP = str(Path(__file__).resolve().parents[1] / "space" / "app.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_streamlit(env: dict[str, str], log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `streamlit run app` headless on a free loopback port; return (process, base URL) once
    /_stcore/health answers."""
    port = _free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", SPACE_APP, "--server.headless", "true",
        "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", *extra,
    ]  # fmt: skip
    out = log.open("wb")
    process = subprocess.Popen(
        command, cwd=Path(SPACE_APP).parents[1], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"streamlit did not become healthy in 60 s:\n{log.read_text()[-3000:]}")


def stop_streamlit(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@dataclass(frozen=True)
class SpaceRepos:
    tag: str  # unique substring of the adapter repo ids (what a search finds)
    watercolor: str
    ink: str
    other_base: str
    wrong_shape: str
    gated_base: str


def card(base: str | None, trigger: str | None, preview: str | None) -> str:
    lines = ["---", "license: other", "license_name: stabilityai-ai-community", "tags: [lora, sd3.5]"]
    if base:
        lines += [f"base_model: {base}", "base_model_relation: adapter"]
    else:
        lines += ["library_name: peft"]
    if trigger:
        lines.append(f"instance_prompt: {trigger}")
    if preview:
        lines += ["widget:", "- text: a prompt", "  output:", f"    url: {preview}"]
    return "\n".join([*lines, "---", "", "# an adapter", ""])


def preview_png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def adapter_bytes(
    transformer: torch.nn.Module, name: str, seed: int, words: list[str], targets: list[str]
) -> bytes:
    add_random_lora(transformer, name, rank=2, alpha=2.0, targets=targets, seed=seed, std=0.3)
    meta = AdapterMetadata(rank=0, alpha=0.0, base_model=TINY_HUB_BASE, trigger_words=words)
    with tempfile.TemporaryDirectory() as folder:
        return save_adapter(transformer, Path(folder), metadata=meta, adapter_name=name).read_bytes()


def seed_space_repos(hub) -> SpaceRepos:  # noqa: ANN001 - tests.hubserver.HubServer
    from diffusers import SD3Transformer2DModel

    from sd35hub.models.load import load_transformer
    from sd35hub.models.tiny import tiny_model_path

    tag = f"space{uuid.uuid4().hex[:6]}"
    repos = SpaceRepos(
        tag=tag,
        watercolor=f"sd35hub-org/{tag}-watercolor",
        ink=f"bob/{tag}-ink",
        other_base=f"bob/{tag}-large-style",
        wrong_shape=f"bob/wide-{uuid.uuid4().hex[:6]}",
        gated_base=f"bob/gated-tiny-{uuid.uuid4().hex[:6]}",
    )
    tiny = load_transformer("tiny")
    hub.seed_repo(repos.watercolor, {
        "README.md": card(TINY_HUB_BASE, "wtrclr style", "images/preview.png"),
        "pytorch_lora_weights.safetensors": adapter_bytes(tiny, "w", 1, ["wtrclr style"], ["to_q", "to_v"]),
        "images/preview.png": preview_png((200, 120, 40)),
    })  # fmt: skip
    hub.seed_repo(repos.ink, {
        "README.md": card(TINY_HUB_BASE, "inkd style", "images/preview.png"),
        "pytorch_lora_weights.safetensors": adapter_bytes(tiny, "i", 2, [], ["to_k", "add_q_proj"]),
        "images/preview.png": preview_png((30, 30, 90)),
    }, owner_token=hub.other_token)  # fmt: skip
    hub.seed_repo(repos.other_base, {
        "README.md": card(LARGE, "lrg style", None),
        "pytorch_lora_weights.safetensors": adapter_bytes(tiny, "o", 3, [], ["to_q"]),
    }, owner_token=hub.other_token)  # fmt: skip
    # Twice as wide as the tiny transformer (64 vs 32): loading it into the tiny base must be refused.
    wide = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )  # fmt: skip
    hub.seed_repo(repos.wrong_shape, {
        "README.md": card(None, None, None),
        "pytorch_lora_weights.safetensors": adapter_bytes(wide, "x", 4, [], ["to_q", "to_out.0"]),
    }, owner_token=hub.other_token)  # fmt: skip
    folder = tiny_model_path()
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub.seed_repo(repos.gated_base, files, gated="manual", owner_token=hub.other_token)
    hub.seed_repo(TINY_HUB_BASE, files)  # the tiny base on the Hub: what the Space's snippets load
    return repos


EVIL = "evil.example"  # an attacker's site: nothing the Space shows may link to it or load from it


@dataclass(frozen=True)
class HostileRepos:
    card: str  # a tiny-base adapter whose card fields carry tags, Markdown, an off-site image, a flood
    private: str  # alice's private adapter (HF_TOKEN's user): what the cache-path tag points at
    private_cache_path: str  # where the Space's HF cache holds alice's private adapter file
    link: str  # a ?adapter= value that is a Markdown link


def seed_hostile_repos(hub, repos: SpaceRepos) -> HostileRepos:  # noqa: ANN001
    """The attacker's adapter: its card's instance_prompt is a list of (1) a tag that would load the ink
    adapter at weight 50, plus bold text, a phishing link and a remote image, (2) a tag naming the cache
    file of alice's private adapter (fetched earlier with alice's token), (3) 15,000 characters. Its
    widget image and license are off-site links."""
    import json

    from sd35hub.hub.discovery import download_adapter

    private = f"alice/{repos.tag}-secret"
    weights = hub.files(repos.watercolor)["pytorch_lora_weights.safetensors"]
    hub.seed_repo(private, {"README.md": card(TINY_HUB_BASE, "scrt style", None),
                            "pytorch_lora_weights.safetensors": weights}, private=True)  # fmt: skip
    cache_path = str(download_adapter(private, token=hub.token))  # a visitor with alice's token used it
    words = [
        f"<lora:{repos.ink}:50> **bold** [Session expired - log in again](http://{EVIL}/login) "
        f"![x](http://{EVIL}/pixel.png)",
        f"<lora:{cache_path}:1>",
        "flood " * 2500,
    ]
    readme = "\n".join([
        "---", f"base_model: {TINY_HUB_BASE}", "base_model_relation: adapter", "license: other",
        f"license_name: {json.dumps(f'[free](http://{EVIL}/license)')}", f"instance_prompt: {json.dumps(words)}",
        "widget:", "- text: a prompt", "  output:", f"    url: http://{EVIL}/preview.png", "---", "", "# hi", "",
    ])  # fmt: skip
    hostile = f"bob/{repos.tag}-hostile"
    hub.seed_repo(hostile, {"README.md": readme, "pytorch_lora_weights.safetensors": weights},
                  owner_token=hub.other_token)  # fmt: skip
    link = f"[Session expired - log in again](http://{EVIL}/login)"
    return HostileRepos(card=hostile, private=private, private_cache_path=cache_path, link=link)
