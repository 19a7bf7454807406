"""``embeddings.safetensors``: the new-token embeddings of a pivotal-tuning run, next to its LoRA.

One file serves every loader we know of:

    tensors   clip_l [N, 768]   clip_g [N, 1280]   t5xxl [N, 4096] (only when T5 trained)
    metadata  {"sd35hub_embeddings": "1", "tokens": '["<s0>", "<s1>"]'}

* diffusers: ``load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
  tokenizer=pipe.tokenizer)`` and the same with ``clip_g`` / ``text_encoder_2`` / ``tokenizer_2`` (the layout of
  diffusers' SDXL pivotal-tuning files). ``StableDiffusion3Pipeline`` does not include
  ``TextualInversionLoaderMixin`` (diffusers 0.42): a two-line subclass adds it (the card's snippet).
* ComfyUI: ``models/embeddings/NAME.safetensors``, prompt ``embedding:NAME``; its SD3 tokenizers read the
  ``clip_l`` / ``clip_g`` / ``t5xxl`` keys (``embedding_key`` of comfy's SDTokenizer, SDXLClipGTokenizer,
  T5XXLTokenizer); kohya sd-scripts' SDXL textual inversion writes the same ``clip_l`` / ``clip_g`` keys.

Files from the Hub are untrusted: :func:`read_embeddings` checks the size, the keys, every shape and
dtype (from the header, before any tensor is read), the values (finite) and the token strings
(``<name0>``-style plain text: no spaces, colons, slashes or markup, so a token cannot smuggle a
``<lora:...>`` tag or HTML into a prompt, card or page).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd35hub.errors import AdapterError

EMBEDDINGS_FILE = "embeddings.safetensors"
# our encoder name -> the tensor key in the file (ComfyUI's embedding_key for that encoder)
FILE_KEYS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"}
MAX_TOKENS = 64  # textual-inversion files hold 1-16 vectors; more is not an embedding file
MAX_EMBEDDINGS_BYTES = 32 * 1024**2  # 64 tokens x (768 + 1280 + 4096) x fp32 = 1.5 MiB
TOKEN_TEXT = re.compile(r"^<[a-z][a-z0-9_]{0,23}>$")
PIPELINE_ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
ENCODER_DIMS = {"clip_l": 768, "clip_g": 1280, "t5": 4096}  # SD3.5 (the tiny model is smaller: pass its dims)


def token_strings(name: str, count: int) -> list[str]:
    """``<s0>``, ``<s1>``, ... : the new tokens of a run (lowercase: CLIP lowercases prompts)."""
    return [f"<{name}{i}>" for i in range(count)]


@dataclass(frozen=True)
class Embeddings:
    tokens: list[str]  # the prompt strings, in row order ("<s0>", "<s1>")
    tensors: dict[str, torch.Tensor]  # our encoder name -> [N, D] float32

    @property
    def trigger(self) -> str:
        return "".join(self.tokens)


def save_embeddings(state: dict[str, torch.Tensor], path: Path, *, tokens: list[str]) -> Path:
    """Write ``state`` ({encoder: [N, D]}) with ``tokens`` atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    from sd35hub.paths import atomic_write

    check_tokens(tokens, source=str(path))
    tensors = {FILE_KEYS[name]: t.detach().float().cpu().contiguous() for name, t in state.items()}
    metadata = {"sd35hub_embeddings": "1", "tokens": json.dumps(list(tokens))}
    return atomic_write(Path(path), lambda temp: save_file(tensors, str(temp), metadata=metadata))


def check_tokens(tokens: Any, *, source: str) -> list[str]:
    if not isinstance(tokens, list) or not tokens or len(tokens) > MAX_TOKENS:
        raise AdapterError(f"{source}: the embeddings' token list must hold 1 to {MAX_TOKENS} tokens")
    bad = [t for t in tokens if not isinstance(t, str) or not TOKEN_TEXT.match(t)]
    if bad or len(set(tokens)) != len(tokens):
        shown = ascii(bad[0])[:40] if bad else "a duplicate"
        raise AdapterError(
            f"{source}: embedding token {shown} is not a plain token like '<s0>' (lowercase letters, "
            "digits and _ in angle brackets, all different); the file is refused"
        )
    return list(tokens)


def read_embeddings(
    path: Path,
    *,
    dims: dict[str, int] | None = None,
    tokens: list[str] | None = None,
    max_bytes: int = MAX_EMBEDDINGS_BYTES,
) -> Embeddings:
    """The checked contents of an embeddings file (see the module docstring); AdapterError saying what is
    wrong otherwise. ``dims``: each encoder's embedding width in the base (default SD3.5's); ``tokens``:
    the token strings when the file carries none (kohya / ComfyUI files), default ``<s0>``, ``<s1>``..."""
    from safetensors import safe_open

    source = str(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AdapterError(f"{source}: cannot read the embeddings file ({e.strerror})") from None
    if size > max_bytes:
        raise AdapterError(
            f"{source} is {size / 1024**2:.1f} MiB; an embeddings file is a few KB to "
            f"{max_bytes // 1024**2} MiB at most: this is not one, refused"
        )
    dims = dims or ENCODER_DIMS
    by_key = {key: name for name, key in FILE_KEYS.items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            unknown = [k for k in keys if k not in by_key]
            if unknown or not keys:
                raise AdapterError(
                    f"{source}: an embeddings file holds the keys {', '.join(FILE_KEYS.values())}; "
                    f"this one has {ascii(sorted(keys)[:4])[:120]}: refused"
                )
            rows = set()
            for key in keys:
                sl = handle.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                name = by_key[key]
                want = dims.get(name)  # None for a named encoder the caller does not load (any width up to 8192)
                width_ok = len(shape) == 2 and (shape[1] == want if want is not None else name in dims and shape[1] <= 8192)
                if dtype not in ("F32", "F16", "BF16") or not width_ok:
                    raise AdapterError(
                        f"{source}: {key} is {dtype} {list(shape)}; the base's {name} encoder needs "
                        f"float [N, {dims.get(name)}] rows: refused (an embedding for another model?)"
                    )
                rows.add(shape[0])
            if len(rows) != 1 or not 1 <= next(iter(rows)) <= MAX_TOKENS:
                raise AdapterError(
                    f"{source}: every key must hold the same number of rows, 1 to {MAX_TOKENS} "
                    f"(found {sorted(rows)}): refused"
                )
            tensors = {by_key[k]: handle.get_tensor(k).float() for k in keys}
    except AdapterError:
        raise
    except Exception as e:  # not a safetensors file, truncated header, ...
        raise AdapterError(
            f"{source} is not a readable safetensors embeddings file ({type(e).__name__}): refused"
        ) from None
    count = next(iter(rows))
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(
                f"{source}: the {FILE_KEYS[name]} embeddings hold NaN or infinite values: refused"
            )
    if "tokens" in metadata:
        try:
            listed = json.loads(metadata["tokens"])
        except ValueError:
            listed = None
        found = check_tokens(listed, source=source)
    else:
        found = check_tokens(tokens or token_strings("s", count), source=source)
    if len(found) != count:
        raise AdapterError(f"{source}: {len(found)} tokens for {count} embedding rows: refused")
    return Embeddings(found, tensors)


def dims_for_variant(variant: str | None) -> dict[str, int]:
    """Each encoder's embedding width for a base variant ("tiny": the embedded test model)."""
    if variant == "tiny":
        from sd35hub.models.tiny import CLIP_HIDDEN, T5_D_MODEL

        return {"clip_l": CLIP_HIDDEN, "clip_g": CLIP_HIDDEN, "t5": T5_D_MODEL}
    return dict(ENCODER_DIMS)


def pipeline_dims(pipe: Any) -> dict[str, int]:
    """Each present encoder's input-embedding width in ``pipe`` (what :func:`read_embeddings` checks)."""
    out = {}
    for name, enc_attr in PIPELINE_ENCODERS.items():
        encoder = getattr(pipe, enc_attr, None)
        if encoder is not None:
            out[name] = int(encoder.get_input_embeddings().weight.shape[1])
    return out
