"""Pivotal-tuning embeddings in the blend engine: an adapter's ``embeddings.safetensors`` loaded with it.

    path = find_embeddings(adapter_file, hub, token=token)        # next to the adapter (folder or repo), or None
    loaded = load_embeddings(pipe, path, source)                   # checked, rows inserted under engine tokens
    prompts = substitute(prompt, [loaded, ...])                    # {"prompt": ..., "prompt_2": ..., "prompt_3": ...}

The engine serves many adapters at once and two of them may both call their tokens ``<s0><s1>``, so the
rows go into the shared tokenizers under names of this engine (``<e1a2b3c4d0>``, from the source's hash)
and a request's prompt has each active adapter's own tokens replaced by them — only in the prompts of
the encoders that hold rows (CLIP-L, CLIP-G; T5 only when the file trained it): T5 keeps the literal
``<s0><s1>`` text it saw during training. Two active adapters with the same token are refused.
Rows stay in the matrices after an adapter is evicted (a few KB); loading it again overwrites them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sd35hub.adapters.embeddings import (
    EMBEDDINGS_FILE,
    MAX_EMBEDDINGS_BYTES,
    PIPELINE_ENCODERS,
    pipeline_dims,
    read_embeddings,
)
from sd35hub.errors import AdapterError, ConfigError

# our encoder name -> (tokenizer attribute, the pipeline's prompt argument of that encoder)
_PROMPT_ARGS = {
    "clip_l": ("tokenizer", "prompt"),
    "clip_g": ("tokenizer_2", "prompt_2"),
    "t5": ("tokenizer_3", "prompt_3"),
}


@dataclass(frozen=True)
class LoadedEmbeddings:
    source: str
    tokens: list[str]  # what prompts say ("<s0>", "<s1>")
    internal: list[str]  # what the engine's tokenizers hold for them
    encoders: tuple[str, ...]  # clip_l, clip_g (, t5)
    file: Path


def find_embeddings(adapter: Path, hub: dict[str, Any], *, token: str | bool | None) -> Path | None:
    """``embeddings.safetensors`` next to the adapter file: in its folder, or in its Hub repo folder
    (same pinned revision), size-checked before download. None when there is none."""
    if not hub.get("repo_id"):
        local = adapter.parent / EMBEDDINGS_FILE
        return local if local.is_file() else None
    from sd35hub.hub.discovery import download_adapter

    folder = PurePosixPath(hub.get("filename") or "").parent
    name = str(folder / EMBEDDINGS_FILE) if str(folder) not in ("", ".") else EMBEDDINGS_FILE
    try:
        return download_adapter(hub["repo_id"], filename=name, revision=hub.get("revision"), token=token,
                                max_bytes=MAX_EMBEDDINGS_BYTES)  # fmt: skip
    except AdapterError as exc:
        if "has no file" in exc.message:
            return None
        raise


def load_embeddings(pipe: Any, path: Path, source: str) -> LoadedEmbeddings:
    """Check ``path`` against this pipeline's encoders and put its rows in under engine tokens."""
    import torch

    dims = pipeline_dims(pipe)
    dims.setdefault("t5", None)  # type: ignore[arg-type]  # no T5 loaded (drop_t5): its rows are not used
    try:
        saved = read_embeddings(path, dims=dims)  # type: ignore[arg-type]
    except AdapterError as exc:
        exc.message = f"The embeddings of adapter {source}: {exc.message}"
        exc.args = (exc.message,)
        raise
    stem = "e" + hashlib.sha256(source.strip().encode()).hexdigest()[:8]
    internal = [f"<{stem}{i}>" for i in range(len(saved.tokens))]
    used = []
    for name, rows in saved.tensors.items():
        encoder = getattr(pipe, PIPELINE_ENCODERS[name], None)
        tokenizer = getattr(pipe, _PROMPT_ARGS[name][0], None)
        if encoder is None or tokenizer is None:
            continue
        tokenizer.add_tokens([t for t in internal if t not in tokenizer.get_vocab()])
        ids = tokenizer.convert_tokens_to_ids(internal)
        weight = encoder.get_input_embeddings().weight
        if max(ids) >= weight.shape[0]:
            encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = rows.to(dtype=weight.dtype, device=weight.device)
        used.append(name)
    return LoadedEmbeddings(source, list(saved.tokens), internal, tuple(used), path)


def substitute(prompt: str, negative: str | None, active: list[LoadedEmbeddings]) -> dict[str, Any]:
    """Pipeline prompt arguments with each active adapter's tokens replaced in its encoders' prompts."""
    owner: dict[str, str] = {}
    for emb in active:
        for token in emb.tokens:
            if token in owner and owner[token] != emb.source:
                raise ConfigError(
                    f"the adapters {owner[token]} and {emb.source} both define the token {token}; "
                    "use one of them in a request (or retrain one with another train.token_name)"
                )
            owner[token] = emb.source
    out: dict[str, Any] = {}
    for name, (_, arg) in _PROMPT_ARGS.items():
        text, neg = prompt, negative
        for emb in active:
            if name in emb.encoders:
                for token, mine in sorted(
                    zip(emb.tokens, emb.internal, strict=True), key=lambda p: -len(p[0])
                ):
                    text = text.replace(token, mine)
                    neg = neg.replace(token, mine) if neg else neg
        out[arg] = text
        out["negative_" + arg] = neg
    return out
