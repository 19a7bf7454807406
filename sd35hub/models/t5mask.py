"""Masking T5 padding tokens (``data.mask_t5_padding``): the padded positions of the T5-XXL prompt
embedding are set to zero, in training (cached embeddings, the empty caption, class images, validation)
and in generation (``sd35hub generate --mask-t5-padding``), so both sides see the same conditioning.

SD3's transformer takes no text attention mask, so the padding tokens' T5 outputs (which carry signal
from the prompt) always reach joint attention; zeroing them is the masking available without changing
the model. It is installed on a pipeline instance by wrapping its ``_get_t5_prompt_embeds``, which every
``encode_prompt`` / ``pipe(prompt=...)`` call goes through; the real tokens' embeddings are unchanged.
"""

from __future__ import annotations

from typing import Any

MARK = "_sd35hub_t5_padding_masked"


def install_t5_padding_mask(pipe: Any) -> Any:
    """Make ``pipe`` zero the T5 embedding at padded positions (idempotent). Returns the pipe."""
    if getattr(pipe, MARK, False):
        return pipe
    original = pipe._get_t5_prompt_embeds

    def masked(prompt: Any = None, num_images_per_prompt: int = 1, max_sequence_length: int = 256,
               device: Any = None, dtype: Any = None) -> Any:
        embeds = original(prompt=prompt, num_images_per_prompt=num_images_per_prompt,
                          max_sequence_length=max_sequence_length, device=device, dtype=dtype)
        if pipe.text_encoder_3 is None:  # drop_t5: already zeros
            return embeds
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        keep = pipe.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").attention_mask
        keep = keep.repeat_interleave(num_images_per_prompt, 0)  # the pipeline repeats each prompt in place
        return embeds * keep.to(embeds.device, embeds.dtype).unsqueeze(-1)

    pipe._get_t5_prompt_embeds = masked
    setattr(pipe, MARK, True)
    return pipe
