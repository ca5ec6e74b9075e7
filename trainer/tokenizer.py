"""The tiny bases' tokenizer: a byte-level BPE trained offline, in-process, on the generic corpus.

Special tokens have fixed ids so configs can name them: <pad>=0, <s>=1, <unk>=2, </s>=3, <image>=4.
(EOS is not 2 on purpose: transformers' CLIP text pooling treats eos_token_id == 2 as the
legacy "argmax of ids" rule, which would pool the wrong position.)
Byte-level means any text (unseen words included) encodes; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<pad>", "<s>", "<unk>", "</s>", "<image>"]
PAD_ID, BOS_ID, UNK_ID, EOS_ID, IMAGE_ID = range(5)


def train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Train a deterministic byte-level BPE on `corpus` (no special-token post-processing)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, f"special token {s} landed on id {tok.token_to_id(s)}"
    return tok


def save_hf_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Write tokenizer.json plus the HF fast-tokenizer config next to a checkpoint."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.save_pretrained(str(out))
