"""The trainer's side of pivotal tuning (train.new_tokens): tokens into the live encoders, the schedule, files.

    pivotal = Pivotal.setup(trainer)     # after live_text.for_trainer: the tokens go into trainer.text's tokenizers
    optimizer groups += [pivotal.param_group()]            # the rows at train.embedding_lr
    pivotal.after_step(step)             # train.embedding_steps reached: the rows freeze, the LoRA goes on alone
    pivotal.save(folder)                 # embeddings.safetensors next to the adapter

The cache holds every caption's embeddings as the base encoders computed them, with the literal
text of the new tokens (``<s0><s1>``): exact for T5 whenever its rows do not train (T5's stock
tokenizer sees the same text at inference). The encoders whose rows train are live
(sd35hub.train.live_text, shared with the text-encoder LoRA): they encode the captions every step,
and the held-out loss and the LoRA column of the grids, with autograd through the new rows only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, read_embeddings, save_embeddings
from sd35hub.config import Config
from sd35hub.errors import ConfigError
from sd35hub.run_summary import EmbeddingsSummary
from sd35hub.train.pivotal import PivotalTokens, token_strings


def run_tokens(cfg: Config) -> list[str]:
    return token_strings(cfg.train.token_name, cfg.train.new_tokens)


def resolve_trigger(cfg: Config) -> Config:
    """data.trigger_word = the new tokens when it is empty (the config check refuses one without them)."""
    if not cfg.train.new_tokens or cfg.data.trigger_word.strip():
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, trigger_word="".join(run_tokens(cfg))))


def embedding_steps(cfg: Config, total_steps: int) -> int:
    """Optimizer steps the new rows train: train.embedding_steps, else the fraction of all steps."""
    t = cfg.train
    if t.embedding_steps is not None:
        return min(t.embedding_steps, total_steps)
    return min(total_steps, max(1, round(t.embedding_fraction * total_steps)))


class Pivotal:
    def __init__(self, tokens: PivotalTokens, *, cfg: Config) -> None:
        self.tokens, self.cfg = tokens, cfg
        self.stop_step: int | None = None

    @classmethod
    def setup(cls, trainer: Any) -> Pivotal:
        """Insert the run's tokens into the live encoders of train.token_encoders (trainer.text)."""
        from sd35hub.train.live_text import NAMES

        cfg = trainer.config
        t = cfg.train
        live = trainer.text
        pairs = {}
        for name in t.token_encoders:
            component = NAMES[name]
            if component not in live.lora_encoders():  # attach_lora froze the others' base already
                live.encoders[component].requires_grad_(False)  # only the new rows train
            pairs[name] = (live.tokenizers[component], live.encoders[component])
        tokens = PivotalTokens.insert_pairs(pairs, run_tokens(cfg), init=t.token_init, seed=t.seed)
        trainer.pivotal_params = tokens.parameters()
        if trainer.main:
            span = (
                f"{t.embedding_steps} steps"
                if t.embedding_steps
                else f"{t.embedding_fraction:.0%} of the steps"
            )
            trainer.log(
                f"pivotal tuning: {''.join(tokens.tokens)} new in {', '.join(t.token_encoders)}; their "
                f"embeddings train at lr {t.embedding_lr:g} for the first {span}, then the LoRA alone"
            )
        return cls(tokens, cfg=cfg)

    # ------------------------------------------------------------------ optimizer + schedule
    def param_group(self) -> dict[str, Any]:
        """Their own learning rate; no weight decay (it would pull the rows towards zero norm)."""
        return {"params": self.tokens.parameters(), "lr": self.cfg.train.embedding_lr, "weight_decay": 0.0}

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.tokens.parameters()

    def schedule(self, total_steps: int, step: int) -> None:
        self.stop_step = embedding_steps(self.cfg, total_steps)
        self.after_step(step)

    def after_step(self, step: int) -> None:
        if not self.tokens.frozen and self.stop_step is not None and step >= self.stop_step:
            self.tokens.freeze()

    def summary(self) -> EmbeddingsSummary:
        """summary.json's "embeddings" (the card's snippet and the publication read it)."""
        from sd35hub.adapters.embeddings import FILE_KEYS

        t = self.cfg.train
        return EmbeddingsSummary(file=f"adapter/{EMBEDDINGS_FILE}", tokens=list(self.tokens.tokens),
                                 encoders=list(t.token_encoders), keys=[FILE_KEYS[n] for n in t.token_encoders],
                                 embedding_lr=t.embedding_lr, embedding_steps=self.stop_step, init=t.token_init or None)

    # ------------------------------------------------------------------ files
    def save(self, folder: Path) -> Path:
        return save_embeddings(self.tokens.state(), Path(folder) / EMBEDDINGS_FILE, tokens=self.tokens.tokens)

    def load(self, folder: Path) -> None:
        """Resume: the rows of a checkpoint folder (ConfigError when it has none or they do not fit)."""
        path = Path(folder) / EMBEDDINGS_FILE
        if not path.is_file():
            raise ConfigError(
                f"the checkpoint {folder} has no {EMBEDDINGS_FILE}: it was not written by a run with "
                "train.new_tokens; resume with the config it was trained with"
            )
        saved = read_embeddings(path, dims={name: int(r.rows.shape[1]) for name, r in self.tokens.rows.items()})
        if saved.tokens != self.tokens.tokens:
            raise ConfigError(
                f"the checkpoint's tokens {saved.tokens} differ from this run's {self.tokens.tokens}; "
                "resume with the same train.new_tokens / train.token_name"
            )
        self.tokens.load_state(saved.tensors)
