"""The base bundle on a station's disk: base.json, verified files, ONNX Runtime sessions.

    bundle = Bundle.open("bundles/tiny-llama")            # verifies every sha256 in base.json
    sess = bundle.session("decoder.onnx")                 # providers always explicit

Written by kaizen.export.base_export; the layout is in docs/ARCHITECTURE.md. A graph over the
protobuf limit keeps its weights in `<graph>.onnx.data` next to it: base.json's optional
`external_data` {graph: [data file, ...]} says which, and `files` hashes them like every other file.
Bundles without `external_data` (all graphs self-contained) open as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .durable import sha256_file
from .errors import BundleError
from .preprocess import PreprocessConfig
from .prompting import PromptSpec

ort.set_default_logger_severity(3)  # errors only: optional LoRA inputs make ORT warn on every load

BUNDLE_SCHEMA_VERSION = 1
BUNDLE_FILES = ("vision.onnx", "embed.npy", "decoder.onnx", "clip_image.onnx", "clip_text.onnx",
                "tokenizer.json", "clip_tokenizer.json", "preprocess.json")
# Unaligned query encoders (query.kind "vision+text"): the image query is vision.onnx's second
# output, the text query a sentence encoder; no CLIP towers.
UNALIGNED_FILES = ("vision.onnx", "embed.npy", "decoder.onnx", "text_query.onnx", "text_tokenizer.json",
                   "tokenizer.json", "preprocess.json")
QUERY_KINDS = ("clip", "vision+text")


def bundle_files(query_kind: str) -> tuple[str, ...]:
    """The files a bundle with this kind of query encoders holds (each hashed in base.json)."""
    return BUNDLE_FILES if query_kind == "clip" else UNALIGNED_FILES
REQUIRED_KEYS = ("schema_version", "fingerprint", "files", "prompt", "text", "lora", "precision")
# Share of a pack's golden samples that may answer differently on a bundle of this precision
# (Bundle.golden_allowance; measured in README "Lower precisions").
GOLDEN_TOLERANCE = {"int8": 0.25, "int4": 0.25}


def default_providers() -> list[str]:
    """CUDA execution provider when this onnxruntime has it, else CPU; always an explicit list."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _check_parity_report(report: Path) -> None:
    """Refuse a bundle whose export failed its parity check (`kaizen base export` writes the figures
    to parity.json, also when the check fails, and no parity.json with --no-check)."""
    if not report.exists():
        return
    try:
        failures = json.loads(report.read_text()).get("failures", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise BundleError(f"{report} is not a parity report ({err}); re-export the bundle") from err
    if failures:
        raise BundleError(f"{report.parent} failed its parity check against torch at export "
                          f"({'; '.join(map(str, failures))}); re-export it (another precision or base), "
                          f"or delete {report.name} to use it anyway")


@dataclass
class Bundle:
    """A verified base bundle folder and what the engine needs from it."""

    path: Path
    meta: dict
    providers: list[str]
    threads: int = 0
    _sessions: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path, providers: list[str] | None = None, threads: int = 0, verify: bool = True) -> Bundle:
        path = Path(path)
        meta_path = path / "base.json"
        if not meta_path.exists():
            raise BundleError(f"{meta_path} is missing: {path} is not a base bundle "
                              "(make one with `kaizen base export BASE --out DIR`)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{meta_path} is not valid JSON ({err}); re-export the bundle") from err
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_path} lacks field(s) {missing}; re-export the bundle")
        if meta["schema_version"] != BUNDLE_SCHEMA_VERSION:
            raise BundleError(f"{meta_path}: schema_version {meta['schema_version']} is not supported by this "
                              f"runtime (expects {BUNDLE_SCHEMA_VERSION}); upgrade the runtime or re-export")
        kind = meta.get("query", {"kind": "clip"}).get("kind")
        if kind not in QUERY_KINDS or (kind == "clip" and "clip" not in meta):
            raise BundleError(f"{meta_path}: query kind {kind!r} is not one of {list(QUERY_KINDS)} (or its "
                              "'clip' section is missing); re-export the bundle")
        _check_file_names(meta_path, meta)
        _check_parity_report(path / "parity.json")
        bundle = cls(path, meta, list(providers or default_providers()), threads)
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        for name, digest in self.meta["files"].items():
            f = self.path / name
            role = self._role(name)
            if not f.exists():
                raise BundleError(f"bundle file {f}{role} is missing; copy the whole bundle folder again "
                                  "(or re-export it with `kaizen base export`)")
            if sha256_file(f) != digest:
                raise BundleError(f"bundle file {f}{role} does not match its sha256 in base.json (altered or "
                                  "corrupt, e.g. a partial copy); copy the bundle again or re-export it")

    def external_data(self, graph: str) -> list[str]:
        """The external data files of `graph` (e.g. ["decoder.onnx.data"]); [] for a self-contained graph."""
        return list(self.meta.get("external_data", {}).get(graph, []))

    def _role(self, name: str) -> str:
        graphs = [g for g, files in self.meta.get("external_data", {}).items() if name in files]
        return f" (external weights of {graphs[0]})" if graphs else ""

    def golden_allowance(self, n: int) -> int:
        """How many of a pack's n golden samples may answer differently on this bundle: 0 on fp32 and
        fp16, 1 in 4 on int8 and int4. The golden answers are the fp32 trainer's; bench/precision.py
        on the demo's real-fast run measured 99.6 % identical answers for fp16 but 98.3 % (int8) and
        97.9 % (int4) with their int8 encoder towers, and an int8 pack then had 1 of 4 golden
        answers flipped. A pack that does not fit the base at all gets most of them wrong, so this
        still refuses it."""
        return int(n * GOLDEN_TOLERANCE.get(self.meta.get("precision", "fp32"), 0.0))

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def query(self) -> dict:
        """{"kind": "clip"} (aligned CLIP towers) or {"kind": "vision+text", "image_dim", "text_dim",
        "text_max_len"} (image query from vision.onnx's `image_query`, text from text_query.onnx)."""
        return self.meta.get("query", {"kind": "clip"})

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            for data in self.external_data(name):  # also when opened with verify=False
                if not (self.path / data).is_file():
                    raise BundleError(f"bundle file {self.path / data} (external weights of {name}) is missing; "
                                      "copy the whole bundle folder again (or re-export it)")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            # No busy-waiting worker threads: on a station's few cores they steal CPU from the
            # endpoint and the fleet link (measured: +4..13 ms per part behind the endpoint).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # No memory pattern: it plans and keeps buffers per input shape, and the decoder sees a new
            # shape at every step (the KV cache grows). Off, peak RSS on `small` drops 17 MB (fp32:
            # 300 -> 282 MB; int4: 197 -> 183 MB) at the same speed (bench/engine.py, A/B x3).
            opts.enable_mem_pattern = False
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            self._sessions[name] = ort.InferenceSession(str(self.path / name), sess_options=opts,
                                                        providers=self.providers)
        return self._sessions[name]

    def prompt_spec(self) -> PromptSpec:
        return PromptSpec(**self.meta["prompt"])

    def preprocess(self, which: str) -> PreprocessConfig:
        data = json.loads((self.path / "preprocess.json").read_text())
        return PreprocessConfig.from_dict(data[which])

    def tokenizer(self, name: str = "tokenizer.json") -> Tokenizer:
        return Tokenizer.from_file(str(self.path / name))

    def embeddings(self) -> np.ndarray:
        """The token embedding table, memory-mapped read-only: a station touches only the rows of
        the tokens it embeds (prompt, instruction, answers), so a 49k-token table does not sit in
        RSS (its bytes were verified against base.json when the bundle was opened)."""
        return np.load(self.path / "embed.npy", allow_pickle=False, mmap_mode="r")

    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.meta["lora"]["shapes"].items()}


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_file_names(meta_path: Path, meta: dict) -> None:
    """Every file base.json names is a plain name inside the bundle folder, and every external data
    file of a graph is hashed in `files`."""
    files = meta["files"]
    if not isinstance(files, dict) or not all(_plain_name(n) and isinstance(d, str) for n, d in files.items()):
        raise BundleError(f"{meta_path}: 'files' must map plain file names (no folders) to sha256 hex; "
                          "re-export the bundle")
    external = meta.get("external_data", {})
    if not isinstance(external, dict) or not all(isinstance(v, list) for v in external.values()):
        raise BundleError(f"{meta_path}: 'external_data' must map a graph to a list of data files; re-export")
    for graph, data_files in external.items():
        for name in data_files:
            if not _plain_name(name) or name not in files:
                raise BundleError(f"{meta_path}: external data {name!r} of {graph} has no sha256 in 'files' "
                                  "(or is not a plain file name); re-export the bundle")
