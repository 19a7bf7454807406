"""The embedded tiny SD3.5 model: the real architecture at toy sizes, built offline, byte-identical.

It exists so that the demo, the tests and the CI run the *same* loading, training, adapter and
blending code as a real Stable Diffusion 3.5 checkpoint, on 2 CPU cores and with no Hub access.
The weights are random (fixed seeds): images are noise-like, but every tensor shape, config key,
file name and folder layout matches what `StableDiffusion3Pipeline.from_pretrained` expects from
`stabilityai/stable-diffusion-3.5-medium`.

Architecture (Medium-style, sizes chosen to agree — see FACTS.md):
  transformer   SD3Transformer2DModel, 3 layers (0 and 1 dual-attention), qk_norm rms_norm,
                4 heads x 8 = 32 wide, latents [b, 16, h/8, w/8], patch 2, 64-512 px images
  text_encoder  CLIPTextModelWithProjection, hidden 32, projection 32   (stands in for CLIP-L)
  text_encoder_2 CLIPTextModelWithProjection, hidden 32, projection 32  (stands in for CLIP-G)
  text_encoder_3 T5EncoderModel, d_model 64 (>= 32 + 32, so CLIP embeddings are not cut)
  vae           AutoencoderKL, 4 down blocks (8x), 16 latent channels, SD3.5 shift/scale factors
  scheduler     FlowMatchEulerDiscreteScheduler(shift=3.0)
  tokenizers    CLIP byte-level BPE and T5 sentencepiece unigram, trained here on
                tokenizer_corpus.txt (ids sorted so that every build is byte-identical)

Bump TINY_MODEL_VERSION whenever anything here changes what is written: cached builds with
another version are ignored and rebuilt.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from sd35hub.paths import build_into_place, default_cache_dir

__all__ = ["build_tiny_model", "default_cache_dir", "is_tiny_model_dir", "tiny_model_path"]

TINY_MODEL_VERSION = "1"
TINY_MODEL_DIRNAME = f"tiny-sd35-v{TINY_MODEL_VERSION}"
MARKER_FILE = "sd35hub_tiny.json"  # written last inside the folder: {"sd35hub_tiny_model": version}
SEED = 35

_CORPUS = Path(__file__).with_name("tokenizer_corpus.txt")
# Building seeds torch's global RNG: two threads building at once would interleave their draws.
_BUILD_LOCK = threading.Lock()

# Sizes in one place, so that tests and docs can refer to them.
CLIP_HIDDEN = 32  # each of the two CLIP encoders
CLIP_PROJECTION = 32  # pooled output width of each; pooled_projection_dim = 2 * this
T5_D_MODEL = 64  # = joint_attention_dim; must be >= 2 * CLIP_HIDDEN
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32,  # latent side at 256 px (256 / 8)
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_D_MODEL,
    "caption_projection_dim": 32,  # = heads x head_dim
    "pooled_projection_dim": 2 * CLIP_PROJECTION,
    "pos_embed_max_size": 32,  # in patches: latents up to 64x64 = images up to 512 px
    "dual_attention_layers": (0, 1),  # SD3.5 Medium feature (real Medium: layers 0-12 of 24)
    "qk_norm": "rms_norm",  # SD3.5 feature (SD3 Medium has none)
}
VAE_SHIFT_FACTOR = 0.0609  # the real SD3.5 VAE's values
VAE_SCALING_FACTOR = 1.5305


def is_tiny_model_dir(path: Path) -> bool:
    """True if `path` holds a complete tiny model of the current version."""
    marker = path / MARKER_FILE
    if not marker.is_file() or not (path / "model_index.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sd35hub_tiny_model") == TINY_MODEL_VERSION
    except (OSError, ValueError):
        return False


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """The folder of the tiny model, built on first use into `<cache>/tiny-sd35-v<version>`.

    Safe when several processes race: each builds into its own temporary folder and renames it
    into place; the loser of the rename throws its copy away (all copies are byte-identical).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / TINY_MODEL_DIRNAME
    if is_tiny_model_dir(target):
        return target
    with _BUILD_LOCK:
        if is_tiny_model_dir(target):  # another thread finished it while we waited
            return target
        build_into_place(target, build_tiny_model, is_tiny_model_dir)
    return target


def build_tiny_model(out_dir: Path) -> Path:
    """Write the tiny pipeline in standard diffusers layout into `out_dir` (created if needed)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()

    # One fork of the global RNG per component, each with its own seed: a component's weights do
    # not depend on how many random numbers the others drew.
    with torch.random.fork_rng(devices=[]):
        components = {
            "transformer": _seeded(SEED + 1, _transformer),
            "vae": _seeded(SEED + 2, _vae),
            "text_encoder": _seeded(SEED + 3, _clip_text_encoder, clip_tokenizer),
            "text_encoder_2": _seeded(SEED + 4, _clip_text_encoder, clip_tokenizer),
            "text_encoder_3": _seeded(SEED + 5, _t5_text_encoder, t5_tokenizer),
        }
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer,
        tokenizer_3=t5_tokenizer,
        **components,
    )
    from transformers.utils import logging as transformers_logging

    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars: noise in `sd35hub demo`
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    (out_dir / MARKER_FILE).write_text(json.dumps({"sd35hub_tiny_model": TINY_MODEL_VERSION}) + "\n")
    return out_dir


def _seeded(seed: int, build: Any, *args: Any) -> Any:
    import torch

    torch.manual_seed(seed)
    model = build(*args)
    model.eval()
    return model


def _transformer() -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings between 4 blocks = 8x
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=256,
        shift_factor=VAE_SHIFT_FACTOR,
        scaling_factor=VAE_SCALING_FACTOR,
        use_quant_conv=False,  # as in the real SD3/SD3.5 VAE
        use_post_quant_conv=False,
    )


def _clip_text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        projection_dim=CLIP_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        # The pooled output is read at the first eos: these ids must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _t5_text_encoder(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like T5-XXL in SD3.5
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _clip_tokenizer() -> Any:
    """CLIP-style byte-level BPE with '</w>' word ends, trained on the corpus.

    The `tokenizers` trainer finds the same set of merges every run but orders them (and the
    alphabet) differently from process to process, so ids are assigned here in sorted order:
    256 byte symbols, the same with '</w>', merged symbols, then <|startoftext|> <|endoftext|>.
    BPE applies the lowest-ranked merge present and rescans, so any order of a merge set is a
    valid tokenizer; shorter merges rank first.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # CLIP's word split, then bytes -> printable unicode symbols
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=1024, end_of_word_suffix="</w>", initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(_corpus_lines(), trainer)
    trained = json.loads(bpe.to_str())["model"]["merges"]
    merges = sorted(
        {tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained},
        key=lambda ab: (len(ab[0]) + len(ab[1]), ab[0], ab[1]),
    )
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[(a, b) for a, b in merges])
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_tokenizer() -> Any:
    """T5-style sentencepiece unigram (pad 0, eos 1, unk 2), trained single-threaded (deterministic)."""
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=model_proto,
        model_type="unigram",
        vocab_size=256,
        hard_vocab_limit=False,  # the corpus is small: take what it supports
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = 256  # SD3's max_sequence_length default
    return tokenizer
