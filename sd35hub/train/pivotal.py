"""Pivotal tuning / textual inversion: new tokens in the CLIP-L, CLIP-G (and optionally T5) tokenizers,
their input-embedding rows trained next to the LoRA.

    tokens = PivotalTokens.insert(pipe, ["<s0>", "<s1>"], encoders=("clip_l", "clip_g"), init="dog")
    optimizer = AdamW([{"params": lora_params}, {"params": tokens.parameters(), "lr": 5e-4}])
    ...                                        # captions with "<s0><s1>" encoded live each step
    tokens.freeze()                            # train.embedding_steps reached: the LoRA trains alone
    save_embeddings(tokens.state(), folder / "embeddings.safetensors", tokens=tokens.tokens)

Each encoder's tokenizer gets the tokens (ids len(tokenizer), len(tokenizer) + 1, ... exactly as
diffusers' ``load_textual_inversion`` assigns them), its embedding matrix grows to hold those ids,
and the new rows live in a separate ``[N, D]`` fp32 parameter that a forward hook on the input-
embedding module puts in place of the looked-up rows. The base rows are never in the optimizer and
never receive a gradient, so they stay exactly as loaded (weight decay included); :meth:`sync`
copies the trained rows into the matrix (validation with stock pipelines, saving, exports).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from sd35hub.adapters.embeddings import token_strings
from sd35hub.errors import ConfigError

__all__ = ["ENCODERS", "NewTokenRows", "PivotalTokens", "token_strings"]

# our encoder name -> (pipeline tokenizer attribute, pipeline text-encoder attribute)
ENCODERS: dict[str, tuple[str, str]] = {
    "clip_l": ("tokenizer", "text_encoder"),
    "clip_g": ("tokenizer_2", "text_encoder_2"),
    "t5": ("tokenizer_3", "text_encoder_3"),
}
TOKEN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")


class NewTokenRows(torch.nn.Module):
    """One encoder's new tokens: their ids and their trainable ``[N, D]`` rows (fp32)."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        tokens: list[str],
        *,
        init: str = "",
        seed: int = 0,
        rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise ConfigError(
                f"the tokens {taken} are already in the {type(tokenizer).__name__} vocabulary; "
                "pick another train.token_name (the new tokens must be new)"
            )
        embedding = text_encoder.get_input_embeddings()
        weight = embedding.weight
        tokenizer.add_tokens(tokens)
        self.ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
        if max(self.ids) >= weight.shape[0]:  # T5 keeps spare rows past its vocabulary: grow only when needed
            text_encoder.resize_token_embeddings(max(self.ids) + 1, mean_resizing=False)
            embedding = text_encoder.get_input_embeddings()
        embedding.weight.requires_grad_(False)  # the base rows never train
        self.embedding = [embedding]  # a list: not a submodule (its weight is the frozen base's)
        base = embedding.weight.detach()
        if rows is None:
            rows = _initial_rows(tokenizer, base[: min(self.ids)], len(tokens), init=init, seed=seed)
        self.rows = torch.nn.Parameter(rows.detach().to(dtype=torch.float32, device=base.device).clone())
        self.register_buffer(
            "id_tensor", torch.tensor(self.ids, dtype=torch.long, device=base.device), persistent=False
        )
        self._hook = embedding.register_forward_hook(self._replace)
        self.sync()

    def _replace(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids = args[0]  # [b, S] token ids
        hits = ids.unsqueeze(-1) == self.id_tensor.to(ids.device)  # [b, S, N]; no .any() check: no host sync
        new = hits.to(self.rows.dtype) @ self.rows.to(ids.device)  # [b, S, D]: the row of each new token
        return torch.where(hits.any(-1, keepdim=True), new.to(output.dtype), output)

    @torch.no_grad()
    def sync(self) -> None:
        """The trained rows into the embedding matrix (what a stock pipeline or saved encoder reads)."""
        weight = self.embedding[0].weight
        weight[self.id_tensor.to(weight.device)] = self.rows.detach().to(
            dtype=weight.dtype, device=weight.device
        )

    def remove(self) -> None:
        self.sync()
        self._hook.remove()


class PivotalTokens:
    """The new tokens of a run in every encoder that trains them (see the module docstring)."""

    def __init__(self, tokens: list[str], rows: dict[str, NewTokenRows]) -> None:
        self.tokens, self.rows = tokens, rows
        self.frozen = False

    @classmethod
    def insert(
        cls,
        pipe: Any,
        tokens: list[str],
        *,
        encoders: Iterable[str],
        init: str = "",
        seed: int = 0,
        state: dict[str, torch.Tensor] | None = None,
    ) -> PivotalTokens:
        """Add ``tokens`` to each named encoder of ``pipe`` (a StableDiffusion3Pipeline or anything with its
        tokenizer/text-encoder attributes); ``state`` (from :meth:`state`) gives the rows, else ``init``."""
        rows: dict[str, NewTokenRows] = {}
        for name in encoders:
            tok_attr, enc_attr = ENCODERS[name]
            tokenizer, encoder = getattr(pipe, tok_attr, None), getattr(pipe, enc_attr, None)
            if tokenizer is None or encoder is None:
                raise ConfigError(
                    f"new tokens for {name} need its text encoder, which this pipeline lacks "
                    "(model.drop_t5?); leave t5 out of train.token_encoders"
                )
            rows[name] = NewTokenRows(
                tokenizer, encoder, tokens, init=init, seed=seed, rows=None if state is None else state[name]
            )
        return cls(list(tokens), rows)

    @classmethod
    def insert_pairs(
        cls, pairs: dict[str, tuple[Any, Any]], tokens: list[str], *, init: str = "", seed: int = 0
    ) -> PivotalTokens:
        """:meth:`insert` for {encoder name: (tokenizer, text encoder)} (sd35hub.train.live_text's encoders)."""
        rows = {
            name: NewTokenRows(tok, enc, tokens, init=init, seed=seed) for name, (tok, enc) in pairs.items()
        }
        return cls(list(tokens), rows)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [r.rows for r in self.rows.values()]

    def freeze(self) -> None:
        """The pivot: the rows stop training (the LoRA goes on alone)."""
        for p in self.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.frozen = True
        self.sync()

    def sync(self) -> None:
        for r in self.rows.values():
            r.sync()

    def state(self) -> dict[str, torch.Tensor]:
        """{encoder: [N, D] fp32 CPU copy}: what :func:`sd35hub.adapters.embeddings.save_embeddings` writes."""
        return {name: r.rows.detach().float().cpu().clone() for name, r in self.rows.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, r in self.rows.items():
            if name not in state or tuple(state[name].shape) != tuple(r.rows.shape):
                raise ConfigError(
                    f"the checkpoint's embeddings do not fit this run ({name}: "
                    f"{None if name not in state else tuple(state[name].shape)} vs {tuple(r.rows.shape)}); "
                    "resume with the same train.new_tokens / train.token_encoders"
                )
        with torch.no_grad():
            for name, r in self.rows.items():
                r.rows.copy_(state[name].to(r.rows.dtype))
        self.sync()


def _initial_rows(tokenizer: Any, base: torch.Tensor, count: int, *, init: str, seed: int) -> torch.Tensor:
    """``init`` text: each row starts at the mean of that text's token embeddings (classic textual
    inversion, e.g. "dog"); empty: random rows with the matrix's per-dimension std (diffusers' pivotal
    scripts), from a generator seeded with ``seed``."""
    if init.strip():
        ids = tokenizer(init.strip(), add_special_tokens=False).input_ids
        ids = [i for i in ids if i < base.shape[0]]
        if not ids:
            raise ConfigError(
                f"train.token_init={init!r} has no token in the vocabulary; pass a word such as 'dog'"
            )
        return base[ids].float().mean(0, keepdim=True).expand(count, -1).clone()
    generator = torch.Generator().manual_seed(seed)
    std = base.float().std(0).cpu()
    return torch.randn(count, base.shape[1], generator=generator) * std
