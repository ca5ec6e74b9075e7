"""Text query encoder for task selection on stations: a sentence encoder (all-MiniLM-L6-v2)
exported to ONNX, run with onnxruntime + tokenizers only (the runtime never imports torch).

    enc = TextQueryEncoder("bundle/text_encoder.onnx", "bundle/text_tokenizer.json", max_len=256)
    q = enc.encode(["Is the seal torn?"])        # float32 [1, 384], unit norm

Graph contract (written by kaizen.export.text_encoder): input_ids i64[B,T], attention_mask
i64[B,T] -> text_embeds f32[B,d], already pooled and L2-normalised. Token ids come from
`tokenize` below, which the exporter's torch side uses too, so both see identical ids: the BERT
tokenizer adds [CLS]/[SEP], truncates to max_len tokens and right-pads to the batch's longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import BundleError, InputError
from .prompting import check_instruction

MAX_TEXTS = 256  # texts per encode() call: bounds memory and latency of one call
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "text_embeds"


def configure_tokenizer(tok: Tokenizer, max_len: int) -> Tokenizer:
    """Set truncation at `max_len` tokens (special tokens included) and right padding to the
    longest text of a batch, whatever the tokenizer.json shipped (MiniLM's pads to a fixed 128)."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 3:
        raise BundleError(f"text encoder max_len must be an integer >= 3, got {max_len!r}")
    pad_token, pad_id = "[PAD]", tok.token_to_id("[PAD]")
    if tok.padding is not None:  # the tokenizer's own pad token wins over the BERT default
        pad_token, pad_id = tok.padding["pad_token"], tok.padding["pad_id"]
    if pad_id is None:
        raise BundleError("text tokenizer has no padding config and no [PAD] token; "
                          "export it from a sentence-transformers folder with a BERT tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=max_len, strategy="longest_first", direction="right")
    tok.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token, length=None)
    return tok


def tokenize(tok: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [n, T] for a tokenizer set up by `configure_tokenizer`."""
    encs = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def check_texts(texts: object) -> list[str]:
    """The stripped texts of one encode() call, or InputError / ValueError saying what is wrong."""
    if isinstance(texts, (str, bytes)):
        raise InputError("encode() takes a list of instructions, got a single string; wrap it in [...]")
    if not isinstance(texts, Sequence):
        raise InputError(f"encode() takes a list of instructions, got {type(texts).__name__}")
    if len(texts) > MAX_TEXTS:
        raise ValueError(f"encode() got {len(texts)} texts; the limit is {MAX_TEXTS} per call "
                         "(split the list into batches)")
    return [check_instruction(t) for t in texts]


def _load_tokenizer(source: bytes | str | Path) -> Tokenizer:
    if isinstance(source, bytes):
        try:
            return Tokenizer.from_str(source.decode("utf-8"))
        except Exception as err:  # UnicodeDecodeError, or tokenizers' bare Exception on bad JSON
            raise BundleError(f"text tokenizer bytes are not a valid tokenizer.json ({err})") from err
    path = Path(source)
    if not path.is_file():
        raise BundleError(f"text tokenizer {path} is missing; copy the whole bundle folder again")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise BundleError(f"text tokenizer {path} is not a valid tokenizer.json ({err})") from err


class TextQueryEncoder:
    """Instruction -> unit-norm text query embedding, onnxruntime only."""

    def __init__(self, onnx_path: str | Path, tokenizer: bytes | str | Path, max_len: int,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise BundleError(f"text encoder {onnx_path} is missing; copy the whole bundle folder again")
        if isinstance(providers, str) or not providers:
            raise BundleError(f"providers must be a non-empty list of execution providers, got {providers!r}")
        self.max_len = max_len
        self.tokenizer = configure_tokenizer(_load_tokenizer(tokenizer), max_len)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as runtime/bundle.py
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise BundleError(f"text encoder {onnx_path} cannot be loaded by onnxruntime ({err}); "
                              "re-export it with kaizen.export.text_encoder") from err
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(INPUTS) or names_out != [OUTPUT]:
            raise BundleError(f"text encoder {onnx_path} has inputs {list(names_in)} and outputs {names_out}; "
                              f"expected {list(INPUTS)} -> [{OUTPUT!r}] (re-export it)")
        dim = self.session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise BundleError(f"text encoder {onnx_path} output {OUTPUT} has no fixed width ({dim!r})")
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [n, dim], each row unit norm; at most MAX_TEXTS texts per call."""
        clean = check_texts(texts)
        if not clean:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, mask = tokenize(self.tokenizer, clean)
        out = self.session.run([OUTPUT], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        # The graph already normalises; doing it again is idempotent and keeps the unit-norm promise
        # for a graph exported from a folder without a Normalize module.
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
