"""Token layout of a request, shared by the trainer, the exporter and the engine.

    [BOS] [soft prompt rows] tokens(before) [image rows] tokens(after) | tokens(" " + answer) [EOS]

`before`/`after` come from splitting the base's prompt template at "<image>". Soft-prompt
rows are inserted right after BOS at the embedding level (see docs/ARCHITECTURE.md), so this
module only deals with token ids; `soft_rows` says how many rows to reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

IMAGE_PLACEHOLDER = "<image>"
MAX_INSTRUCTION_CHARS = 2000
MAX_INSTRUCTION_TOKENS = 512  # the engine's default cap: memory grows with the prompt's length


@dataclass(frozen=True)
class PromptSpec:
    """Everything needed to lay out a request's tokens for one base."""

    template: str
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    image_token_id: int
    num_image_tokens: int

    def __post_init__(self):
        if self.template.count(IMAGE_PLACEHOLDER) != 1 or "{instruction}" not in self.template:
            raise ValueError(
                f"prompt template {self.template!r} must contain '<image>' once and '{{instruction}}'"
            )
        assert self.num_image_tokens > 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_instruction(instruction: object) -> str:
    """Return the stripped instruction or raise InputError saying what is wrong."""
    if not isinstance(instruction, str):
        raise InputError(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise InputError("instruction is empty: send the question to ask about the image")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"instruction is {len(text)} characters long; the limit is {MAX_INSTRUCTION_CHARS}")
    return text


def check_instruction_tokens(tokenizer, instruction: str, max_tokens: int) -> None:
    """InputError if the instruction is over `max_tokens` tokens (2,000 emoji are ~8,000 tokens)."""
    n = len(_encode(tokenizer, instruction))
    if n > max_tokens:
        raise InputError(f"instruction is {n} tokens long; the limit is {max_tokens} tokens "
                         "(max_instruction_tokens): shorten the question")


def prompt_ids(tokenizer, spec: PromptSpec, instruction: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the request (BOS, text, image placeholders), without soft-prompt rows.

    `tokenizer` is a `tokenizers.Tokenizer` (or anything with `.encode(text, add_special_tokens=False).ids`).
    With `max_tokens`, an instruction over that many tokens is an InputError (the engine sets it).
    """
    instruction = check_instruction(instruction)
    if max_tokens is not None:
        check_instruction_tokens(tokenizer, instruction, max_tokens)
    text = spec.template.replace("{instruction}", instruction)
    before, after = text.split(IMAGE_PLACEHOLDER)
    ids = [spec.bos_token_id]
    ids += _encode(tokenizer, before)
    ids += [spec.image_token_id] * spec.num_image_tokens
    ids += _encode(tokenizer, after)
    return np.asarray(ids, dtype=np.int64)


def answer_ids(tokenizer, spec: PromptSpec, answer: str) -> np.ndarray:
    """Target ids for an answer: tokens(" " + answer) + [EOS]."""
    return np.asarray(_encode(tokenizer, " " + answer.strip()) + [spec.eos_token_id], dtype=np.int64)


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def clip_text_ids(tokenizer, texts: list[str], max_len: int, bos: int, eos: int, pad: int):
    """CLIP text inputs: [BOS] tokens [EOS] right-padded to max_len -> (ids, mask) int64 [B, max_len]."""
    ids = np.full((len(texts), max_len), pad, dtype=np.int64)
    mask = np.zeros((len(texts), max_len), dtype=np.int64)
    for row, text in enumerate(texts):
        toks = [bos] + _encode(tokenizer, check_instruction(text))[: max_len - 2] + [eos]
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return ids, mask
